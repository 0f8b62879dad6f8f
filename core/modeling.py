"""Building blocks every architecture plugin shares.

An architecture plugin writes its config (a :class:`ModelConfig` subclass) and its layers; the
compiled entry points, the paged KV cache and the layers whose kernels kiln controls (linear,
embedding) live here, so a model file reads like MLC's: config, modules top-down, nothing else.

Compiled entry points (the runtime's contract; all take the packed parameters last):
    ``embed(input_ids[n]) -> [n, hidden]``
    ``batch_prefill(input_embeds[1, n, hidden], logit_positions[b], kv) -> (logits[1, b, vocab], kv)``
        runs ``n`` new tokens of one or more sequences (the sequences and their lengths are given
        to the KV cache by ``begin_forward``) and returns the logits at the given token positions.
    ``batch_decode(input_embeds[b, 1, hidden], kv) -> (logits[b, 1, vocab], kv)``
    ``create_paged_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
        support_sliding_window) -> kv``
"""

from __future__ import annotations

import math

from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.core import wrap_nested
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from .model_config import ModelConfig


# ----------------------------------------------------------------------------- kernels
ROPE_KERNEL = "tir_split_rotary"  # TVM's name for the KV cache's RoPE kernel (q/k/v split + rotation)
ROPE_ATTR = "kiln.rope"


def _annotate_rope(theta: float, scale: float, scaling: dict, rotary_dim: int) -> None:
    """Record on TVM's RoPE kernel the parameters it was built from (``kiln.rope``: JSON of
    ``theta``, ``scale``, ``rope_scaling``, ``rotary_dim``), so a backend can replace the kernel
    with its own, computing the same frequencies (the CPU backend does)."""
    import json

    bb = relax.BlockBuilder.current()
    if bb is None:
        return
    mod = bb.get()
    for gv, func in mod.functions_items():
        if gv.name_hint == ROPE_KERNEL and isinstance(func, tirx.PrimFunc):
            record = {"theta": theta, "scale": scale, "rope_scaling": scaling, "rotary_dim": rotary_dim}
            bb.update_func(gv, func.with_attr(ROPE_ATTR, json.dumps(record, sort_keys=True)))


def _reduce_dtype(dtype: str) -> str:
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def dense(x: te.Tensor, weight: te.Tensor):
    """``x[..., K] @ weight[N, K].T`` as one reduction (float32 accumulation)."""
    *batch, k_dim = x.shape
    n_dim = weight.shape[0]
    acc = _reduce_dtype(x.dtype)
    k = te.reduce_axis((0, k_dim), name="k")
    out = te.compute(
        (*batch, n_dim),
        lambda *i: te.sum(x[(*i[:-1], k)].astype(acc) * weight[i[-1], k].astype(acc), axis=k),
        name="matmul",
    )
    if acc != x.dtype:
        out = te.compute(out.shape, lambda *i: out[i].astype(x.dtype), name="matmul_cast")
    return out


_EXP2_COEFFS = [math.log(2) ** n / math.factorial(n) for n in range(8)]  # 2**f on [-1/2, 1/2]: error < 1e-8


def _pow2(i):
    """``2**i`` for an integral float32 ``i`` in [-126, 127], from the exponent bits."""
    return tirx.reinterpret("float32", tirx.shift_left(i.astype("int32") + 127, 23))


def fast_exp2(x):
    """``2**x`` (float32 TIR expression) in plain arithmetic: round ``x`` to an integer ``i`` and
    a fraction ``f`` in [-1/2, 1/2], a degree-7 series for ``2**f``, ``i`` put into the
    exponent.  Relative error below 3e-7; inputs below -126 give ``2**-126`` (~1e-38)."""
    x = tirx.max(tirx.min(x, tirx.const(127.0, "float32")), tirx.const(-126.0, "float32"))
    i = tirx.round(x)
    f = x - i
    p = tirx.const(_EXP2_COEFFS[-1], "float32")
    for c in reversed(_EXP2_COEFFS[:-1]):
        p = p * f + tirx.const(c, "float32")
    return p * _pow2(i)


