"""Dequantize GGUF (ggml) tensor data to float32 with vectorized numpy.

A GGUF tensor stores its rows as a run of fixed-size *blocks*; each block format packs
``block_size`` values into ``type_size`` bytes (a float16 scale and small integer codes, for the
quantized ones).  :func:`dequantize` turns the raw bytes of one tensor into a float32 array a
bounded slice at a time, so memory stays near the size of the result.

The arithmetic follows ggml's reference dequantizers operation for operation (float32 products
of float16 scales and integer codes, in the same order), so the values are bit-identical to
``gguf.quants.dequantize``.

Formats: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (blocks of 32) and the k-quants Q4_K,
Q5_K, Q6_K (super-blocks of 256 in 8 or 16 sub-blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import CheckpointError

QK = 32  # values per block of the classic formats
QK_K = 256  # values per super-block of the k-quants
CHUNK_VALUES = 1 << 20  # values decoded per step (bounds the temporaries to a few MB)


@dataclass(frozen=True)
class BlockFormat:
    """How one ggml type packs values: ``decode`` maps ``(n, type_size)`` bytes to ``(n, block_size)`` floats."""

    name: str
    block_size: int
    type_size: int
    decode: Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------- helpers
def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The little-endian float16 at byte ``at`` of every block, as a float32 column ``(n, 1)``."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """``(n, k)`` bytes -> ``(n, 2k)`` codes: the low nibbles of all bytes, then the high nibbles."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1)


