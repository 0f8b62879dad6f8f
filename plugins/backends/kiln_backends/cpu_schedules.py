"""CPU schedule rules: threads across cores, vectorized reductions, fused dequantization.

Unscheduled TIR runs on one thread with scalar loops (5-25x slower, see docs/tvm-notes.md).
These rules are generic over shapes and models:

* :class:`MatmulRule` — the projections kiln emits (``matmul``/``q_matmul`` blocks: spatial
  ``[..., N]``, reduction over K, optionally as packed-word x lane for 4-bit weights) plus
  their fused element-wise epilogues.  The reduction is split into vector-width lanes
  (``rfactor``), output rows are spread over threads, and the batch/sequence rows run inside
  each thread so a tile of weight rows is reused from cache.
* :class:`RowReductionRule` — RMSNorm-like functions: dlight's CPU ``Reduction`` rule with each
  row's sum split over vector lanes; the rule itself for other reductions (softmax-like).
* :class:`InjectiveRule` — element-wise and gather functions: one parallel loop over the fused
  outer axes, vectorized inner axis.

A rule that does not match (or fails) returns ``None`` and the next rule is tried, so an odd
kernel stays correct, only slower.  Each parallel loop the rules emit then gets a serial twin,
taken when the loop's whole work is small (:func:`serial_twins_pass`): a decode step's kernels
of one row per sequence spent more time waking the thread pool than computing.
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

log = logging.getLogger("kiln")

MATMUL_BLOCKS = ("matmul", "q_matmul")


def vector_bits(target: Target) -> int:
    """SIMD register width of the target in bits (AVX-512: 512, AVX2: 256, NEON/SSE: 128)."""
    from tvm.target.codegen import llvm_cpu_has_features

    try:
        if llvm_cpu_has_features(["avx512f"], target):
            return 512
        if llvm_cpu_has_features(["avx2"], target) or llvm_cpu_has_features(["avx"], target):
            return 256
    except Exception:  # noqa: BLE001 - non-x86 targets have other feature names
        pass
    return 128


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _largest_divisor(n: int | None, candidates) -> int:
    for c in candidates:
        if n is not None and n % c == 0:
            return c
    return 1


class _SafeRule(ScheduleRule):
    """Run ``schedule``; any failure means 'not applicable' (logged), never a broken build."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            return self.schedule(func, target)
        except Exception as exc:  # noqa: BLE001 - TVM schedule errors have many types
            log.debug("%s did not apply: %s", type(self).__name__, str(exc).splitlines()[0] if str(exc) else exc)
            return None

    def schedule(self, func, target):  # pragma: no cover - abstract
        raise NotImplementedError


