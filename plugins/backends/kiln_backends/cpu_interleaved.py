"""Projections over weights interleaved a vector's lanes of rows to a vector (AVX2, AVX-512).

kiln's row-major projection kernel (:func:`kiln_backends.cpu_kernels.quantized_gemv`) reads each
weight row's words in order, so an int32 lane sums one word and the lanes of a vector must be
transposed and summed across before a row's result is whole: at 8 sequences that kept it at
about half of what ``vpdpwssd`` can multiply.  Here the weights of ``R`` consecutive rows (16
with AVX-512, 8 with AVX2: a register's int32 lanes) are stored side by side instead,
``[N / R, W, R]`` (word ``w`` of rows ``R i .. R i + R - 1`` in one vector; scales and minima
``[N / R, G, R]``), so lane ``r`` of every vector is row ``r``:

* each word of codes gives ``32 / bits / 2`` vectors of code pairs ``(c_s, c_{s + S})``, one in
  each half word (a shift and a mask), and each pair meets the matching pair of the row's int16
  activations, broadcast from memory, in one ``vpdpwssd`` (VNNI; else ``vpmaddwd`` and an add):
  per ``R`` rows, group and sequence, 16 dot-product instructions (4-bit codes, groups of 32),
  then one convert and two multiply-adds; no transposes, no tail blocks, no sums across lanes;
* each unpacked code vector serves a tile of up to 8 sequences (8 int32 and 8 float
  accumulators in registers; 4 with AVX2's 16 registers); the rest of a batch runs in tiles of
  4, 2 and 1;
* activations are rounded per group as the row-major kernel rounds them (``max|x| / 32767``
  steps), and stored as int32 pairs in the order the codes come out of a word;
* each output is one lane, accumulated group after group in the same order at any batch size
  and in any tile, so a sequence's logits do not depend on what it is batched with.

The layout is made when a model is loaded: the compile pipeline (:func:`interleave_pass`) finds
the parameters that only these kernels read, swaps the kernels in, and adds a function
``_param_layout`` that re-lays out those parameters (same shapes and dtypes, so every other
function keeps its signature); :class:`kiln.runtime.model.LoadedModel` calls it after loading the
weights.  The files on disk stay as MLC-LLM writes them.
"""

from __future__ import annotations

import logging

import tvm
from tvm.script import tirx as T

from kiln.pipeline.compile import PARAM_LAYOUT_FUNC as LAYOUT_FUNC

from .cpu_kernels import (CHUNK_ROWS, INT8_STEPS, INT16_STEPS, PARALLEL_TOKENS, RELAYOUT_LANES, _activation_loader,
                          _chunk_rounder, _fold_halves, _gemv_for, _l2_hint, _projection_func, _well_formed)

log = logging.getLogger("kiln")

