"""Llama-family config and weight mapping (no TVM import: gen_config and listings stay fast)."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import ConfigError
from kiln.model_config import ModelConfig
from kiln.specs import WeightSource


@dataclass
class LlamaConfig(ModelConfig):
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None  # transformers >= 5 writes theta and scaling here
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    def __post_init__(self):
        if not self.intermediate_size:
            raise ConfigError("config.json lacks 'intermediate_size'")
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act '{self.hidden_act}' is not supported by kiln-llama (only silu)")
        if self.sliding_window and not self.context_window_size:
            # Mistral-style sliding-window attention is not implemented: stay inside the window,
            # where it is the same as full attention.
            self.context_window_size = min(self.max_position_embeddings, self.sliding_window)
        super().__post_init__()
        self.rope()  # validate the scaling type now, not at compile time

    def _rope_fields(self) -> tuple[float, dict]:
        if self.rope_parameters:
            params = dict(self.rope_parameters)
            theta = float(params.pop("rope_theta", self.rope_theta))
            return theta, params
        return float(self.rope_theta), dict(self.rope_scaling or {})

    def rope(self) -> tuple[float, float, dict]:
        theta, scaling = self._rope_fields()
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind in (None, "default"):
            return theta, 1.0, {}
        if kind == "linear":
            return theta, 1.0 / float(scaling["factor"]), {}
        if kind == "llama3":
            try:
                return theta, 1.0, {
                    "rope_type": "llama3",
                    "factor": float(scaling["factor"]),
                    "low_freq_factor": float(scaling["low_freq_factor"]),
                    "high_freq_factor": float(scaling["high_freq_factor"]),
                    "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
                }
            except KeyError as exc:
                raise ConfigError(f"llama3 rope_scaling lacks {exc}") from None
        raise ConfigError(f"rope scaling type '{kind}' is not supported by kiln-llama (supported: default, linear, llama3)")


def weight_map(config: LlamaConfig) -> dict[str, WeightSource]:
    """Only what differs from the checkpoint: q/k/v and gate/up are fused."""
    out = {}
    for i in range(config.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for kind in ("weight", "bias") if config.attention_bias else ("weight",):
            out[f"{attn}qkv_proj.{kind}"] = WeightSource(tuple(f"{attn}{p}_proj.{kind}" for p in "qkv"))
        for kind in ("weight", "bias") if config.mlp_bias else ("weight",):
            out[f"{mlp}gate_up_proj.{kind}"] = WeightSource((f"{mlp}gate_proj.{kind}", f"{mlp}up_proj.{kind}"))
    return out
