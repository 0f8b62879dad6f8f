"""kiln: compile large language models with Apache TVM and run them on the device at hand."""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"


def _default_threads() -> int:
    try:
        return max(1, len(_os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, _os.cpu_count() or 1)


# TVM's CPU thread pool reads this once, when it starts; without it TVM runs on one thread.
_os.environ.setdefault("TVM_NUM_THREADS", str(_default_threads()))

from .hookspecs import hookimpl  # noqa: E402

__all__ = ["__version__", "hookimpl", "Engine", "AsyncEngine", "ChatModule"]


def __getattr__(name):  # lazy: `import kiln` must not pay for TVM
    if name in ("Engine", "AsyncEngine"):
        from .runtime import engine

        return getattr(engine, name)
    if name == "ChatModule":
        from .runtime.chat_module import ChatModule

        return ChatModule
    raise AttributeError(f"module 'kiln' has no attribute '{name}'")
