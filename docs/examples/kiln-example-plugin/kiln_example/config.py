"""Qwen2's config and weight mapping: no TVM here, so listing and gen_config stay fast."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.model_config import ModelConfig
from kiln.specs import WeightSource


@dataclass
class Qwen2Config(ModelConfig):
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_parameters: dict | None = None

    def rope(self):
        theta = (self.rope_parameters or {}).get("rope_theta", self.rope_theta)
        return float(theta), 1.0, {}


def weight_map(config: Qwen2Config) -> dict[str, WeightSource]:
    """q/k/v (with their biases) and gate/up are fused; everything else keeps its HF name."""
    out = {}
    for i in range(config.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for kind in ("weight", "bias"):
            out[f"{attn}qkv_proj.{kind}"] = WeightSource(tuple(f"{attn}{p}_proj.{kind}" for p in "qkv"))
        out[f"{mlp}gate_up_proj.weight"] = WeightSource((f"{mlp}gate_proj.weight", f"{mlp}up_proj.weight"))
    return out
