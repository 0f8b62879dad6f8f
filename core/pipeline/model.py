"""Resolve a checkpoint's architecture and build kiln's (quantized) model for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..quantization import kv_dtype
from ..specs import ArchitectureSpec, QuantizationSpec


@dataclass
class BuiltModel:
    arch: ArchitectureSpec
    config: Any
    quant: QuantizationSpec
    model: Any  # tvm.relax.frontend.nn.Module, already quantized
    float_params: list[tuple[str, tuple[int, ...], str]]  # before quantization
    plan: dict  # float parameter name -> quantizer

    def stored_params(self) -> list[dict]:
        """Names, shapes and dtypes of the tensors the weights hold and the library takes."""
        return [
            {"name": name, "shape": [int(s) for s in p.shape], "dtype": p.dtype}
            for name, p in self.model.named_parameters()
        ]


POSITIVE_FIELDS = ("context_window_size", "prefill_chunk_size", "max_batch_size")


def apply_overrides(config, overrides: dict) -> None:
    """Set config fields (``context_window_size=1024``) with type checks."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(config)}
    for key, value in overrides.items():
        if key not in fields or key == "kwargs":
            from ..errors import UnknownNameError, did_you_mean

            raise UnknownNameError(
                f"unknown override '{key}'{did_you_mean(key, fields)}; valid: {', '.join(sorted(k for k in fields if k != 'kwargs'))}"
            )
        if key in POSITIVE_FIELDS and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{key} must be positive, got {value!r}")
        setattr(config, key, value)
    if overrides:
        config.__post_init__()


def check_supported(arch: ArchitectureSpec, config) -> None:
    """Refuse config values the architecture declares it cannot honour."""
    window = getattr(config, "sliding_window_size", None)
    if isinstance(window, int) and window > 0 and not arch.sliding_window_attention:
        raise ConfigError(
            f"sliding_window_size={window}: architecture '{arch.name}'"
            f"{f' ({arch.package})' if arch.package else ''} does not implement sliding-window attention; "
            "leave --sliding-window-size unset (or -1)"
        )


def parse_overrides(text: str | None) -> dict:
    """``"context_window_size=1024;prefill_chunk_size=128"`` -> dict with ints/floats/bools."""
    out: dict = {}
    for item in (text or "").replace(",", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        out[key] = parse_value(value)
    return out


def parse_value(value: str):
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def build_model(arch: ArchitectureSpec, config, quant: QuantizationSpec, target=None) -> BuiltModel:
    model = arch.model_factory(config)
    model.to(quant.scheme.model_dtype)
    model.kv_cache_dtype = kv_dtype(quant.scheme)
    float_params = [(name, tuple(int(s) for s in p.shape), p.dtype) for name, p in model.named_parameters()]
    plan = quant.scheme.quantize_model(model)
    if target is not None:
        model.target = target
    return BuiltModel(arch, config, quant, model, float_params, plan)
