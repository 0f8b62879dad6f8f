"""Group quantization: a float weight ``W[N, K]`` is cut into groups of ``group_size`` (32)
along K; each group stores low-bit codes and a float scale (and, asymmetric, a float minimum).

Symmetric (``q4f16_1``, ``q4f32_1``: MLC's layout): ``scale = max|w| / max_int`` (``max_int`` =
7 for 4 bits), code ``clamp(round(w / scale + max_int), 0, 2 * max_int)``, weight
``(code - max_int) * scale``.

Asymmetric (``q4f16_2``, ``q4f32_2``: llama.cpp's Q4_1 layout): ``min = min(w)``,
``scale = (max(w) - min) / (2**bits - 1)``, code ``clamp(round((w - min) / scale), 0, 2**bits - 1)``,
weight ``code * scale + min``.  It uses all 16 levels and fits skewed groups, and a GGUF Q4_1
file converts into it without loss.

Codes are packed ``32 / bits`` per uint32, lowest bits first.  Stored tensors:
``<name>.q_weight`` uint32 ``[N, K * bits / 32]``, ``<name>.q_scale`` ``[N, K / group_size]``
and, asymmetric, ``<name>.q_min`` of the same shape.  Scale and minimum are rounded to their
storage dtype before the codes are computed, so the stored values reproduce the codes' grid.
Dequantization is fused into the matmul and embedding kernels.  Layers whose K is not a
multiple of the group size stay unquantized (in the model dtype).

A scheme may quantize embedding tables (and so a tied LM head) differently from the linear
layers (``GroupQuant.embedding``): ``q4f*_2`` keep them at 8 bits, symmetric, llama.cpp's Q8_0
grid, as llama.cpp's own Q4 files do, because the output layer is the most sensitive one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import QuantizePlan


def quantize_groups(weight: np.ndarray, group_size: int = 32, scale_dtype: str = "float16", bits: int = 4,
                    symmetric: bool = True):
    """``weight[N, K]`` -> ``(codes uint8 [N, K], scale [N, K / g], minimum [N, K / g] | None)``."""
    w = np.asarray(weight, dtype=np.float32)
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    groups = w.reshape(n, k // group_size, group_size)
    if symmetric:
        max_int = (1 << (bits - 1)) - 1
        scale = (np.abs(groups).max(axis=-1) / np.float32(max_int)).astype(scale_dtype)
        s32 = scale.astype(np.float32)[..., None]
        safe = np.where(s32 == 0, np.float32(1), s32)
        codes = np.clip(np.round(groups / safe + np.float32(max_int)), 0, 2 * max_int)
        codes = np.where(s32 == 0, np.float32(max_int), codes)
        return codes.astype(np.uint8).reshape(n, k), scale, None
    levels = (1 << bits) - 1
    lo = groups.min(axis=-1)
    minimum = lo.astype(scale_dtype)
    m32 = minimum.astype(np.float32)[..., None]
    scale = ((groups.max(axis=-1) - minimum.astype(np.float32)) / np.float32(levels)).astype(scale_dtype)
    s32 = scale.astype(np.float32)[..., None]
    safe = np.where(s32 == 0, np.float32(1), s32)
    codes = np.clip(np.round((groups - m32) / safe), 0, levels)
    codes = np.where(s32 == 0, np.float32(0), codes)
    return codes.astype(np.uint8).reshape(n, k), scale, minimum


def pack_codes(codes: np.ndarray, bits: int = 4) -> np.ndarray:
    """Pack ``codes[N, K]`` (values < 2**bits) into uint32 words, lowest bits first."""
    per_word = 32 // bits
    n, k = codes.shape
    c = codes.astype(np.uint32).reshape(n, k // per_word, per_word)
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(bits)
    return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint32)


def unpack_codes(packed: np.ndarray, bits: int = 4) -> np.ndarray:
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(bits)
    codes = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_word)


def dequantize_groups(packed: np.ndarray, scale: np.ndarray, minimum: np.ndarray | None = None,
                      group_size: int = 32, bits: int = 4) -> np.ndarray:
    """The float32 weight ``[N, K]`` that the stored tensors stand for."""
    codes = unpack_codes(packed, bits).astype(np.float32)
    s = np.repeat(scale.astype(np.float32), group_size, axis=-1)
    if minimum is None:
        return (codes - np.float32((1 << (bits - 1)) - 1)) * s
    return codes * s + np.repeat(minimum.astype(np.float32), group_size, axis=-1)


@dataclass(frozen=True)
class GroupQuant:
    """Group quantization of linear and embedding weights (see the module docstring)."""

    bits: int = 4
    group_size: int = 32
    model_dtype: str = "float16"
    scale_dtype: str = "float16"
    symmetric: bool = True
    embedding: "GroupQuant | None" = None  # the scheme of embedding tables (default: this one)
    # Keys and values are cached in float16 (llama.cpp's default): half the memory per token, and
    # batched decode attention, which streams every request's cache, reads half the bytes.  The
    # rounding (2**-11 relative) is far below the 4-bit weights'.
    kv_cache_dtype: str = "float16"
    kind: str = "group-quant"

    def quantize_weight(self, weight: np.ndarray, name: str) -> dict[str, np.ndarray]:
        codes, scale, minimum = quantize_groups(weight, self.group_size, self.scale_dtype, self.bits, self.symmetric)
        base = name[: -len(".weight")]
        out = {f"{base}.q_weight": pack_codes(codes, self.bits), f"{base}.q_scale": scale}
        if minimum is not None:
            out[f"{base}.q_min"] = minimum
        return out

    def quantize_model(self, model) -> QuantizePlan:
        from .layers import swap_layers

        return swap_layers(model, self)
