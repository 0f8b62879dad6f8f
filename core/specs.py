"""Frozen dataclasses that plugins return from kiln's hooks.

Plugins *declare* what they provide with these specs; the core does the work (loading
weights, quantizing, compiling, running).  Nothing here imports TVM, so listing plugins stays
fast and a plugin with a broken TVM install can still be reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence


@dataclass(frozen=True)
class ArchitectureSpec:
    """One model architecture (family), e.g. ``llama``.

    Attributes:
        name: kiln's name for the architecture; written as ``model_type`` in
            ``mlc-chat-config.json``.
        hf_architectures: the Hugging Face ``config.json`` ``architectures`` entries it serves
            (``"LlamaForCausalLM"``).
        hf_model_types: the Hugging Face ``model_type`` values it serves (``"llama"``).
        config_class: a :class:`kiln.modeling.ModelConfig` subclass; its ``from_dict`` turns a
            Hugging Face ``config.json`` (or a saved ``model_config``) into the config.
        model_factory: ``config -> tvm.relax.frontend.nn.Module`` building the model (a
            :class:`kiln.modeling.CausalLM`), with parameter names as the checkpoint's.
        weight_map: ``config -> {kiln parameter name: WeightSource}`` listing only the
            parameters that differ from the checkpoint (fused projections, renames); every
            other parameter is read from the checkpoint tensor of the same name.
        gguf_map: optional ``(metadata: kiln.sources.gguf.GGUFMetadata, tensors: {gguf name: shape})
            -> kiln.sources.gguf.GGUFMapping | None``: the Hugging Face style config and
            ``{hf tensor name: gguf name | GGUFTensor(name, transform)}`` for a GGUF file of this
            architecture, or ``None`` when the file is not one.  Used by the GGUF model source.
        default_conv_template: template used by ``gen_config`` when none is given.
        package: the distribution that provides it (used in install hints).
        sliding_window_attention: whether the model honours ``sliding_window_size`` (attends only
            to the last N tokens); kiln refuses a ``sliding_window_size`` > 0 for one that does not.
    """

    name: str
    hf_architectures: tuple[str, ...]
    hf_model_types: tuple[str, ...]
    config_class: type
    model_factory: Callable[[Any], Any]
    weight_map: Callable[[Any], Mapping[str, "WeightSource"]] = lambda config: {}
    gguf_map: Callable[..., Any] | None = None
    default_conv_template: str = "chatml"
    package: str = ""
    sliding_window_attention: bool = False


@dataclass(frozen=True)
class WeightSource:
    """How one kiln parameter is made from checkpoint tensors.

    ``names`` are checkpoint tensor names; ``combine`` receives their arrays in that order and
    returns the parameter (default: concatenate along axis 0, which fuses q/k/v or gate/up).
    """

    names: tuple[str, ...]
    combine: Callable[..., Any] | None = None
    optional: bool = False

    def build(self, arrays: Sequence[Any]):
        if self.combine is not None:
            return self.combine(*arrays)
        if len(arrays) == 1:
            return arrays[0]
        import numpy as np

        return np.concatenate(arrays, axis=0)


@dataclass(frozen=True)
class QuantizationSpec:
    """A named quantization scheme (``q4f16_1``).

    ``scheme`` implements :class:`kiln.quantization.QuantScheme`: it rewrites a model's layers
    into their quantized form and turns a float weight into the tensors that are stored.
    """

    name: str
    scheme: Any
    description: str = ""


@dataclass(frozen=True)
class BackendOption:
    """A ``--opt key=value`` a backend accepts (``choices``: the values it takes, if limited)."""

    default: Any
    help: str = ""
    choices: tuple = ()


@dataclass(frozen=True)
class BackendSpec:
    """A device kiln can compile for.

    Attributes:
        name: what ``--device`` takes (``cpu``, ``cuda``).
        device_type: TVM runtime device type (``tvm.device(device_type, id)``).
        target: ``options -> TVM target dict`` (``{"kind": "llvm", "mcpu": ...}``), called lazily
            so it may probe the host.
        host: TVM target dict of the host code, or ``None`` when the target is the host.
        lib_suffix: file suffix of the model library (``.so``).
        pipeline: ``(tvm.target.Target, options) -> tvm.transform.Pass`` — the backend's own
            Relax lowering (legalization, fusion, schedules, VM lowering), handed to
            ``tvm.compile(mod, target, relax_pipeline=...)``.
        export: optional ``(executable, path, options) -> None`` when a library is not written
            with ``executable.export_library(path)`` (e.g. WebAssembly).
        is_available: lazy probe: is such a device present on this machine?
        options: the ``--opt`` keys this backend accepts, with defaults.
        aliases: other names ``--device`` accepts for it (``llvm``).
        priority: order for ``--device auto`` (higher first) among available backends.
    """

    name: str
    device_type: str
    target: Callable[[Mapping[str, Any]], dict]
    pipeline: Callable[[Any, Mapping[str, Any]], Any]
    is_available: Callable[[], bool]
    host: dict | None = None
    lib_suffix: str = ".so"
    options: Mapping[str, BackendOption] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    priority: int = 0
    export: Callable[[Any, Any, Mapping[str, Any]], None] | None = None
    description: str = ""


@dataclass(frozen=True)
class ConvTemplateSpec:
    """A conversation template: how a chat becomes the prompt text.

    The prompt is ``system_template`` (with ``{system_message}`` filled in), then each message
    as ``role_templates[role]`` (``{role}`` and ``{content}`` filled in; default
    ``"{role}{role_content_sep}{content}"``) followed by ``seps[i % len(seps)]``, where i counts
    user (0) and assistant (1) turns.  The reply is prompted with the assistant role followed
    by ``role_empty_sep``.
    """

    name: str
    system_template: str = "{system_message}"
    system_message: str = ""
    roles: Mapping[str, str] = field(default_factory=lambda: {"user": "USER", "assistant": "ASSISTANT"})
    role_templates: Mapping[str, str] = field(default_factory=dict)
    seps: tuple[str, ...] = ("\n",)
    role_content_sep: str = ": "
    role_empty_sep: str = ":"
    stop_str: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    system_prefix_token_ids: tuple[int, ...] = ()
    add_role_after_system_message: bool = True


@dataclass(frozen=True)
class ModelSourceSpec:
    """A place or format model weights come from.

    Attributes:
        name: the ``--source-format`` value (``huggingface-safetensors``).
        detect: ``path -> bool``: does this source read the given path?
        open: ``path -> kiln.sources.Checkpoint``.
        priority: order of detection for ``--source-format auto`` (higher first).
        packaged_models: ``() -> {name: path}`` of models shipped inside installed packages,
            so ``kiln chat <name>`` finds them.
    """

    name: str
    detect: Callable[[Any], bool]
    open: Callable[[Any], Any]
    priority: int = 0
    packaged_models: Callable[[], Mapping[str, Any]] | None = None
    description: str = ""
