"""Hand-written CPU kernels for the projections of a decode step.

A decode step multiplies one activation row per sequence by every weight matrix of the model:
matrix-vector products over packed low-bit weights.  Expressed as one TE reduction and left to
the schedule rules, TVM vectorizes the dequantization poorly (the codes of a packed word end up
gathered lane by lane).  This kernel is written out in TIR instead:

* the activations are re-laid out once per call so that code ``j`` of 16 consecutive packed
  words meets 16 consecutive activations (``xp[b, j, w] = x[b, w * P + j]``), and their per-group
  sums are taken once (``xs``), so the inner loop is: load 16 words, shift, mask, convert,
  multiply-add — one vector instruction each, no gathers;
* the group scale multiplies the 8 (4) partial products of a word block once, and the group
  minimum (or the symmetric offset) enters as ``min * sum(x)`` per group, outside the inner loop;
* two weight rows are interleaved so their dependency chains overlap and share activation
  loads; rows are spread over threads, and each task prefetches the rows a few tasks ahead: a
  decode step streams the whole model from memory, and the hardware prefetcher alone left the
  kernel at half the bandwidth it reaches with the hint.

The kernel keeps the signature (and the exact result, up to float reassociation) of the
``q_matmul`` PrimFunc kiln's quantized layers emit; :func:`replace_decode_gemv` swaps it in.
"""

from __future__ import annotations

import logging

import tvm
from tvm.script import tirx as T

log = logging.getLogger("kiln")

ROWS = 2  # weight rows per task, interleaved
PREFETCH_ROWS = 8  # how far ahead the weight rows are prefetched (the stream comes from DRAM)


def _tail_lanes(words_left: int, per_group: int) -> int:
    return words_left if words_left % per_group == 0 else 0


