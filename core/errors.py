"""One error hierarchy for everything a user can get wrong.

The CLI prints a :class:`KilnError` as a single line (``error: <message>``) and exits with
``exit_code``; only ``KILN_DEBUG=1`` shows a traceback.  A message says what is wrong and, where
there is one, what to do about it.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base class of every error kiln reports to a user."""

    exit_code = 1


class UsageError(KilnError):
    """A command-line option or argument is invalid."""

    exit_code = 2


class PluginError(KilnError):
    """A plugin failed to load, registered something twice, or implements an unknown hook."""


class UnknownNameError(KilnError):
    """A name (architecture, quantization, device, template, option) that nothing registered."""

    exit_code = 2


class CheckpointError(KilnError):
    """A model checkpoint is missing, unreadable, or does not hold what its config says."""


class ConfigError(KilnError):
    """A configuration file is missing or holds invalid values."""


class OutputExistsError(KilnError):
    """The output location already holds results; pass ``--overwrite`` to replace them."""


class MismatchError(KilnError):
    """A model library, its weights and its config do not belong together."""


class CompileError(KilnError):
    """Lowering or building a model library failed."""


class DeviceError(KilnError):
    """The requested device is not present or not usable."""


class RequestError(KilnError):
    """A generation request is invalid (e.g. its prompt is longer than the context window)."""

    exit_code = 2

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


def did_you_mean(name: str, choices) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
