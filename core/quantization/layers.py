"""Quantized layers (TVM side of :mod:`kiln.quantization.group`) and the layer swap.

Each quantized layer computes with dequantization fused into its kernel: one reduction for a
projection (``q_matmul``), one gather for an embedding (``q_take``).
"""

from __future__ import annotations

from functools import partial

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..modeling import Embedding, Linear


def _dequant(q_weight, q_scale, q_min, row, word, lane, bits: int, group_size: int):
    """One weight: ``(code - max_int) * scale`` (symmetric) or ``code * scale + min``."""
    per_word = 32 // bits
    code = (q_weight[row, word] >> (lane.astype("uint32") * tirx.const(bits, "uint32"))) & tirx.const(
        (1 << bits) - 1, "uint32"
    )
    group = word // (group_size // per_word)
    scale = q_scale[row, group].astype("float32")
    if q_min is None:
        return (code.astype("float32") - tirx.const((1 << (bits - 1)) - 1, "float32")) * scale
    return code.astype("float32") * scale + q_min[row, group].astype("float32")


def q_dense(x: te.Tensor, q_weight: te.Tensor, q_scale: te.Tensor, q_min: te.Tensor | None = None, *,
            bits: int, group_size: int):
    """``x[..., K] @ dequant(q_weight, q_scale[, q_min])[N, K].T`` with float32 accumulation.

    Two reduction axes (packed word, lane within the word) keep the unpacking cheap.
    """
    *batch, k_dim = x.shape
    per_word = 32 // bits
    n_dim = q_weight.shape[0]
    words = te.reduce_axis((0, k_dim // per_word), name="kw")
    lane = te.reduce_axis((0, per_word), name="j")
    out = te.compute(
        (*batch, n_dim),
        lambda *i: te.sum(
            x[(*i[:-1], words * per_word + lane)].astype("float32")
            * _dequant(q_weight, q_scale, q_min, i[-1], words, lane, bits, group_size),
            axis=[words, lane],
        ),
        name="q_matmul",
    )
    if x.dtype != "float32":
        out = te.compute(out.shape, lambda *i: out[i].astype(x.dtype), name="q_matmul_cast")
    return out


def q_take(ids: te.Tensor, q_weight: te.Tensor, q_scale: te.Tensor, q_min: te.Tensor | None = None, *,
           bits: int, group_size: int, dim: int, dtype: str):
    """Rows ``ids`` of the dequantized embedding table: ``[n, dim]``."""
    per_word = 32 // bits
    last = q_weight.shape[0] - 1

    def row(s):  # clipped, like kiln.modeling.take: a bad id never reads out of bounds
        return tirx.max(tirx.min(ids[s], last.astype(ids.dtype)), tirx.const(0, ids.dtype))

    return te.compute(
        (ids.shape[0], dim),
        lambda s, h: _dequant(q_weight, q_scale, q_min, row(s), h // per_word, h % per_word, bits,
                              group_size).astype(dtype),
        name="q_take",
    )


class _Quantized(nn.Module):
    """The stored tensors of one quantized ``[rows, cols]`` weight."""

    def _init_storage(self, rows: int, cols: int, scheme):
        self.bits, self.group_size = scheme.bits, scheme.group_size
        groups = cols // scheme.group_size
        self.q_weight = nn.Parameter((rows, cols * scheme.bits // 32), "uint32")
        self.q_scale = nn.Parameter((rows, groups), scheme.scale_dtype)
        self.q_min = None if scheme.symmetric else nn.Parameter((rows, groups), scheme.scale_dtype)

    def _storage(self) -> list:
        return [self.q_weight, self.q_scale] + ([self.q_min] if self.q_min is not None else [])

    def _matmul(self, x: Tensor) -> Tensor:
        fn = partial(q_dense, bits=self.bits, group_size=self.group_size)
        return op.tensor_expr_op(fn, "q_matmul", [x, *self._storage()])


class QuantLinear(_Quantized):
    def __init__(self, linear: Linear, scheme):
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self._init_storage(linear.out_features, linear.in_features, scheme)
        self.bias = nn.Parameter((linear.out_features,), scheme.model_dtype) if linear.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        y = self._matmul(x)
        if self.bias is not None:
            y = y + self.bias
        return y

    def to(self, dtype: str | None = None) -> None:  # quantized storage keeps its dtypes
        if self.bias is not None and dtype is not None:
            self.bias.to(dtype)


class QuantEmbedding(_Quantized):
    def __init__(self, embedding: Embedding, scheme):
        self.num, self.dim = embedding.num, embedding.dim
        self.dtype = scheme.model_dtype
        self._init_storage(self.num, self.dim, scheme)

    def forward(self, input_ids: Tensor) -> Tensor:
        fn = partial(q_take, bits=self.bits, group_size=self.group_size, dim=self.dim, dtype=self.dtype)
        return op.tensor_expr_op(fn, "q_take", [input_ids, *self._storage()])

    def lm_head_forward(self, x: Tensor) -> Tensor:
        return self._matmul(x)

    def to(self, dtype: str | None = None) -> None:
        if dtype is not None:
            self.dtype = dtype


def _children(module: nn.Module, prefix: str):
    """``(owner, key, child, dotted name)`` for every direct submodule."""
    if isinstance(module, nn.ModuleList):
        for i, child in enumerate(module):
            yield module, i, child, f"{prefix}{i}"
        return
    for key, child in list(vars(module).items()):
        if isinstance(child, nn.Module):
            yield module, key, child, f"{prefix}{key}"


def swap_layers(model: nn.Module, scheme) -> dict:
    """Replace quantizable layers of ``model`` in place; return the quantize plan."""
    plan = {}
    embed_scheme = scheme.embedding or scheme  # embeddings (and a tied LM head) may use other bits

    def visit(module: nn.Module, prefix: str):
        for owner, key, child, name in _children(module, prefix):
            replacement = None
            if isinstance(child, Linear) and child.in_features % scheme.group_size == 0:
                replacement = QuantLinear(child, scheme)
            elif isinstance(child, Embedding) and child.dim % embed_scheme.group_size == 0:
                replacement = QuantEmbedding(child, embed_scheme)
            if replacement is None:
                visit(child, name + ".")
                continue
            if isinstance(owner, nn.ModuleList):
                owner[key] = replacement
            else:
                setattr(owner, key, replacement)
            weight_name = f"{name}.weight"
            used = embed_scheme if isinstance(replacement, QuantEmbedding) else scheme
            plan[weight_name] = partial(used.quantize_weight, name=weight_name)

    visit(model, "")
    return plan