def quantized_gemv(n_rows: int, k: int, bits: int, group: int, scale_dtype: str, has_min: bool,
                   x_dtype: str, out_dtype: str, lanes: int, batch_first: bool):
    """A PrimFunc ``(x, q_weight, q_scale[, q_min], out)`` computing ``out = x @ dequant(W).T``.

    ``x`` is ``[B, 1, K]`` (``batch_first``) or ``[1, B, K]`` with ``B`` symbolic.
    """
    P = 32 // bits
    W = k // P
    G = k // group
    WG = group // P  # packed words per group
    L = lanes
    NB = W // L
    TAIL = W - NB * L
    MASK = (1 << bits) - 1
    OFF = float((1 << (bits - 1)) - 1)
    R = ROWS
    QPB = L // WG  # groups per block of L words
    TG = TAIL // WG
    if n_rows % R or L % WG or TAIL % WG or k % group or group % P:
        raise ValueError("shape not supported by the hand-written GEMV")

    def minimum(qs, qm, n, g):
        if has_min:
            return T.Cast("float32", qm[n, g])
        return T.Cast("float32", qs[n, g]) * T.float32(-OFF)

    def x_at(x, b, kk):
        return T.Cast("float32", x[b, 0, kk] if batch_first else x[0, b, kk])

    @T.macro
    def body(x, qw, qs, qm, y, B):
        with T.sblock("root"):
            xp = T.sblock_alloc_buffer((B, P, W), "float32")
            xs = T.sblock_alloc_buffer((B, G), "float32")
            for b in T.serial(B):
                for w in T.serial(W):
                    for j in T.unroll(P):
                        xp[b, j, w] = x_at(x, b, w * P + j)
                for g in T.serial(G):
                    xs[b, g] = T.float32(0)
                    for t in T.serial(group):
                        xs[b, g] = xs[b, g] + x_at(x, b, g * group + t)
            for no in T.parallel(n_rows // R):
                for c in T.serial((R * W + 15) // 16):  # one prefetch per 64-byte line
                    T.evaluate(T.call_intrin("", "tirx.prefetch", T.address_of(
                        qw[T.min(no * R + PREFETCH_ROWS + c * 16 // W, n_rows - 1), c * 16 % W]), 0, 3, 1))
                for b in T.serial(B):
                    with T.sblock("rows"):
                        acc = T.sblock_alloc_buffer((R, L), "float32")
                        tmp = T.sblock_alloc_buffer((R, L), "float32")
                        acc2 = T.sblock_alloc_buffer((R, L), "float32")
                        for r in T.unroll(R):
                            for l in T.vectorized(L):
                                acc[r, l] = T.float32(0)
                                acc2[r, l] = T.float32(0)
                        for kb in T.serial(NB):
                            for r in T.unroll(R):
                                for l in T.vectorized(L):
                                    tmp[r, l] = T.Cast("float32", T.bitwise_and(qw[no * R + r, kb * L + l], T.uint32(MASK))) * xp[b, 0, kb * L + l]
                                for j in T.unroll(P - 1):
                                    for l in T.vectorized(L):
                                        tmp[r, l] = tmp[r, l] + T.Cast("float32", T.bitwise_and(T.shift_right(qw[no * R + r, kb * L + l], T.uint32((j + 1) * bits)), T.uint32(MASK))) * xp[b, j + 1, kb * L + l]
                                for q in T.unroll(QPB):
                                    for l in T.vectorized(WG):
                                        acc[r, q * WG + l] = acc[r, q * WG + l] + tmp[r, q * WG + l] * T.Cast("float32", qs[no * R + r, kb * QPB + q])
                                for l in T.vectorized(QPB):
                                    acc2[r, l] = acc2[r, l] + minimum(qs, qm, no * R + r, kb * QPB + l) * xs[b, kb * QPB + l]
                        for r in T.unroll(R):
                            if TAIL > 0:
                                for l in T.vectorized(TAIL):
                                    tmp[r, l] = T.Cast("float32", T.bitwise_and(qw[no * R + r, NB * L + l], T.uint32(MASK))) * xp[b, 0, NB * L + l]
                                for j in T.unroll(P - 1):
                                    for l in T.vectorized(TAIL):
                                        tmp[r, l] = tmp[r, l] + T.Cast("float32", T.bitwise_and(T.shift_right(qw[no * R + r, NB * L + l], T.uint32((j + 1) * bits)), T.uint32(MASK))) * xp[b, j + 1, NB * L + l]
                                for q in T.unroll(TG):
                                    for l in T.vectorized(WG):
                                        acc[r, q * WG + l] = acc[r, q * WG + l] + tmp[r, q * WG + l] * T.Cast("float32", qs[no * R + r, NB * QPB + q])
                                for q in T.unroll(TG):
                                    acc2[r, q] = acc2[r, q] + minimum(qs, qm, no * R + r, NB * QPB + q) * xs[b, NB * QPB + q]
                            for l in T.vectorized(L):
                                acc[r, l] = acc[r, l] + acc2[r, l]
                            if L >= 16:
                                for l in T.vectorized(8):
                                    acc[r, l] = acc[r, l] + acc[r, l + 8]
                            if L >= 8:
                                for l in T.vectorized(4):
                                    acc[r, l] = acc[r, l] + acc[r, l + 4]
                            for l in T.vectorized(2):
                                acc[r, l] = acc[r, l] + acc[r, l + 2]
                            if batch_first:
                                y[b, 0, no * R + r] = T.Cast(out_dtype, acc[r, 0] + acc[r, 1])
                            else:
                                y[0, b, no * R + r] = T.Cast(out_dtype, acc[r, 0] + acc[r, 1])

    if has_min:
        @T.prim_func(s_tir=True, private=True)
        def gemv(var_x: T.handle, qw: T.Buffer((n_rows, W), "uint32"), qs: T.Buffer((n_rows, G), scale_dtype),
                 qm: T.Buffer((n_rows, G), scale_dtype), var_y: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            B = T.int64()
            x = T.match_buffer(var_x, (B, 1, k) if batch_first else (1, B, k), x_dtype)
            y = T.match_buffer(var_y, (B, 1, n_rows) if batch_first else (1, B, n_rows), out_dtype)
            body(x, qw, qs, qm, y, B)
    else:
        @T.prim_func(s_tir=True, private=True)
        def gemv(var_x: T.handle, qw: T.Buffer((n_rows, W), "uint32"), qs: T.Buffer((n_rows, G), scale_dtype),
                 var_y: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            B = T.int64()
            x = T.match_buffer(var_x, (B, 1, k) if batch_first else (1, B, k), x_dtype)
            y = T.match_buffer(var_y, (B, 1, n_rows) if batch_first else (1, B, n_rows), out_dtype)
            body(x, qw, qs, None, y, B)
    return gemv


def _static(dim) -> int | None:
    return int(dim) if isinstance(dim, tvm.tirx.IntImm) else None


def _gemv_for(func: tvm.tirx.PrimFunc, lanes: int):
    """The hand-written kernel for a ``q_matmul`` PrimFunc of a decode step, or ``None``."""
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(func)
        names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    except Exception:  # noqa: BLE001 - not the block structure kiln's layers emit
        return None
    if "q_matmul" not in names or not names <= {"q_matmul", "q_matmul_cast"}:
        return None
    bufs = list(func.params)  # TVM 0.27: parameters are typed buffer variables (shape, dtype)
    if len(bufs) not in (4, 5):
        return None
    x, qw, qs, *rest = bufs
    qm, out = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
    if len(x.shape) != 3 or qw.dtype != "uint32":
        return None
    d0, d1, k = (_static(d) for d in x.shape)
    n_rows, words = _static(qw.shape[0]), _static(qw.shape[1])
    groups = _static(qs.shape[1])
    if None in (k, n_rows, words, groups) or (d0 is None) == (d1 is None) or (d0 or d1) != 1:
        return None  # a prefill (many rows) or an unexpected layout: the schedule rules handle it
    bits = 32 * words // k
    if bits not in (2, 4, 8) or k % groups:
        return None
    try:
        return quantized_gemv(n_rows, k, bits, k // groups, str(qs.dtype), qm is not None, str(x.dtype),
                              str(out.dtype), lanes, batch_first=d1 == 1)
    except ValueError:
        return None


def replace_decode_kernels(target: tvm.target.Target):
    """Module pass: swap the decode step's ``q_matmul`` PrimFuncs and TVM's CPU decode attention
    for kiln's hand-written kernels (same signatures)."""
    from .cpu_schedules import vector_bits

    lanes = max(vector_bits(target) // 32, 4)

    @tvm.transform.module_pass(opt_level=0, name="KilnReplaceDecodeKernels")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            if gv.name_hint.startswith("q_matmul"):
                kernel = _gemv_for(func, lanes)
                if kernel is not None:
                    # opaque: fusion must not wrap it with element-wise neighbours
                    updates[gv] = kernel.with_attr("op_pattern", 8)
            elif str(func.attrs.get("global_symbol", "")) == "batch_decode_paged_kv_cpu":
                kernel = _decode_attention_for(func)
                if kernel is not None:
                    updates[gv] = kernel.with_attr("global_symbol", "batch_decode_paged_kv_cpu")
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


# ---------------------------------------------------------------------------------------- attention
LOG2E = 1.4426950408889634


def decode_attention(num_qo_heads: int, num_kv_heads: int, head_dim: int, dtype: str, page_size: int):
    """Paged-KV decode attention: one query token per sequence against its cached keys/values.

    Same signature and results (output and log2-sum-exp ``lse``) as TVM's CPU kernel
    ``batch_decode_paged_kv_cpu``, which walks the cache one scalar at a time on one thread.
    Here every (sequence, query head) is a task spread over threads; a page's 16 scores are
    computed with vectorized dot products, then one online-softmax update per page rescales the
    vectorized output accumulator.  RoPE must have been applied before caching (kiln's models
    do); the kernel refuses ``rotary_mode`` 1.
    """
    H_qo, H_kv, D, PS = num_qo_heads, num_kv_heads, head_dim, page_size
    GROUP = H_qo // H_kv
    VL = 16 if D % 16 == 0 else 8 if D % 8 == 0 else 4 if D % 4 == 0 else 1
    NCH = D // VL

    @T.prim_func(s_tir=True, private=True)
    def batch_decode_paged_kv(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle,
        var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        Q = T.match_buffer(Q_handle, (B, H_qo, D), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, H_kv, PS, D), dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset)  # noqa: F841
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset)  # noqa: F841
        output = T.match_buffer(output_handle, (B, H_qo, D), dtype)
        lse = T.match_buffer(lse_handle, (B, H_qo), "float32")
        length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_info_elem_offset)
        assert rotary_mode == 0, "kiln's CPU decode attention expects RoPE applied before caching"

        for task in T.parallel(B * H_qo):
            with T.sblock("attn"):
                T.reads(Q[0:B, 0:H_qo, 0:D], pages[0:max_num_pages, 0:2, 0:H_kv, 0:PS, 0:D],
                        page_table_indptr[0:B + 1], page_table_values[0:nnz_pages], length_info[0:B])
                T.writes(output[0:B, 0:H_qo, 0:D], lse[0:B, 0:H_qo])
                q = T.sblock_alloc_buffer((D,), "float32")
                o = T.sblock_alloc_buffer((D,), "float32")
                s = T.sblock_alloc_buffer((PS,), "float32")
                dot = T.sblock_alloc_buffer((VL,), "float32")
                st = T.sblock_alloc_buffer((4,), "float32")  # running max, denominator, new max, page max
                b: T.let[T.int32] = task // H_qo
                h: T.let[T.int32] = task % H_qo
                hk: T.let[T.int32] = h // GROUP
                begin: T.let[T.int32] = page_table_indptr[b]
                n_pages: T.let[T.int32] = page_table_indptr[b + 1] - begin
                for d in T.vectorized(D):
                    q[d] = T.Cast("float32", Q[b, h, d]) * (sm_scale * T.float32(LOG2E))
                    o[d] = T.float32(0)
                st[0] = T.float32(-5e4)
                st[1] = T.float32(1)
                for p in T.serial(n_pages):
                    page: T.let[T.int32] = page_table_values[begin + p]
                    n_rows: T.let[T.int32] = T.if_then_else(p == n_pages - 1, length_info[b], PS)
                    st[3] = T.float32(-5e4)
                    for t in T.serial(n_rows):
                        for l in T.vectorized(VL):
                            dot[l] = q[l] * T.Cast("float32", pages[page, 0, hk, t, l])
                        for c in T.serial(NCH - 1):
                            for l in T.vectorized(VL):
                                dot[l] = dot[l] + q[(c + 1) * VL + l] * T.Cast("float32", pages[page, 0, hk, t, (c + 1) * VL + l])
                        if VL >= 16:
                            for l in T.vectorized(8):
                                dot[l] = dot[l] + dot[l + 8]
                        if VL >= 8:
                            for l in T.vectorized(4):
                                dot[l] = dot[l] + dot[l + 4]
                        if VL >= 4:
                            for l in T.vectorized(2):
                                dot[l] = dot[l] + dot[l + 2]
                        if VL >= 2:
                            s[t] = dot[0] + dot[1]
                        else:
                            s[t] = dot[0]
                        st[3] = T.max(st[3], s[t])
                    st[2] = T.max(st[0], st[3])
                    st[1] = st[1] * T.exp2(st[0] - st[2])
                    for d in T.vectorized(D):
                        o[d] = o[d] * T.exp2(st[0] - st[2])
                    st[0] = st[2]
                    for t in T.serial(n_rows):
                        s[t] = T.exp2(s[t] - st[0])
                        st[1] = st[1] + s[t]
                        for d in T.vectorized(D):
                            o[d] = o[d] + s[t] * T.Cast("float32", pages[page, 1, hk, t, d])
                for d in T.vectorized(D):
                    output[b, h, d] = T.Cast(dtype, o[d] / st[1])
                lse[b, h] = st[0] + T.log2(st[1])

    return batch_decode_paged_kv


def _decode_attention_for(func: tvm.tirx.PrimFunc):
    """kiln's kernel for TVM's ``batch_decode_paged_kv_cpu`` (no sliding window), or ``None``."""
    params = list(func.params)
    if len(params) != 13:
        return None
    q, pages = params[0], params[1]
    try:
        _, h_qo, d = (int(s) if isinstance(s, tvm.tirx.IntImm) else s for s in q.shape)
        _, _, h_kv, page_size, _ = (int(s) if isinstance(s, tvm.tirx.IntImm) else s for s in pages.shape)
    except (AttributeError, TypeError, ValueError):
        return None
    if not all(isinstance(v, int) for v in (h_qo, d, h_kv, page_size)) or h_qo % h_kv:
        return None
    return decode_attention(h_qo, h_kv, d, str(q.dtype), page_size)