_LN2_HI, _LN2_LO = 0.693145751953125, 1.4286068203094172e-06  # ln 2 = hi + lo, hi exact in 16 bits
_EXP_COEFFS = [1.0 / math.factorial(n) for n in range(8)]  # e**r on [-ln2/2, ln2/2]: error < 1e-8


def fast_exp(x):
    """``e**x`` (float32 TIR expression) in plain arithmetic: ``x = i ln2 + r`` (Cody-Waite, two
    constants), a degree-7 series for ``e**r``, ``i`` put into the exponent.  Relative error
    below 3e-7 over [-87, 88] (the float32 range; clamped outside).  Vector code computes it
    lane-parallel, where ``exp`` would be one library call per lane on a CPU (TVM's LLVM
    pipeline has no vector math library)."""
    x = tirx.max(tirx.min(x, tirx.const(88.0, "float32")), tirx.const(-87.0, "float32"))
    i = tirx.round(x * tirx.const(1 / math.log(2), "float32"))
    r = (x - i * tirx.const(_LN2_HI, "float32")) - i * tirx.const(_LN2_LO, "float32")
    p = tirx.const(_EXP_COEFFS[-1], "float32")
    for c in reversed(_EXP_COEFFS[:-1]):
        p = p * r + tirx.const(c, "float32")
    return p * _pow2(i)


def _swiglu(gate_up: te.Tensor):
    *batch, two_i = gate_up.shape
    inter = two_i // 2

    def value(*idx):
        gate = gate_up[(*idx[:-1], idx[-1])].astype("float32")
        up = gate_up[(*idx[:-1], idx[-1] + inter)].astype("float32")
        return (gate / (tirx.const(1.0, "float32") + fast_exp(-gate)) * up).astype(gate_up.dtype)

    return te.compute((*batch, inter), value, name="swiglu")


