"""kiln's built-in quantization schemes, registered through the ordinary hook."""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..specs import QuantizationSpec
from .group import GroupQuant
from .noquant import NoQuant


def _q4_2(model_dtype: str) -> GroupQuant:
    embedding = GroupQuant(bits=8, group_size=32, model_dtype=model_dtype, scale_dtype="float16")
    return GroupQuant(bits=4, group_size=32, model_dtype=model_dtype, scale_dtype="float16", symmetric=False,
                      embedding=embedding)


@hookimpl
def register_quantizations():
    return [
        QuantizationSpec("q0f32", NoQuant("float32"), "no quantization, float32 weights and compute"),
        QuantizationSpec("q0f16", NoQuant("float16"), "no quantization, float16 weights and compute"),
        QuantizationSpec(
            "q4f16_1",
            GroupQuant(bits=4, group_size=32, model_dtype="float16", scale_dtype="float16"),
            "4-bit weights in groups of 32 with float16 scales; float16 compute (MLC's q4f16_1)",
        ),
        QuantizationSpec(
            "q4f32_1",
            GroupQuant(bits=4, group_size=32, model_dtype="float32", scale_dtype="float32"),
            "4-bit weights in groups of 32 with float32 scales; float32 compute",
        ),
        QuantizationSpec(
            "q4f16_2",
            _q4_2("float16"),
            "4-bit weights in groups of 32 with float16 scale and minimum (llama.cpp's Q4_1 layout), 8-bit "
            "embeddings (Q8_0 layout); float16 compute",
        ),
        QuantizationSpec(
            "q4f32_2",
            _q4_2("float32"),
            "4-bit weights in groups of 32 with float16 scale and minimum (llama.cpp's Q4_1 layout), 8-bit "
            "embeddings (Q8_0 layout); float32 compute",
        ),
    ]
