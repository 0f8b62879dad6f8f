"""``kiln compile``: ``mlc-chat-config.json`` -> a model library for one device.

The library holds the Relax VM executable plus a ``_metadata`` function returning JSON: kiln's
version, the model type, quantization, target, the context/batch limits it was built with and
every parameter's name, shape and dtype.  The runtime checks weights and config against it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

from .. import __version__
from ..errors import CompileError, ConfigError, UnknownNameError, UsageError, did_you_mean
from ..registry import get_registry
from .gen_config import read_chat_config
from .model import apply_overrides, build_model, check_supported, parse_overrides, parse_value
from .output import staging_dir

log = logging.getLogger("kiln")

METADATA_FUNC = "_metadata"
PARAM_LAYOUT_FUNC = "_param_layout"  # optional: lays the loaded parameters out for the kernels
# chat-config fields that size the compiled model and may be changed at compile time
SIZE_FIELDS = ("context_window_size", "prefill_chunk_size", "max_batch_size", "sliding_window_size")


def parse_opts(text: str | None, backend) -> dict[str, Any]:
    """``"k=v;k2=v2"`` checked against the backend's options; defaults filled in."""
    opts = {key: opt.default for key, opt in backend.options.items()}
    for item in (text or "").split(";"):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise UsageError(f"--opt item '{item}' is not of the form key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in backend.options:
            valid = ", ".join(sorted(backend.options)) or "none"
            raise UnknownNameError(
                f"unknown --opt key '{key}' for device '{backend.name}'{did_you_mean(key, backend.options)}; valid keys: {valid}"
            )
        opts[key] = parse_value(value)
        choices = backend.options[key].choices
        if choices and opts[key] not in choices:
            raise UsageError(f"--opt {key} must be one of {', '.join(map(str, choices))}, got '{value}'")
    return opts


def parse_size_overrides(overrides) -> dict[str, int]:
    """Size overrides (``compile --overrides``, ``chat``/``serve --overrides``, ``Engine(overrides=)``)
    as a sorted, checked dict: ``"context_window_size=1024;prefill_chunk_size=128"``, a mapping or
    ``None``.  Only the fields that size the compiled model, never its shape."""
    from .model import POSITIVE_FIELDS

    if not overrides:
        return {}
    items = parse_overrides(overrides) if isinstance(overrides, str) else dict(overrides)
    for key, value in items.items():
        if key not in SIZE_FIELDS:
            raise UsageError(
                f"cannot override '{key}'{did_you_mean(key, SIZE_FIELDS)}; the sizes that can be overridden: "
                f"{', '.join(SIZE_FIELDS)} (other fields come from `kiln gen_config`)"
            )
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"override {key} must be an integer, got {value!r}")
        if key in POSITIVE_FIELDS and value <= 0:
            raise ConfigError(f"override {key} must be positive, got {value}")
    return dict(sorted(items.items()))


def make_target(backend, opts: Mapping[str, Any]):
    import tvm

    target = tvm.target.Target(backend.target(opts))
    if backend.host is not None:
        target = tvm.target.Target(backend.target(opts), host=tvm.target.Target(backend.host))
    return target


def attach_metadata(mod, metadata: dict):
    import tvm
    from tvm import relax

    func = relax.Function([], tvm.ir.StringImm(json.dumps(metadata)), relax.ObjectType())
    mod[METADATA_FUNC] = func.with_attr("global_symbol", METADATA_FUNC)  # public: survives dead-code removal
    return mod


def error_line(exc: BaseException) -> str:
    """The line of a TVM error that says what went wrong: a TVMScript diagnostic's ``error:`` line
    with the place it points at (its last lines are the source line and carets), else the last
    line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("error:"):
            where = next((rest[3:].strip() for rest in lines[i + 1:i + 2] if rest.startswith("-->")), "")
            return line[len("error:"):].strip() + (f" (at {where})" if where else "")
    return lines[-1] if lines else type(exc).__name__


def compile_model(
    config: str | Path,
    device: str,
    output: str | Path,
    opt: str | None = None,
    overrides: str | None = None,
    registry=None,
) -> Path:
    """Compile the model described by ``config`` for ``device`` into ``output``."""
    import tvm

    registry = registry or get_registry()
    backend = registry.backend(device)
    opts = parse_opts(opt, backend)
    chat_config, _ = read_chat_config(config)
    arch = registry.architecture(chat_config["model_type"])
    quant = registry.quantization(chat_config["quantization"])
    model_config = arch.config_class.from_dict(chat_config["model_config"])
    sizes = {k: chat_config[k] for k in SIZE_FIELDS if chat_config.get(k) is not None}
    sizes.update(parse_size_overrides(overrides))
    apply_overrides(model_config, sizes)
    check_supported(arch, model_config)
    output = Path(output).expanduser()
    if output.is_dir():
        raise UsageError(f"output '{output}' is a directory; give the library's file name (e.g. model{backend.lib_suffix})")

    started = time.time()
    target = make_target(backend, opts)
    built = build_model(arch, model_config, quant, target=target)
    mod, _ = built.model.export_tvm(spec=built.model.get_default_spec())
    metadata = {
        "kiln_version": __version__,
        "model_type": arch.name,
        "quantization": quant.name,
        "device": backend.name,
        "target": str(target),
        "opts": opts,
        "model_config": {k: getattr(model_config, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", *SIZE_FIELDS,
        )},
        "model_dtype": quant.scheme.model_dtype,
        "kv_cache_dtype": built.model.kv_dtype,
        "params": built.stored_params(),
    }
    mod = attach_metadata(mod, metadata)
    try:
        ex = tvm.compile(mod, target, relax_pipeline=backend.pipeline(target, opts))
    except Exception as exc:  # noqa: BLE001 - TVM raises many error types
        raise CompileError(f"compiling {arch.name} for {backend.name} failed: {error_line(exc)}") from exc
    with staging_dir(output) as tmp:
        lib = tmp / output.name
        if backend.export is not None:
            backend.export(ex, lib, opts)
        else:
            ex.export_library(str(lib))
        output.parent.mkdir(parents=True, exist_ok=True)
        lib.replace(output)
    log.info("compiled %s (%s) for %s in %.1fs -> %s", arch.name, quant.name, target, time.time() - started, output)
    return output


def read_metadata(vm_or_module) -> dict:
    """The metadata a kiln library records (raises KeyError when there is none)."""
    return json.loads(str(vm_or_module[METADATA_FUNC]()))
