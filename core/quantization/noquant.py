"""No quantization (``q0f32``, ``q0f16``): weights stored and computed in the model dtype."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NoQuant:
    model_dtype: str = "float32"
    kind: str = "no-quant"

    def quantize_model(self, model) -> dict:
        return {}