class MatmulRule(_SafeRule):
    """``out[..., n] = sum_k x[..., k] * W(n, k)`` with optional element-wise epilogues.

    Float weights: the reduction over K is split into vector-width lanes (``rfactor``), one
    accumulator vector per output element.  Packed low-bit weights (two reduction axes: packed
    word x code within the word): the lanes are the codes of one word (a broadcast word shifted by
    a lane vector, contiguous activations, one scale per word), and the words of a 32-weight group
    are unrolled, each with its own accumulator, so scale loads are per group and the unpacking of
    one word overlaps the multiply-adds of the others.  Output rows are spread over threads; the
    batch/sequence rows run inside each thread so a tile of weight rows is reused from cache.
    """

    rows_per_task = 8  # weight rows computed together (reused across the batch rows)

    def schedule(self, func, target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        main = [i for i in infos if not i.is_injective()]
        if len(main) != 1 or main[0].name not in MATMUL_BLOCKS:
            return None
        main = main[0]
        if infos.index(main) != 0 or not all(i.is_injective() for i in infos[1:]):
            return None
        kinds = main.dom_kind()
        n_spatial = len(kinds.rstrip("R"))
        if "R" in kinds[:n_spatial] or n_spatial < 1:
            return None
        lanes = vector_bits(target) // 32
        block = main.block_rv
        loops = sch.get_loops(block)
        r_loops = loops[n_spatial:]

        # 1. the reduction as vector lanes: (unrolled words x codes of a word) or (vector of K)
        if len(r_loops) == 2:
            words, per_word = r_loops
            per = _extent(sch, per_word) or 1
            unroll = _largest_divisor(_extent(sch, words), [max(32 // per, 1), 4, 2, 1])
            _, word_in = sch.split(words, factors=[None, unroll])
            lane = sch.fuse(word_in, per_word)
        elif len(r_loops) == 1:
            k = r_loops[0]
            unroll = 1
            f = _largest_divisor(_extent(sch, k), [lanes, lanes // 2, lanes // 4, 2])
            if f == 1:
                return None
            _, lane = sch.split(k, factors=[None, f])
        else:
            return None
        # the lane axis goes last in the partial-sum buffer (contiguous vectors)
        rf = sch.rfactor(lane, factor_axis=len(sch.get(block).writes[0].region))

        # 2. rows across threads, batch rows inside each thread
        rf_loops = sch.get_loops(rf)
        m_rf = sch.fuse(*rf_loops[: n_spatial - 1]) if n_spatial > 1 else None
        n_rf, r_rest = rf_loops[n_spatial - 1], rf_loops[n_spatial:]
        n_out, n_in = sch.split(n_rf, factors=[None, self.rows_per_task])
        sch.reorder(*([n_out] + ([m_rf] if m_rf is not None else []) + [n_in] + list(r_rest)))
        sch.parallel(n_out)
        if unroll > 1:
            word_lane, code_lane = sch.split(r_rest[-1], factors=[unroll, None])
            sch.unroll(word_lane)
            sch.vectorize(code_lane)
        else:
            sch.vectorize(r_rest[-1])
        sch.decompose_reduction(rf, r_rest[0])

        # 3. the lane sum and the epilogues, per output element, right after it is computed
        sch.reverse_compute_at(block, n_in, preserve_unit_loops=True)
        for info in infos[1:]:
            sch.reverse_compute_at(info.block_rv, n_in, preserve_unit_loops=True)
        return sch


def _arithmetic(expr) -> bool:
    """Whether ``expr`` is loads, constants, casts and binary arithmetic only (no call: no
    ``exp``, no ``rsqrt``; nothing else either)."""
    if isinstance(expr, (tirx.IntImm, tirx.FloatImm, tirx.Var)):
        return True
    if isinstance(expr, tvm.ir.expr.TensorLoad):  # a BufferLoad
        return all(_arithmetic(i) for i in expr.indices)
    if isinstance(expr, tirx.Cast):
        return _arithmetic(expr.value)
    if isinstance(expr, (tirx.Add, tirx.Sub, tirx.Mul, tirx.Div, tirx.Min, tirx.Max)):
        return _arithmetic(expr.a) and _arithmetic(expr.b)
    return False


def _arithmetic_only(block: s_tir.SBlock) -> bool:
    """Whether ``block`` stores plain arithmetic (:func:`_arithmetic`), so that computing it again
    wherever it is read costs less than a buffer."""
    return isinstance(block.body, tirx.BufferStore) and _arithmetic(block.body.value)


class RowReductionRule(_SafeRule):
    """RMSNorm-like functions (reductions over a row's last axis, then element-wise) as dlight's
    CPU ``Reduction`` rule schedules them, but with each sum split over vector lanes first
    (``rfactor``): the rule alone adds a row one value at a time, a chain of dependent adds
    (576 of them for SmolLM2, about 0.6 us a row); with 16 partial sums in a vector 8 rows took
    1.4 us instead of 3.7 and 64 rows 4.2 instead of 22.  Element-wise blocks that are plain
    arithmetic (TVM's RMSNorm casts its input and weight, squares, scales, and casts again, each
    into a buffer of its own) are first inlined into what reads them: the row is then read
    twice, once for the sum and once for the output, and no row-sized buffer is allocated per
    call.  SmolLM2's RMSNorm called in a loop took 1.5-2.5 us for 8 rows instead of 3.1-3.2 (one
    row: 0.35 instead of 0.56); in batch-8 decode steps its share of the CPU time (perf) fell from
    5.1% to 0.8%.  Functions of another form are left to the rule itself."""

    def schedule(self, func, target):
        sch = s_tir.Schedule(func)
        for block in sch.get_child_blocks(sch.get_sblock("root"))[:-1]:
            if _arithmetic_only(sch.get(block)):
                try:
                    sch.compute_inline(block)
                except Exception:  # noqa: BLE001 - a reduction, or read where it cannot be inlined
                    pass
        infos = normalize_prim_func(sch)
        if not infos or all(i.is_injective() for i in infos):
            return None
        lanes = vector_bits(target) // 32
        partials = []
        for info in infos:
            if info.is_injective():
                continue
            kinds = info.dom_kind()
            loops = sch.get_loops(info.block_rv)
            if not kinds.endswith("R") or kinds.count("R") != 1 or len(loops) != len(kinds):
                return None
            extent = _extent(sch, loops[-1])
            if extent is None or extent % lanes or extent == lanes:
                return None
            _, lane = sch.split(loops[-1], factors=[None, lanes])
            spatial = len(kinds) - 1
            rf = sch.rfactor(lane, factor_axis=spatial)
            # rfactor puts the lane axis first in both blocks; the rule wants the row's axes
            # first, and the lanes innermost (vectorized) under the remaining reduction
            sch.reorder_block_iter_var(rf, list(range(1, spatial + 1)) + [spatial + 1, 0])
            sch.reorder_block_iter_var(info.block_rv, list(range(1, spatial + 1)) + [0])
            partials.append(sch.get(rf).name_hint)
        result = dl.cpu.Reduction().apply(sch.mod["main"], target, False)
        if not isinstance(result, s_tir.Schedule):
            return None
        for name in partials:
            result.vectorize(result.get_loops(result.get_sblock(name))[-1])
        return result


class InjectiveRule(_SafeRule):
    """Element-wise/gather functions: parallel outer axes, vectorized inner axis."""

    def schedule(self, func, target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(i.is_injective() for i in infos):
            return None
        for info in infos[:-1]:
            try:
                sch.compute_inline(info.block_rv)
            except Exception:  # noqa: BLE001 - keep a block that cannot be inlined
                pass
        block = sch.get_sblock(infos[-1].name)
        loops = sch.get_loops(block)
        if not loops:
            return None
        lanes = vector_bits(target) // 32
        inner = loops[-1]
        inner_ext = _extent(sch, inner)
        vec = _largest_divisor(inner_ext, [lanes, lanes // 2, 4, 2])
        if vec > 1:
            outer_inner, vec_loop = sch.split(inner, factors=[None, vec])
            sch.vectorize(vec_loop)
            loops = sch.get_loops(block)[:-1]
        outer = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        sch.parallel(outer)
        return sch


# Loop iterations (a vectorized loop counts once) up to which a scheduled kernel's parallel loop
# runs on the calling thread: waking the pool costs about 2 us.  A decode step's element-wise
# kernels and RMSNorms (one row per sequence: SmolLM2's RMSNorm is 233 iterations, SwiGLU 96)
# are about 150 calls; with one sequence on one thread SmolLM2 decoded 1.15x as fast.  Up to
# 8192 (8 sequences and a prefill's casts serial too) measured the same at 8 sequences and 3%
# slower prefill than 256.
SERIAL_ITERATIONS = 256


def _iterations(stmt) -> int | None:
    """Innermost iterations of ``stmt`` (a vectorized loop counts once), or ``None`` when a loop
    extent is not static or a statement is of a kind this does not know."""
    if isinstance(stmt, tirx.For):
        inner = _iterations(stmt.body)
        if inner is None or not isinstance(stmt.extent, tirx.IntImm):
            return None
        return inner if stmt.kind == tirx.ForKind.VECTORIZED else int(stmt.extent) * inner
    if isinstance(stmt, tirx.SeqStmt):
        parts = [_iterations(s) for s in stmt.seq]
        return None if None in parts else sum(parts)
    if isinstance(stmt, s_tir.SBlockRealize):
        return _iterations(stmt.block.body)
    if isinstance(stmt, tirx.IfThenElse):
        parts = [_iterations(s) for s in (stmt.then_case, stmt.else_case) if s is not None]
        return None if None in parts else max(parts)
    if isinstance(stmt, (tirx.BufferStore, tirx.Evaluate)):
        return 1
    return None


def _serial_twins(stmt, limit: int):
    """``stmt`` with each parallel loop at its top level (or in a top-level sequence) turned into
    ``if extent * iterations <= limit: <the loop, serial> else: <the loop>``; and whether any was."""
    if isinstance(stmt, tirx.SeqStmt):
        parts = [_serial_twins(s, limit) for s in stmt.seq]
        return (tirx.SeqStmt([s for s, _ in parts]), True) if any(c for _, c in parts) else (stmt, False)
    if isinstance(stmt, tirx.For) and stmt.kind == tirx.ForKind.PARALLEL:
        inner = _iterations(stmt.body)
        if inner is None:
            return stmt, False
        serial = tirx.For(stmt.loop_var, stmt.min, stmt.extent, tirx.ForKind.SERIAL, stmt.body,
                          None, stmt.annotations)
        dtype = stmt.extent.ty.dtype
        small = stmt.extent * tirx.const(inner, dtype) <= tirx.const(limit, dtype)
        return tirx.IfThenElse(small, serial, stmt), True
    return stmt, False


def serial_when_small(func: tirx.PrimFunc, limit: int = SERIAL_ITERATIONS) -> tirx.PrimFunc:
    """``func`` whose parallel loops run serially when their whole work is at most ``limit``
    iterations (:func:`_iterations`): both loops share their body, so the module needs
    ``ConvertSSA`` after.  Functions of another form come back unchanged."""
    realize = func.body
    if not isinstance(realize, s_tir.SBlockRealize):
        return func
    root = realize.block
    body, changed = _serial_twins(root.body, limit)
    if not changed:
        return func
    block = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, body, root.init,
                         root.alloc_buffers, root.match_buffers, root.annotations)
    return func.with_body(s_tir.SBlockRealize(realize.iter_values, realize.predicate, block))


def schedule_pass(target: Target):
    """The module pass applying kiln's CPU rules to every unscheduled PrimFunc (marked
    ``kiln.rules`` for :func:`serial_twins_pass`)."""
    import tvm

    rules = dl.ApplyDefaultSchedule(MatmulRule(), RowReductionRule(), dl.cpu.Reduction(), InjectiveRule())

    @tvm.transform.module_pass(opt_level=0, name="KilnCPUSchedule")
    def _schedule(mod, _ctx):
        fresh = {gv.name_hint for gv, f in mod.functions.items()
                 if isinstance(f, tirx.PrimFunc) and not (f.attrs and f.attrs.get("tirx.is_scheduled"))}
        mod = rules(mod).clone()  # the module a pass gets may be its caller's: change a copy
        for gv, f in list(mod.functions.items()):
            if gv.name_hint in fresh and isinstance(f, tirx.PrimFunc):
                mod[gv] = f.with_attr("kiln.rules", True)
        return mod

    return _schedule


def serial_twins_pass():
    """The module pass giving the rules' kernels serial twins (:func:`serial_when_small`).  It
    runs after ``RewriteDataflowReshape``: a reshape kernel with a twin no longer looks like a
    reshape, and would copy its data instead of becoming a view."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="KilnSerialTwins")
    def _twins(mod, _ctx):
        twins = {}
        for gv, f in mod.functions.items():
            if isinstance(f, tirx.PrimFunc) and f.attrs and f.attrs.get("kiln.rules"):
                twin = serial_when_small(f)
                if not twin.same_as(f):
                    twins[gv] = twin
        if not twins:
            return mod
        mod = mod.clone()
        for gv, f in twins.items():
            mod[gv] = f
        return s_tir.transform.ConvertSSA()(mod)

    return _twins