ROWS = 16  # weight rows side by side in one vector with AVX-512 (int32 lanes of a register); 8 with AVX2
TILE = 8  # sequences sharing each unpacked code vector (8 int32 + 8 float accumulators); 4 with AVX2's 16 registers
DOTS = {2: {16: "llvm.x86.avx512.vpdpwssd.512", 8: "llvm.x86.avx512.vpdpwssd.256"},  # int16 pairs (VNNI)
        4: {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256"}}  # quads of bytes: codes, int8
PREFETCH_BLOCKS = 2  # how many blocks of rows ahead the weights are hinted into L2 (a step streams them from DRAM)


def interleaved_takes(n_rows: int, k: int, bits: int, group: int, int8: bool = False, rows: int = ROWS) -> bool:
    """Whether :func:`interleaved_gemv` takes this shape: whole blocks of ``rows`` rows, whole groups
    of whole words, groups that fold in halves to the relayout's lanes, and per-group integer
    sums that cannot overflow int32."""
    per_word = 32 // bits
    folds = group // RELAYOUT_LANES if group % RELAYOUT_LANES == 0 else 0
    steps = INT8_STEPS if int8 else INT16_STEPS
    return (bits in (2, 4, 8) and rows in (8, 16) and n_rows % rows == 0 and k % group == 0 and group % per_word == 0
            and folds > 0 and folds & (folds - 1) == 0 and group * ((1 << bits) - 1) * steps < 2**31)


def interleave(a, rows: int = ROWS):
    """``[N, C]`` row-major -> the interleaved layout, same shape: element ``(r, c)`` moves to flat
    position ``((r // rows) * C + c) * rows + r % rows`` (numpy; for tests and tools)."""
    import numpy as np

    n, c = a.shape
    return np.ascontiguousarray(a.reshape(n // rows, rows, c).transpose(0, 2, 1)).reshape(n, c)


def interleave_kernel(n: int, c: int, dtype: str, rows: int = ROWS):
    """A PrimFunc ``(src [N, C], dst [N, C])`` writing ``src`` in the interleaved layout."""

    @T.prim_func(s_tir=True, private=True)
    def relayout(src: T.Buffer((n, c), dtype), dst: T.Buffer((n, c), dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        with T.sblock("root"):
            view = T.decl_buffer((n // rows, c, rows), dtype, data=dst.data)
            for rb in T.parallel(n // rows):
                for j, r in T.grid(c, rows):
                    view[rb, j, r] = src[rb * rows + r, j]

    return relayout


def interleaved_gemv(n_rows: int, k: int, bits: int, group: int, scale_dtype: str, has_min: bool,
                     x_dtype: str, out_dtype: str, batch_first: bool, epilogue=None, int8: bool = False,
                     rows: int = ROWS, vnni: bool = True):
    """A PrimFunc ``(x, q_weight, q_scale[, q_min], out)`` computing ``out = x @ dequant(W).T`` with
    the weights in the interleaved layout (:func:`interleave`), arguments and epilogue as for
    :func:`kiln_backends.cpu_kernels.quantized_gemv`.  Activations are rounded to
    int16 and meet pairs of codes in ``vpdpwssd``, or with ``int8`` to int8 (llama.cpp's steps)
    and meet quads of codes in ``vpdpbusd``: half the dot products.  ``rows``: weight rows per
    vector, the target's int32 lanes (16 with AVX-512, 8 with AVX2); without ``vnni`` the products
    are written as widening multiplies whose neighbouring lanes are added, which LLVM emits as
    ``vpmaddwd`` for int16 (int8 then gains nothing)."""
    if not interleaved_takes(n_rows, k, bits, group, int8, rows):
        raise ValueError("shape not supported by the interleaved GEMV")
    P = 32 // bits  # codes per word
    C = 4 if int8 else 2  # codes a dot product takes per int32 lane: a quad of bytes or a pair of half words
    S = P // C  # such parts per word: part s holds codes (c_s, c_{s+S}, ...), one per byte or half word
    R = rows
    W, G, WG, RB = k // P, k // group, group // P, n_rows // R
    NT = TILE if R >= 16 else 4  # sequences per tile: 2 NT accumulators in registers
    MASK = (1 << bits) - 1
    PART_MASK = sum(MASK << (32 // C * j) for j in range(C))
    OFF = float((1 << (bits - 1)) - 1)
    STEPS, XT = (INT8_STEPS, "int8") if int8 else (INT16_STEPS, "int16")
    PER = group // C  # int32 parts of activations per group
    MC, VR = CHUNK_ROWS, RELAYOUT_LANES
    # activation j of a group's part p = w * S + s is activation w * P + s + j * S of the group
    ORDER = [[w * P + s + j * S for w in range(WG) for s in range(S)] for j in range(C)]

    def store(value, index):
        return epilogue(value, index) if epilogue is not None else T.Cast(out_dtype, value)

    x_vec = _activation_loader(batch_first, x_dtype)

    def vec(n):
        return T.Ramp(0, 1, n)

    def packed(rounded):
        """A group's rounded activations as int32 parts, each the activations its part of codes
        meets: ``C`` shuffles, each masked to its byte or half word and shifted into place."""
        total = None
        for j in range(C):
            v = T.bitwise_and(T.Cast(f"int32x{PER}", T.Shuffle([rounded], ORDER[j])),
                              T.Broadcast(T.int32((1 << (32 // C)) - 1), PER))
            v = v if j == 0 else T.shift_left(v, T.Broadcast(T.int32(32 // C * j), PER))
            total = v if total is None else T.bitwise_or(total, v)
        return total

    def codes(word, s):
        """Part ``s`` of a vector of words: codes ``s, s + S, ..`` of each, one per byte or half word."""
        word = T.shift_right(word, T.Broadcast(T.Cast("uint32", bits * s), R))  # s = 0 folds once unrolled
        if PART_MASK != 0xFFFFFFFF:
            word = T.bitwise_and(word, T.Broadcast(T.uint32(PART_MASK), R))
        return T.reinterpret(f"{'uint8' if int8 else 'int16'}x{C * R}", word)

    def dot(acc, codes_v, x_word):
        """``acc`` plus, in each int32 lane, the ``C`` products of a lane's codes with the
        activations packed in ``x_word`` (broadcast)."""
        xs_v = T.reinterpret(f"{XT}x{C * R}", T.Broadcast(x_word, R))
        if vnni:
            codes_in = T.reinterpret(f"int8x{C * R}", codes_v) if int8 else codes_v
            return T.call_llvm_pure_intrin(f"int32x{R}", DOTS[C][R], acc, codes_in, xs_v)
        prod = T.Cast(f"int32x{C * R}", codes_v) * T.Cast(f"int32x{C * R}", xs_v)
        total = acc
        for j in range(C):
            total = total + T.Shuffle([prod], list(range(j, C * R, C)))
        return total

    @T.macro
    def relayout(x, xq, xs, xd, b, row):
        """Round activation row ``row`` per group into int16 pairs ``xq[b]``, with each group's step
        ``xd[b, g]`` and its rounded sum times the step ``xs[b, g]`` (for the minima)."""
        with T.sblock("relayout"):
            st = T.sblock_alloc_buffer((2,), "float32")  # the group's largest magnitude, 1 / step
            part = T.sblock_alloc_buffer((2, VR), "float32")
            rounded = T.sblock_alloc_buffer((group,), "float32")
            for g in T.serial(G):
                part[0, vec(VR)] = _fold_halves(T.fabs(x_vec(x, row, g * group, group)), group, T.max, VR)
                st[0] = T.float32(0)
                for i in T.serial(VR):
                    st[0] = T.max(st[0], part[0, i])
                st[1] = T.Select(st[0] > T.float32(0), T.float32(STEPS) / st[0], T.float32(0))
                rounded[vec(group)] = T.round(x_vec(x, row, g * group, group) * T.Broadcast(st[1], group))
                part[1, vec(VR)] = _fold_halves(rounded[vec(group)], group, lambda a, c: a + c, VR)
                xd[b, g] = st[0] * T.float32(1.0 / STEPS)
                xs[b, g] = T.float32(0)
                for i in T.serial(VR):
                    xs[b, g] = xs[b, g] + part[1, i]
                xs[b, g] = xs[b, g] * xd[b, g]
                xq[b, T.Ramp(g * PER, 1, PER)] = packed(rounded[vec(group)])

    def make_tile(nb: int):
        @T.macro
        def tile(qw, qs, qm, y, xq, xs, xd, acc, isum, rb, b0, y0):
            """Rows ``R rb ..`` of activation rows ``b0 .. b0 + nb`` of the chunk (``y0 ..`` of ``y``)."""
            for a in T.unroll(nb):
                acc[a, vec(R)] = T.Broadcast(T.float32(0), R)
            for g in T.serial(G):
                for a in T.unroll(nb):
                    isum[a, vec(R)] = T.Broadcast(T.int32(0), R)
                for w in T.unroll(WG):  # each word of 16 rows is one cache line (of 8, half of one)
                    T.evaluate(_l2_hint(qw[T.min(rb + PREFETCH_BLOCKS, RB - 1), g * WG + w, 0]))
                T.evaluate(_l2_hint(qs[T.min(rb + PREFETCH_BLOCKS, RB - 1), g, 0]))
                if has_min:
                    T.evaluate(_l2_hint(qm[T.min(rb + PREFETCH_BLOCKS, RB - 1), g, 0]))
                for w in T.unroll(WG):
                    for s in T.unroll(S):
                        for a in T.unroll(nb):
                            isum[a, vec(R)] = dot(isum[a, vec(R)], codes(qw[rb, g * WG + w, vec(R)], s),
                                                  xq[b0 + a, (g * WG + w) * S + s])
                for a in T.unroll(nb):
                    if has_min:
                        acc[a, vec(R)] = (acc[a, vec(R)] + T.Cast(f"float32x{R}", isum[a, vec(R)])
                                             * (T.Cast(f"float32x{R}", qs[rb, g, vec(R)]) * T.Broadcast(xd[b0 + a, g], R))
                                             + T.Cast(f"float32x{R}", qm[rb, g, vec(R)]) * T.Broadcast(xs[b0 + a, g], R))
                    else:  # symmetric codes: the minimum is -OFF * scale
                        acc[a, vec(R)] = acc[a, vec(R)] + T.Cast(f"float32x{R}", qs[rb, g, vec(R)]) * (
                            T.Cast(f"float32x{R}", isum[a, vec(R)]) * T.Broadcast(xd[b0 + a, g], R)
                            - T.Broadcast(xs[b0 + a, g] * T.float32(OFF), R))
            for a in T.unroll(nb):
                for r in T.unroll(R):
                    if batch_first:
                        y[y0 + a, 0, rb * R + r] = store(acc[a, r], (y0 + a, T.int64(0), rb * R + r))
                    else:
                        y[0, y0 + a, rb * R + r] = store(acc[a, r], (T.int64(0), y0 + a, rb * R + r))

        return tile

    t8, t4, t2, t1 = (make_tile(n) for n in (NT, 4, 2, 1))  # t8: NT (8, or 4 with AVX2) sequences
    round_chunk = _chunk_rounder(relayout)

    @T.macro
    def body(x, qw_flat, qs_flat, qm_flat, y, B):
        with T.sblock("root"):
            qw = T.decl_buffer((RB, W, R), "uint32", data=qw_flat.data)
            qs = T.decl_buffer((RB, G, R), scale_dtype, data=qs_flat.data)
            qm = T.decl_buffer((RB, G, R), scale_dtype, data=qm_flat.data)  # qs again without minima
            xq = T.sblock_alloc_buffer((T.min(B, MC), k // C), "int32")
            xs = T.sblock_alloc_buffer((T.min(B, MC), G), "float32")
            xd = T.sblock_alloc_buffer((T.min(B, MC), G), "float32")
            for mc in T.serial((B + MC - 1) // MC):
                nb: T.let[T.int64] = T.min(B - mc * MC, MC)
                round_chunk(x, xq, xs, xd, nb, mc * MC)
                for rb in T.parallel(RB):
                    with T.sblock("rows"):
                        acc = T.sblock_alloc_buffer((NT, R), "float32")
                        isum = T.sblock_alloc_buffer((NT, R), "int32")
                        for t in T.serial(nb // NT):
                            t8(qw, qs, qm, y, xq, xs, xd, acc, isum, rb, t * NT, mc * MC + t * NT)
                        if nb % NT >= 4:
                            t4(qw, qs, qm, y, xq, xs, xd, acc, isum, rb, nb // NT * NT, mc * MC + nb // NT * NT)
                        if nb % 4 >= 2:
                            t2(qw, qs, qm, y, xq, xs, xd, acc, isum, rb, nb // 4 * 4, mc * MC + nb // 4 * 4)
                        if nb % 2 == 1:
                            t1(qw, qs, qm, y, xq, xs, xd, acc, isum, rb, nb - 1, mc * MC + nb - 1)

    gemv = _projection_func(body, n_rows, k, W, G, scale_dtype, has_min, x_dtype, out_dtype, batch_first,
                            {"kiln.interleaved": True})
    if epilogue is None and not _well_formed(gemv):
        raise RuntimeError("kiln's interleaved projection kernel is not well-formed TIR")
    return gemv


def interleaved_take(vocab: int, words: int, groups: int, bits: int, scale_dtype: str, has_min: bool, dim: int,
                     ids_dtype: str, out_dtype: str, rows: int = ROWS):
    """A PrimFunc ``(ids, q_weight, q_scale[, q_min], out)`` gathering rows ``ids`` (clipped to the
    table) of a quantized embedding table stored in the interleaved layout: the same values as
    kiln's ``q_take`` on the row-major table (a tied embedding shares its table with the LM head)."""
    P = 32 // bits
    MASK = (1 << bits) - 1
    OFF = float((1 << (bits - 1)) - 1)
    group = dim // groups

    def value(qw, qs, qm, row, h):
        code = T.Cast("float32", T.bitwise_and(
            T.shift_right(qw[row // rows, h // P, row % rows], T.Cast("uint32", h % P * bits)), T.uint32(MASK)))
        scale = T.Cast("float32", qs[row // rows, h // group, row % rows])
        if has_min:
            return code * scale + T.Cast("float32", qm[row // rows, h // group, row % rows])
        return (code - T.float32(OFF)) * scale

    @T.macro
    def gather(ids, qw, qs, qm, out, s):
        row: T.let[T.int64] = T.Cast("int64", T.max(T.min(ids[s], T.Cast(ids_dtype, vocab - 1)), T.Cast(ids_dtype, 0)))
        for h in T.serial(dim):
            out[s, h] = T.Cast(out_dtype, value(qw, qs, qm, row, h))

    @T.macro
    def body(ids, qw_flat, qs_flat, qm_flat, out, n):
        with T.sblock("root"):
            qw = T.decl_buffer((vocab // rows, words, rows), "uint32", data=qw_flat.data)
            qs = T.decl_buffer((vocab // rows, groups, rows), scale_dtype, data=qs_flat.data)
            qm = T.decl_buffer((vocab // rows, groups, rows), scale_dtype, data=qm_flat.data)
            if n >= PARALLEL_TOKENS:  # a prefill's tokens on all cores, a decode step's on this one
                for s in T.parallel(n):
                    gather(ids, qw, qs, qm, out, s)
            else:
                for s in T.serial(n):
                    gather(ids, qw, qs, qm, out, s)

    if has_min:
        @T.prim_func(s_tir=True, private=True, check_well_formed=False)
        def take(var_ids: T.handle, qw: T.Buffer((vocab, words), "uint32"), qs: T.Buffer((vocab, groups), scale_dtype),
                 qm: T.Buffer((vocab, groups), scale_dtype), var_out: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "kiln.interleaved": True})
            n = T.int64()
            ids = T.match_buffer(var_ids, (n,), ids_dtype)
            out = T.match_buffer(var_out, (n, dim), out_dtype)
            body(ids, qw, qs, qm, out, n)
    else:
        @T.prim_func(s_tir=True, private=True, check_well_formed=False)
        def take(var_ids: T.handle, qw: T.Buffer((vocab, words), "uint32"), qs: T.Buffer((vocab, groups), scale_dtype),
                 var_out: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "kiln.interleaved": True})
            n = T.int64()
            ids = T.match_buffer(var_ids, (n,), ids_dtype)
            out = T.match_buffer(var_out, (n, dim), out_dtype)
            body(ids, qw, qs, qs, out, n)
    if not _well_formed(take):
        raise RuntimeError("kiln's interleaved embedding gather is not well-formed TIR")
    return take


def _take_for(func: tvm.tirx.PrimFunc, rows: int = ROWS, build: bool = True):
    """For kiln's ``q_take`` PrimFunc (``(ids, q_weight, q_scale[, q_min], out)``, one ``q_take``
    block): the gather over the interleaved table, or with ``build`` false the weight's positions
    among the parameters; ``None`` for anything else."""
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(func)
        blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    except Exception:  # noqa: BLE001 - not the block structure kiln's layers emit
        return None
    bufs = list(func.params)  # PrimFunc parameters are buffers in this TVM
    if len(blocks) != 1 or blocks[0].name_hint != "q_take" or len(bufs) not in (4, 5):
        return None
    ids, qw, qs, *rest = bufs
    out, qm = rest[-1], (rest[0] if len(rest) == 2 else None)
    static = [d for b in (qw, qs) for d in b.shape] + [out.shape[1]]
    if (len(ids.shape) != 1 or len(out.shape) != 2 or qw.dtype != "uint32" or len(qw.shape) != 2
            or not all(isinstance(d, tvm.tirx.IntImm) for d in static)):
        return None
    vocab, words, groups, dim = int(qw.shape[0]), int(qw.shape[1]), int(qs.shape[1]), int(out.shape[1])
    bits = 32 * words // dim if dim else 0
    if bits not in (2, 4, 8) or vocab % rows or dim % groups or 32 * words != bits * dim:
        return None
    if not build:
        return {"qw": 1, "qs": 2, **({"qm": 3} if qm is not None else {})}
    return interleaved_take(vocab, words, groups, bits, str(qs.dtype), qm is not None, dim, str(ids.dtype),
                            str(out.dtype), rows)


def _param_uses(func, params_index):
    """For one Relax function: ``(uses, pinned, calls)``.  ``uses[i]``: ``(kernel, position)`` for
    each ``call_tir`` argument that is parameter ``i`` of the packed parameters; ``pinned``: the
    parameters used any other way; ``calls``: ``(kernel, [parameter index or None per argument])``.
    ``params_index(var)`` is the parameter a bound variable stands for, or ``None``."""
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    uses, pinned, calls = {}, set(), []
    bound = {}

    def pin_vars(expr):
        def visit(e):
            if isinstance(e, relax.Var) and e in bound:
                pinned.add(bound[e])
        relax.analysis.post_order_visit(expr, visit)

    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            index = params_index(value)
            if index is not None:
                bound[binding.var] = index
                continue
            if (isinstance(value, relax.Call) and value.op.same_as(call_tir)
                    and isinstance(value.args[0], tvm.ir.GlobalVar) and isinstance(value.args[1], relax.Tuple)):
                gv, args = value.args[0], list(value.args[1].fields)
                indices = [bound.get(a) if isinstance(a, relax.Var) else None for a in args]
                for pos, (a, i) in enumerate(zip(args, indices)):
                    if i is not None:
                        uses.setdefault(i, set()).add((gv, pos))
                    else:
                        pin_vars(a)
                calls.append((gv, indices))
                for extra in value.args[2:]:
                    pin_vars(extra)
            else:
                pin_vars(value)
    pin_vars(func.body.body)
    return uses, pinned, calls


def _same_type(a, b) -> bool:
    try:
        tvm.ir.assert_structural_equal(a, b)
    except ValueError:
        return False
    return True


def interleave_pass(rows: int = ROWS, vnni: bool = True, int8: bool = False):
    """Module pass, after ``FuseTIR`` and before :func:`kiln_backends.cpu_kernels.replace_projections`:
    the kernels over interleaved weights for every projection (and quantized embedding gather)
    whose weights no other kernel reads, and the function ``LAYOUT_FUNC`` that lays those weights
    out at load, ``rows`` to a vector (:func:`interleave_rows`).  Weights read by anything else
    stay row-major, for the row-major kernels.  ``vnni`` and ``int8`` as for
    :func:`interleaved_gemv`."""
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="KilnInterleaveWeights")
    def _pass(mod, _ctx):
        kernels = {}  # GlobalVar -> positions of the weight's tensors
        for gv, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs or {}).get("tirx.is_scheduled"):
                continue
            roles = (_gemv_for(func, rows, build=False, interleaved=True, int8=int8) if "q_matmul" in gv.name_hint
                     else _take_for(func, rows, build=False) if gv.name_hint.startswith("q_take") else None)
            if roles:
                kernels[gv] = set(roles.values())
        packed = None  # the packed parameters' struct info, the same in every function
        uses, pinned, calls = {}, set(), []
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or not func.params:
                continue
            last = func.params[-1]
            if not isinstance(last.ty, relax.TupleType) or gv.name_hint == LAYOUT_FUNC:
                continue
            if packed is None:
                packed = last.ty
            elif not _same_type(packed, last.ty):
                log.info("interleaved weights: functions take different parameters; all stay row-major")
                return mod

            def params_index(value, last=last):
                if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(last):
                    return int(value.index)
                return None

            u, p, c = _param_uses(func, params_index)
            for i, s in u.items():
                uses.setdefault(i, set()).update(s)
            pinned |= p
            calls += c
        if packed is None:
            return mod
        chosen = {i for i, s in uses.items() if i not in pinned and all(gv in kernels and pos in kernels[gv]
                                                                         for gv, pos in s)}
        sites = {}
        for gv, indices in calls:
            sites.setdefault(gv, []).append(indices)
        while True:  # a kernel takes interleaved weights only where every call passes chosen ones
            taken = {gv for gv in kernels if gv in sites and all(
                indices[pos] in chosen for indices in sites[gv] for pos in kernels[gv])}
            still = {i for i in chosen if all(gv in taken for gv, _ in uses[i])}
            if still == chosen:
                break
            chosen = still
        if not chosen:
            return mod
        mod = mod.clone()
        for gv in taken:
            func = mod[gv]
            kernel = (_gemv_for(func, rows, interleaved=True, int8=int8, vnni=vnni) if "q_matmul" in gv.name_hint
                      else _take_for(func, rows))
            if kernel is None:  # cannot happen for a kernel that passed the analysis: keep the layout row-major
                raise RuntimeError(f"interleaved weights: no kernel for {gv.name_hint}")
            symbol = (func.attrs or {}).get("global_symbol")
            mod[gv] = kernel.with_attr("global_symbol", symbol) if symbol else kernel
        bb = relax.BlockBuilder(mod)
        params = relax.Var("packed_params", packed)
        relayouts = {}
        with bb.function(LAYOUT_FUNC, [params]):
            with bb.dataflow():
                fields = []
                for i, info in enumerate(packed.fields):
                    item = bb.emit(relax.TupleGetItem(params, i))
                    if i in chosen:
                        shape, dtype = tuple(int(d) for d in info.shape.values), str(info.dtype)
                        if (shape, dtype) not in relayouts:
                            relayouts[shape, dtype] = bb.add_func(interleave_kernel(*shape, dtype, rows),
                                                                  f"interleave_{shape[0]}x{shape[1]}_{dtype}")
                        item = bb.emit(relax.call_tir(relayouts[shape, dtype], [item], out_ty=info))
                    fields.append(item)
                out = bb.emit_output(relax.Tuple(fields))
            bb.emit_func_output(out)
        log.debug("interleaved weights: %d parameters, kernels %s", len(chosen),
                  ", ".join(sorted(gv.name_hint for gv in taken)))
        return bb.get()

    return _pass


def interleave_rows(target: tvm.target.Target) -> int:
    """Weight rows per vector for the target: its int32 lanes with AVX-512 (with the byte and word
    instructions, BW) or AVX2; 0 (row-major weights and kernels) elsewhere."""
    from tvm.target.codegen import llvm_cpu_has_features

    try:
        if llvm_cpu_has_features(["avx512bw"], target):
            return 16
        if llvm_cpu_has_features(["avx2"], target):
            return 8
    except Exception:  # noqa: BLE001 - non-x86 targets have other feature names
        pass
    return 0
