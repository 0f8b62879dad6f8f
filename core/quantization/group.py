"""Group quantization (``q4f16_1``, ``q4f32_1``): MLC's layout.

A float weight ``W[N, K]`` is cut into groups of ``group_size`` (32) along K.  Per group,
``scale = max|w| / max_int`` (``max_int`` = 7 for 4 bits) is stored in the scale dtype, and each
weight becomes the code ``clamp(round(w / scale + max_int), 0, 2 * max_int)``.  Eight 4-bit
codes are packed per uint32, lowest bits first.  Stored tensors: ``<name>.q_weight`` uint32
``[N, K / 8]`` and ``<name>.q_scale`` ``[N, K / 32]``.  Dequantization,
``(code - max_int) * scale``, is fused into the matmul and embedding kernels.

Layers whose K is not a multiple of the group size stay unquantized (in the model dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import QuantizePlan


def quantize_q4(weight: np.ndarray, group_size: int = 32, scale_dtype: str = "float16", bits: int = 4):
    """Quantize ``weight[N, K]`` -> ``(codes uint8 [N, K], scales [N, K / group_size])``.

    The scale is rounded to its storage dtype *before* the codes are computed, so dequantizing
    with the stored scale is as exact as the codes allow.
    """
    w = np.asarray(weight, dtype=np.float32)
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    max_int = (1 << (bits - 1)) - 1
    groups = w.reshape(n, k // group_size, group_size)
    scale = (np.abs(groups).max(axis=-1) / np.float32(max_int)).astype(scale_dtype)
    s32 = scale.astype(np.float32)[..., None]
    safe = np.where(s32 == 0, np.float32(1), s32)
    codes = np.clip(np.round(groups / safe + np.float32(max_int)), 0, 2 * max_int)
    codes = np.where(s32 == 0, np.float32(max_int), codes)
    return codes.astype(np.uint8).reshape(n, k), scale


def pack_q4(codes: np.ndarray, bits: int = 4) -> np.ndarray:
    """Pack ``codes[N, K]`` (values < 2**bits) into uint32 words, lowest bits first."""
    per_word = 32 // bits
    n, k = codes.shape
    c = codes.astype(np.uint32).reshape(n, k // per_word, per_word)
    shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(bits))
    return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint32)


def unpack_q4(packed: np.ndarray, bits: int = 4) -> np.ndarray:
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(bits)
    codes = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_word)


def dequantize_q4(packed: np.ndarray, scale: np.ndarray, group_size: int = 32, bits: int = 4) -> np.ndarray:
    """The float32 weight ``[N, K]`` that ``packed``/``scale`` stand for."""
    max_int = (1 << (bits - 1)) - 1
    codes = unpack_q4(packed, bits).astype(np.float32) - np.float32(max_int)
    return codes * np.repeat(scale.astype(np.float32), group_size, axis=-1)


@dataclass(frozen=True)
class GroupQuant:
    """Symmetric group quantization of linear and embedding weights."""

    bits: int = 4
    group_size: int = 32
    model_dtype: str = "float16"
    scale_dtype: str = "float16"
    kind: str = "group-quant"

    def quantize_weight(self, weight: np.ndarray, name: str) -> dict[str, np.ndarray]:
        codes, scale = quantize_q4(weight, self.group_size, self.scale_dtype, self.bits)
        base = name[: -len(".weight")]
        return {f"{base}.q_weight": pack_q4(codes, self.bits), f"{base}.q_scale": scale}

    def quantize_model(self, model) -> QuantizePlan:
        from .layers import swap_layers

        return swap_layers(model, self)