def swiglu(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` on the last axis (the Llama MLP's
    activation) as one element-wise kernel, with :func:`fast_exp`."""
    return op.tensor_expr_op(_swiglu, "swiglu", [gate_up])


def take(x: Tensor, indices: Tensor, axis: int, name: str = "take") -> Tensor:
    """``op.take`` with out-of-range indices clipped: a bad index can never read out of bounds."""
    return wrap_nested(relax.op.take(x._expr, indices._expr, axis=axis, mode="clip"), name)  # pylint: disable=protected-access


class Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W[out, in]``, as a kernel the backends' schedule rules know.

    Models use this (not ``nn.Linear``) so quantization can swap it and CPU schedules see one
    reduction block per projection.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: str | None = None):
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter((out_features, in_features), dtype)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = op.tensor_expr_op(dense, "matmul", [x, self.weight])
        if self.bias is not None:
            y = y + self.bias
        return y


class Embedding(nn.Module):
    """Token embedding that can also serve as a tied LM head (``lm_head_forward``)."""

    def __init__(self, num: int, dim: int, dtype: str | None = None):
        self.num = num
        self.dim = dim
        self.weight = nn.Parameter((num, dim), dtype)

    def forward(self, input_ids: Tensor) -> Tensor:
        return take(self.weight, input_ids, axis=0)

    def lm_head_forward(self, x: Tensor) -> Tensor:
        return op.tensor_expr_op(dense, "matmul", [x, self.weight])


# ----------------------------------------------------------------------------- the model base
class _CastingKVCache:
    """A paged KV cache kept in another dtype than the model's (float16 for float32 models):
    TVM's cache takes queries, keys and values in its own dtype and returns the attention output
    in it, so the fused QKV goes in cast and the output comes back cast.  Model code calls
    ``attention_with_fused_qkv`` as on the cache itself."""

    def __init__(self, cache: PagedKVCache, dtype: str):
        self._cache = cache
        self._dtype = dtype

    def attention_with_fused_qkv(self, layer_id: int, qkv: Tensor, num_qo_heads: int, sm_scale: float) -> Tensor:
        out = self._cache.attention_with_fused_qkv(layer_id, qkv.astype(self._dtype), num_qo_heads, sm_scale=sm_scale)
        return out.astype(qkv.dtype)

    def __getattr__(self, name):
        return getattr(self._cache, name)


class CausalLM(nn.Module):
    """Base of every decoder-only model: the compiled entry points and the paged KV cache.

    A subclass sets ``self.config`` and implements ``embed``, ``body`` (embeddings -> final
    hidden states, attending through the KV cache) and ``get_logits``.
    """

    config: ModelConfig
    dtype: str = "float32"
    target = None  # the tvm.target.Target being compiled for; set by kiln's compile pipeline
    kv_cache_dtype: str | None = None  # the KV cache's dtype, when not ``dtype`` (set by build_model)

    @property
    def kv_dtype(self) -> str:
        return self.kv_cache_dtype or self.dtype

    def embed(self, input_ids: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def body(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def get_logits(self, hidden: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def to(self, dtype: str | None = None) -> None:
        super().to(dtype)
        if dtype is not None:
            self.dtype = dtype

    def _logits(self, hidden: Tensor) -> Tensor:
        logits = self.get_logits(hidden)
        return logits.astype("float32") if logits.dtype != "float32" else logits

    def _cache(self, paged_kv_cache: PagedKVCache):
        """The cache as ``body`` sees it: one that takes and returns the model dtype."""
        if self.kv_dtype == self.dtype:
            return paged_kv_cache
        return _CastingKVCache(paged_kv_cache, self.kv_dtype)

    def batch_prefill(self, input_embeds: Tensor, logit_positions: Tensor, paged_kv_cache: PagedKVCache):
        hidden = self.body(input_embeds, self._cache(paged_kv_cache))
        hidden = take(hidden, logit_positions, axis=1)
        return self._logits(hidden), paged_kv_cache

    def batch_decode(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        hidden = self.body(input_embeds, self._cache(paged_kv_cache))
        return self._logits(hidden), paged_kv_cache

    def create_paged_kv_cache(  # pylint: disable=too-many-arguments
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        c = self.config
        theta, scale, scaling = c.rope()
        cache = TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=relax.ShapeExpr([0, c.num_hidden_layers]),
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            qk_head_dim=c.head_dim,
            v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL if c.rope_mode == "normal" else RopeMode.INLINE,
            rope_scale=scale,
            rope_theta=theta,
            rope_scaling=scaling,
            rope_ext_factors=relax.prim_value(0),
            rotary_dim=c.head_dim,
            enable_disaggregation=False,
            dtype=self.kv_dtype,
            target=self.target,
        )
        _annotate_rope(theta, scale, scaling, c.head_dim)
        return cache

    def get_default_spec(self):
        hidden = self.config.hidden_size
        kv = nn.spec.Object(object_type=PagedKVCache)
        packed = {"param_mode": "packed", "effect_mode": "none"}
        return nn.spec.ModuleSpec.from_raw(
            {
                "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
                "batch_prefill": {
                    "input_embeds": nn.spec.Tensor([1, "seq_len", hidden], self.dtype),
                    "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                    "paged_kv_cache": kv,
                    "$": packed,
                },
                "batch_decode": {
                    "input_embeds": nn.spec.Tensor(["batch_size", 1, hidden], self.dtype),
                    "paged_kv_cache": kv,
                    "$": packed,
                },
                "create_paged_kv_cache": {
                    "max_batch_size": int,
                    "max_total_seq_len": int,
                    "prefill_chunk_size": int,
                    "page_size": int,
                    "support_sliding_window": int,
                    "$": {"param_mode": "none", "effect_mode": "none"},
                },
            },
            self,
        )


__all__ = [
    "ModelConfig",
    "CausalLM",
    "Linear",
    "Embedding",
    "dense",
]
