"""The config every decoder-only model shares (no TVM import, so configs load fast)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError

# Defaults a user can change with gen_config options or compile-time overrides.
DEFAULT_PREFILL_CHUNK = 2048
DEFAULT_MAX_BATCH = 8
MAX_DEFAULT_CONTEXT = 8192  # the default window is the model's, capped so the KV cache fits a laptop


@dataclass
class ModelConfig:
    """The fields kiln's runtime needs from every decoder-only model.

    ``from_dict`` takes a Hugging Face ``config.json`` (or a saved ``model_config``); fields a
    subclass does not declare are kept in ``kwargs`` so nothing of the checkpoint is lost.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 0
    head_dim: int = 0
    max_position_embeddings: int = 2048
    context_window_size: int = 0
    prefill_chunk_size: int = 0
    max_batch_size: int = DEFAULT_MAX_BATCH
    sliding_window_size: int = -1
    attention_sink_size: int = -1
    tensor_parallel_shards: int = 1
    tie_word_embeddings: bool = False
    kwargs: dict = field(default_factory=dict)

    # HF names that mean the same as ours
    aliases = {
        "n_embd": "hidden_size",
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
        "n_positions": "max_position_embeddings",
    }

    @classmethod
    def from_dict(cls, source: Mapping[str, Any]) -> "ModelConfig":
        src = dict(source)
        for alias, name in cls.aliases.items():
            if alias in src and name not in src:
                src[name] = src[alias]
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in src.items() if k in names and k != "kwargs"}
        extra = dict(src.get("kwargs") or {})
        extra.update({k: v for k, v in src.items() if k not in names})
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in known
        ]
        if missing:
            raise ConfigError(f"config.json lacks required field(s) for {cls.__name__}: {', '.join(missing)}")
        try:
            return cls(**known, kwargs=extra)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid model config: {exc}") from None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if not self.num_key_value_heads:
            self.num_key_value_heads = self.num_attention_heads
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if not self.context_window_size:
            self.context_window_size = min(self.max_position_embeddings, MAX_DEFAULT_CONTEXT)
        if not self.prefill_chunk_size:
            self.prefill_chunk_size = min(self.context_window_size, DEFAULT_PREFILL_CHUNK)
        self.prefill_chunk_size = min(self.prefill_chunk_size, self.context_window_size)
        for name in ("context_window_size", "prefill_chunk_size", "max_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "kwargs"}
        out["kwargs"] = dict(self.kwargs)
        return out

    # what the KV cache needs; architectures with other RoPE override these
    rope_mode = "normal"  # "normal" (rotate k before caching) or "inline"

    def rope(self) -> tuple[float, float, dict]:
        """``(theta, position scale, rope_scaling dict for TVM)``."""
        return 10000.0, 1.0, {}
