"""kiln's hook specifications.

A plugin is a module (or object) with functions marked ``@kiln.hookimpl`` whose names are the
hooks below; it is registered through the ``kiln`` entry-point group::

    [project.entry-points.kiln]
    mamba = "kiln_mamba"

Every ``register_*`` hook is called once, when kiln builds its registry (the first time a
command or API needs it), takes no arguments and returns a sequence of specs.  The core merges
the answers of all plugins; two plugins registering the same name is an error naming both.
Hooks grow by gaining arguments, never by changing meaning.  This module imports no TVM.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pluggy

from .specs import ArchitectureSpec, BackendSpec, ConvTemplateSpec, ModelSourceSpec, QuantizationSpec

PROJECT = "kiln"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_architectures() -> Sequence[ArchitectureSpec]:
    """Model definition and weight mapping.

    Called: once, when the registry is built.
    Returns: the architectures this plugin defines: each names the Hugging Face
    ``architectures``/``model_type`` values it serves, its config class, its
    ``tvm.relax.frontend.nn`` model factory, and its weight mapping from checkpoint tensor names
    to kiln parameter names.
    """


@hookspec
def register_quantizations() -> Sequence[QuantizationSpec]:
    """Quantization schemes.

    Called: once, when the registry is built.
    Returns: named schemes (``q4f16_1``); each carries a ``QuantScheme`` that rewrites a model's
    layers into quantized ones and quantizes float weights into the stored tensors.
    """


@hookspec
def register_backends() -> Sequence[BackendSpec]:
    """Devices and their target lowering.

    Called: once, when the registry is built.
    Returns: backends; each carries its TVM target, its availability probe, the ``--opt`` keys
    it accepts and the lowering pipeline (legalization, fusion, schedules) for its target.
    """


@hookspec
def register_conv_templates() -> Sequence[ConvTemplateSpec]:
    """Conversation templates.

    Called: once, when the registry is built.
    Returns: named templates (``chatml``, ``llama-2``) turning chat messages into prompt text.
    """


@hookspec
def register_model_sources() -> Sequence[ModelSourceSpec]:
    """Checkpoint formats and packaged models.

    Called: once, when the registry is built.
    Returns: sources that detect and open a checkpoint path (Hugging Face safetensors, torch
    ``.bin``, GGUF, ...), optionally listing models shipped inside installed packages.
    """


@hookspec
def register_commands(app: Any) -> None:
    """Extra CLI commands.

    Called: once, when the ``kiln`` command line is built.
    Params: ``app`` is the ``typer.Typer`` application; add commands to it.
    Returns: nothing.
    """


@hookspec(firstresult=True)
def resolve_architecture(hf_config: Mapping[str, Any]) -> str | None:
    """Pick the architecture for a checkpoint that kiln's name lookup does not settle.

    Called: by ``convert_weight``/``gen_config`` when no registered architecture lists the
    checkpoint's ``architectures`` or ``model_type``; the first non-``None`` answer wins.
    Params: ``hf_config`` is the checkpoint's ``config.json`` as a dict.
    Returns: the name of a registered architecture, or ``None``.
    """