def _high_bits(packed: np.ndarray) -> np.ndarray:
    """``(n, 4)`` bytes -> ``(n, 32)`` bits, bit ``j`` of the little-endian 32-bit word first."""
    return np.unpackbits(packed, axis=1, bitorder="little")


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and eight 6-bit mins of a Q4_K/Q5_K super-block (12 bytes each).

    Bytes 0-3 hold scales 0-3 in their low six bits, bytes 4-7 the mins 0-3; scales and mins 4-7
    take their low four bits from the nibbles of bytes 8-11 and their top two bits from the
    otherwise unused top bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    lo_sc, lo_min, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([lo_sc & 0x3F, (rest & 0x0F) | ((lo_sc >> 6) << 4)], axis=1)
    mins = np.concatenate([lo_min & 0x3F, (rest >> 4) | ((lo_min >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


# ----------------------------------------------------------------------------- 32-value blocks
def _q8_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16, then 32 int8 codes; x = code * d
    codes = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.float32)
    return codes * _f16(blocks, 0)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16, then 16 bytes of 4-bit codes; x = d * (code - 8)
    codes = _nibbles(blocks[:, 2:18]).astype(np.float32) - np.float32(8)
    return _f16(blocks, 0) * codes


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    # d, m: f16, then 16 bytes of 4-bit codes; x = d * code + m
    codes = _nibbles(blocks[:, 4:20]).astype(np.float32)
    return _f16(blocks, 0) * codes + _f16(blocks, 2)


def _five_bit_codes(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    return _nibbles(low) | (_high_bits(high) << 4)


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16, 4 bytes of fifth bits, 16 bytes of low nibbles; x = d * (code - 16)
    codes = _five_bit_codes(blocks[:, 2:6], blocks[:, 6:22]).astype(np.float32) - np.float32(16)
    return _f16(blocks, 0) * codes


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    # d, m: f16, 4 bytes of fifth bits, 16 bytes of low nibbles; x = d * code + m
    codes = _five_bit_codes(blocks[:, 4:8], blocks[:, 8:24]).astype(np.float32)
    return _f16(blocks, 0) * codes + _f16(blocks, 2)


# ----------------------------------------------------------------------------- k-quants
def _k_low_nibbles(packed: np.ndarray) -> np.ndarray:
    """128 bytes -> ``(n, 8, 32)`` codes: each run of 32 bytes holds sub-block 2i (low nibbles)
    and sub-block 2i+1 (high nibbles)."""
    runs = packed.reshape(len(packed), 4, 1, 32)
    return np.concatenate([runs & 0x0F, runs >> 4], axis=2).reshape(len(packed), 8, 32)


def _affine_k(blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """x = (d * scale) * code - (dmin * min), per sub-block of 32."""
    scales, mins = _k_scales(blocks[:, 4:16])
    step = (_f16(blocks, 0) * scales)[:, :, None]
    offset = (_f16(blocks, 2) * mins)[:, :, None]
    return (step * codes.astype(np.float32) - offset).reshape(len(blocks), QK_K)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    # d, dmin: f16; 12 bytes of 6-bit scales/mins; 128 bytes of 4-bit codes
    return _affine_k(blocks, _k_low_nibbles(blocks[:, 16:144]))


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    # d, dmin: f16; 12 bytes of scales/mins; 32 bytes of fifth bits (bit s of byte l belongs to
    # value l of sub-block s); 128 bytes of low nibbles
    fifth = (blocks[:, 16:48, None] >> np.arange(8, dtype=np.uint8)) & 1  # (n, 32 values, 8 sub-blocks)
    codes = _k_low_nibbles(blocks[:, 48:176]) | (fifth.transpose(0, 2, 1) << 4)
    return _affine_k(blocks, codes)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    # 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales, d: f16.
    # Each half of 128 values reads 64 low-nibble bytes (rows j = 0, 1 of 32) and 32 high bytes:
    # value group g = 2 * nibble + j takes bits 2g..2g+1 of the high byte.
    n = len(blocks)
    low = blocks[:, 0:128].reshape(n, 2, 1, 2, 32)
    low = np.concatenate([low & 0x0F, low >> 4], axis=2).reshape(n, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 0x03
    codes = ((low | (high << 4)).astype(np.int16) - 32).astype(np.float32).reshape(n, 16, 16)
    scales = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    step = (_f16(blocks, 208) * scales)[:, :, None]
    return (step * codes).reshape(n, QK_K)


# ----------------------------------------------------------------------------- plain floats
def _f32(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks).view("<f4")


def _f16_values(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks).view("<f2").astype(np.float32)


def _bf16(blocks: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32
    return (np.ascontiguousarray(blocks).view("<u2").astype(np.uint32) << 16).view(np.float32)


# ggml type id -> format (ids as in ggml.h / gguf.GGMLQuantizationType)
FORMATS: dict[int, BlockFormat] = {
    0: BlockFormat("F32", 1, 4, _f32),
    1: BlockFormat("F16", 1, 2, _f16_values),
    2: BlockFormat("Q4_0", QK, 2 + 16, _q4_0),
    3: BlockFormat("Q4_1", QK, 4 + 16, _q4_1),
    6: BlockFormat("Q5_0", QK, 2 + 4 + 16, _q5_0),
    7: BlockFormat("Q5_1", QK, 4 + 4 + 16, _q5_1),
    8: BlockFormat("Q8_0", QK, 2 + 32, _q8_0),
    12: BlockFormat("Q4_K", QK_K, 4 + 12 + 128, _q4_k),
    13: BlockFormat("Q5_K", QK_K, 4 + 12 + 32 + 128, _q5_k),
    14: BlockFormat("Q6_K", QK_K, 128 + 64 + 16 + 2, _q6_k),
    30: BlockFormat("BF16", 1, 2, _bf16),
}


def type_name(type_id: int) -> str:
    """ggml's name of a tensor type (``Q4_K``), also for types kiln cannot read."""
    fmt = FORMATS.get(int(type_id))
    if fmt is not None:
        return fmt.name
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(int(type_id)).name
    except (ImportError, ValueError):
        return f"type {int(type_id)}"


def supported_types() -> list[str]:
    return [fmt.name for fmt in FORMATS.values()]


def dequantize(raw: np.ndarray, type_id: int, shape: tuple[int, ...], tensor: str = "tensor") -> np.ndarray:
    """The float32 values of a tensor of ggml type ``type_id`` stored in the bytes ``raw``.

    ``shape`` is numpy order (the GGUF dimensions reversed); its last axis holds whole blocks.
    Raises :class:`CheckpointError` naming ``tensor`` for a type kiln cannot read or bytes that
    do not fit the shape.
    """
    fmt = FORMATS.get(int(type_id))
    if fmt is None:
        raise CheckpointError(
            f"tensor '{tensor}' has type {type_name(type_id)}, which kiln cannot read "
            f"(supported: {', '.join(supported_types())}); use a GGUF file quantized with one of those"
        )
    shape = tuple(int(s) for s in shape)
    count = int(np.prod(shape, dtype=np.int64))
    row = shape[-1] if shape else 1
    if row % fmt.block_size:
        raise CheckpointError(
            f"tensor '{tensor}' ({fmt.name}) has rows of {row} values, not a multiple of its block size {fmt.block_size}; "
            "the file is corrupt"
        )
    n_blocks = count // fmt.block_size
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size != n_blocks * fmt.type_size:
        raise CheckpointError(
            f"tensor '{tensor}' ({fmt.name}{list(shape)}) needs {n_blocks * fmt.type_size} bytes but the file holds "
            f"{raw.size}; the file is truncated or corrupt"
        )
    blocks = raw.reshape(n_blocks, fmt.type_size)
    out = np.empty((n_blocks, fmt.block_size), dtype=np.float32)
    step = max(1, CHUNK_VALUES // fmt.block_size)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        out[start:stop] = fmt.decode(blocks[start:stop]).reshape(stop - start, fmt.block_size)
    return out.reshape(shape)


__all__ = ["BlockFormat", "FORMATS", "dequantize", "supported_types", "type_name"]
