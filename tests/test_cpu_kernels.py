"""The CPU backend's kernels and schedule rules, each against numpy or the unscheduled TVM kernel.

Shapes are chosen to hit every path: decode (activations ``[B, 1, K]``) and prefill
(``[1, B, K]``), batch sizes that are not multiples of the tiles (4 rows by 2 weight rows, 2, lone rows), more rows
than one re-layout chunk (64), weight rows whose word count is not a multiple of the vector
width (a vector tail), rows long enough for transposed super blocks of 16 groups and the
words after them, 4-bit asymmetric and symmetric, 8-bit and 2-bit weights, pages that are only
partly filled, grouped-query heads, several sequences in one prefill, and scaled RoPE.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

import kiln  # noqa: F401 - sets TVM's thread count
from kiln import modeling
from kiln.modeling import dense
from kiln.quantization import GroupQuant
from kiln.quantization.layers import q_dense
from kiln_backends import cpu_kernels as ck
from kiln_backends.cpu import host_target
from kiln_backends.cpu_schedules import SERIAL_ITERATIONS, _iterations, schedule_pass, serial_twins_pass, vector_bits

TARGET = tvm.target.Target(host_target({}))
LANES = max(vector_bits(TARGET) // 32, 4)
VNNI = ck.byte_dots(TARGET)  # dot products run on vpdpbusd / vpdpwssd here, else on widening products


def build(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), TARGET)["main"]


def run(fn, inputs, out_shapes, *scalars):
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs]
    outs = [tvm.runtime.empty(shape, dtype) for shape, dtype in out_shapes]
    fn(*args, *outs, *scalars)
    return [o.numpy() for o in outs]


# ------------------------------------------------------------------------ quantized projections
def random_weights(rng, n, k, bits, has_min):
    per_word = 32 // bits
    qw = rng.integers(0, 2**32, (n, k // per_word), dtype=np.uint64).astype(np.uint32)
    qs = (rng.random((n, k // 32)) * 0.02 + 0.001).astype("float16")
    qm = (-rng.random((n, k // 32)) * 0.1).astype("float16") if has_min else None
    return qw, qs, qm


def dequantize(qw, qs, qm, bits):
    """``(codes * scale, offset)``, float64 ``[N, K]`` each: the weight is their sum."""
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(bits)
    codes = ((qw[..., None] >> shifts) & np.uint32((1 << bits) - 1)).reshape(qw.shape[0], -1).astype(np.float64)
    scale = np.repeat(qs.astype(np.float64), 32, axis=-1)
    offset = np.repeat(qm.astype(np.float64), 32, axis=-1) if qm is not None else -((1 << (bits - 1)) - 1) * scale
    return codes * scale, offset


def rounded_activations(x, steps):
    """What the kernel multiplies the weights by: ``x`` rounded per group of 32 to steps of
    ``max|x| / steps`` (float32 arithmetic, as in the kernel), and the steps themselves."""
    groups = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(groups).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(steps) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
    step = (amax * np.float32(1 / steps)).astype(np.float64)
    return (np.round(groups * inv) * step).reshape(x.shape), np.repeat(step[..., 0], 32, axis=-1)


ACTIVATIONS = {"int16": 32767, "int8": 127}  # steps from 0 to a group's largest magnitude


GEMV_CASES = [  # (N, K, bits, asymmetric)
    (64, 576, 4, True),  # 72 words per row: 4 blocks of 16, and a last block over the last 16
    (32, 1536, 4, True),
    (48, 96, 4, False),  # fewer words than one vector: the tail alone
    (40, 576, 8, False),  # llama.cpp's Q8_0 grid, as kiln stores embeddings
    (24, 608, 4, False),  # 76 words: the last block overlaps the one before by 4 words
    (16, 544, 8, True),  # 136 words of 8-bit codes: 8 blocks of 16 and 8 over
    (16, 4288, 4, True),  # long rows run in chunks of blocks (2 at 16 lanes), the last ending with an 8-word tail
    (8, 4192, 4, False),  # 524 words: chunks at 16 lanes, the last ending with the overlapping block (a 12-word tail)
    (8, 2080, 8, False),
    (32, 1088, 2, True),  # 2-bit codes, 2 words a group: super blocks of 2-word units, then a 4-word tail
]


@pytest.mark.parametrize("n,k,bits,asym", GEMV_CASES)
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
@pytest.mark.parametrize("lanes", [4, 8, 16], ids=["neon", "avx2", "avx512"])  # every vector width, whatever this host has
@pytest.mark.parametrize("activations", ["int16", "int8"])
def test_quantized_projection_matches_numpy(n, k, bits, asym, prefill, lanes, activations):
    rng = np.random.default_rng(n + k + bits)
    qw, qs, qm = random_weights(rng, n, k, bits, asym)
    scaled, offset = dequantize(qw, qs, qm, bits)
    int8 = activations == "int8"
    if not ck._gemv_takes(n, k, bits, 32, lanes):  # 8-bit groups are wider than 4 lanes' words
        with pytest.raises(ValueError, match="not supported"):
            ck.quantized_gemv(n, k, bits, 32, "float16", asym, "float32", "float32", lanes, batch_first=not prefill)
        return
    fn = build(ck.quantized_gemv(n, k, bits, 32, "float16", asym, "float32", "float32", lanes, batch_first=not prefill,
                                 int8=int8, vnni=VNNI and lanes <= LANES))
    for rows in (1, 2, 3, 7, 8, 13, 70):  # tiles of 4 (by 2 weight rows), 2, lone rows; two re-layout chunks
        x = rng.standard_normal((rows, k)).astype(np.float32)
        shape = (1, rows, k) if prefill else (rows, 1, k)
        out_shape = (1, rows, n) if prefill else (rows, 1, n)
        weights = [qw, qs] + ([qm] if asym else [])
        (y,) = run(fn, [x.reshape(shape), *weights], [(out_shape, "float32")])
        y = y.reshape(rows, n)
        # the kernel's own arithmetic: the dequantized weights times the rounded activations
        xq, step = rounded_activations(x, ACTIVATIONS[activations])
        emulated = xq @ (scaled + offset).T
        np.testing.assert_allclose(y, emulated, rtol=1e-5, atol=1e-5 * np.abs(emulated).max())
        # and against float64: each activation is off by at most half a step
        exact = x.astype(np.float64) @ (scaled + offset).T
        bound = (step / 2) @ np.abs(scaled + offset).T
        assert np.all(np.abs(y - exact) <= bound * 1.01 + 1e-5 * np.abs(exact).max())
        assert np.abs(y - exact).max() <= (1e-4 if activations == "int16" else 2e-2) * np.abs(exact).max()


@pytest.mark.parametrize("n,lanes", [(2, 4), (4, 16), (8, 8), (8, 16), (16, 16)])
def test_lane_sums_add_each_vector_across_its_lanes(n, lanes):
    """The projections' tree of shuffles that sums a tile's accumulators across lanes at once:
    lane i is vector i's sum, added in the order a single horizontal sum adds it (halves first),
    so the result is bit for bit that of the per-vector sums."""
    from tvm.script import tirx as T

    plan = ck._lane_sums_plan(n, lanes)

    @T.prim_func(private=True)
    def sums(x: T.Buffer((n, lanes), "float32"), y: T.Buffer((n,), "float32")):
        y[T.Ramp(0, 1, n)] = ck._lane_sums([x[i, T.Ramp(0, 1, lanes)] for i in range(n)], plan)

    x = np.random.default_rng(n * lanes).standard_normal((n, lanes)).astype(np.float32)
    (got,) = run(build(sums), [x], [((n,), "float32")])
    want = x.copy()
    width = lanes
    while width > 1:  # halves first, as the per-vector sum adds them
        width //= 2
        want = want[:, :width] + want[:, width:2 * width]
    assert np.array_equal(got, want[:, 0])


@pytest.mark.parametrize("k", [576, 4288])  # whole rows; rows in chunks for the larger tiles
@pytest.mark.parametrize("int8", [False, True], ids=["int16", "int8"])
def test_quantized_projection_does_not_depend_on_the_batch(k, int8):
    """A row's result is bit for bit the same alone and in any batch: batching must not change
    what a request generates."""
    rng = np.random.default_rng(1)
    n = 64
    qw, qs, qm = random_weights(rng, n, k, 4, True)
    fn = build(ck.quantized_gemv(n, k, 4, 32, "float16", True, "float32", "float32", LANES, batch_first=False,
                                 int8=int8, vnni=VNNI))
    x = rng.standard_normal((1, 75, k)).astype(np.float32)
    (whole,) = run(fn, [x, qw, qs, qm], [((1, 75, n), "float32")])
    for rows in (1, 2, 3, 5, 8, 13):
        parts = [run(fn, [x[:, i:i + rows], qw, qs, qm], [((1, min(rows, 75 - i), n), "float32")])[0]
                 for i in range(0, 75, rows)]
        assert np.array_equal(np.concatenate(parts, axis=1), whole), f"batches of {rows} differ"


def test_quantized_projection_equals_the_unscheduled_kernel():
    """Against kiln's own TE definition of the layer, compiled without schedules."""
    rng = np.random.default_rng(2)
    n, k, rows = 96, 576, 5
    scheme = GroupQuant(model_dtype="float32", scale_dtype="float16", symmetric=False)
    q = scheme.quantize_weight((rng.standard_normal((n, k)) * 0.05).astype(np.float32), "w.weight")
    qw, qs, qm = q["w.q_weight"], q["w.q_scale"], q["w.q_min"]
    x = rng.standard_normal((rows, 1, k)).astype(np.float32)
    X = te.placeholder((rows, 1, k), "float32")
    QW, QS, QM = (te.placeholder(a.shape, str(a.dtype)) for a in (qw, qs, qm))
    plain = tvm.compile(te.create_prim_func([X, QW, QS, QM, q_dense(X, QW, QS, QM, bits=4, group_size=32)]), TARGET)
    (ref,) = run(plain["main"], [x, qw, qs, qm], [((rows, 1, n), "float32")])
    fn = build(ck.quantized_gemv(n, k, 4, 32, "float16", True, "float32", "float32", LANES, batch_first=True))
    (y,) = run(fn, [x, qw, qs, qm], [((rows, 1, n), "float32")])
    # the hand kernel rounds activations to int16 steps (see test_quantized_projection_matches_numpy)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_shapes_the_hand_kernel_does_not_take_are_left_to_the_schedule_rules():
    """Rows not a multiple of the task size: no replacement, and the rule-scheduled kernel is right."""
    rng = np.random.default_rng(3)
    n, k = 6, 64
    X = te.placeholder((1, 1, k), "float32")
    qw, qs, _ = random_weights(rng, n, k, 4, False)
    QW, QS = te.placeholder(qw.shape, "uint32"), te.placeholder(qs.shape, "float16")
    func = te.create_prim_func([X, QW, QS, q_dense(X, QW, QS, bits=4, group_size=32)])
    assert ck._gemv_for(func, LANES) is None
    mod = tvm.IRModule({"main": func})
    with TARGET:
        mod = schedule_pass(TARGET)(mod)
    assert "tirx.is_scheduled" in mod["main"].attrs
    x = rng.standard_normal((1, 1, k)).astype(np.float32)
    (y,) = run(tvm.compile(mod, TARGET)["main"], [x, qw, qs], [((1, 1, n), "float32")])
    np.testing.assert_allclose(y[0, 0], x[0, 0] @ sum(dequantize(qw, qs, None, 4)).T, rtol=1e-5, atol=1e-5)


def projection_with(epilogue_fn, n, k, prefill, extra):
    """A fused ``q_matmul`` followed by one element-wise block, as ``FuseOps`` makes it: the
    product ``P`` and the extra inputs go into ``epilogue_fn(P, extra, index)``."""
    batch = tvm.tirx.Var("batch", "int64")
    shape = (1, batch, k) if prefill else (batch, 1, k)
    X = te.placeholder(shape, "float32", name="x")
    QW = te.placeholder((n, k // 8), "uint32", name="qw")
    QS, QM = te.placeholder((n, k // 32), "float16", name="qs"), te.placeholder((n, k // 32), "float16", name="qm")
    P = q_dense(X, QW, QS, QM, bits=4, group_size=32)
    out = te.compute(P.shape, lambda *i: epilogue_fn(P, extra, i), name="T_epilogue")
    return te.create_prim_func([X, QW, QS, QM, *extra, out])


@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
def test_fused_epilogue_equals_the_kernel_then_the_op(prefill):
    """What FuseOps puts after a projection (a residual add, a bias, a cast) runs in the kernel's
    store, and gives bit for bit what the projection kernel followed by the op gives."""
    rng = np.random.default_rng(5)
    n, k = 64, 576
    qw, qs, qm = random_weights(rng, n, k, 4, True)
    plain = build(ck.quantized_gemv(n, k, 4, 32, "float16", True, "float32", "float32", LANES, batch_first=not prefill))
    cases = {  # name: (epilogue, extra inputs' shapes given the rows, numpy of the product and extras)
        "residual": (lambda P, ex, i: ex[0][i] + P[i], lambda r: [(1, r, n) if prefill else (r, 1, n)],
                     lambda y, ex: ex[0] + y),
        "bias": (lambda P, ex, i: P[i] + ex[0][i[-1]], lambda r: [(n,)], lambda y, ex: y + ex[0]),
        "scaled, cast": (lambda P, ex, i: (P[i] * 0.5).astype("float16"), lambda r: [], lambda y, ex: (y * 0.5).astype("float16")),
    }
    for name, (epi, extra_shapes, numpy_epi) in cases.items():
        placeholders = [te.placeholder(s_, "float32", name=f"e{j}") for j, s_ in
                        enumerate(extra_shapes(tvm.tirx.Var("batch", "int64")))]
        func = projection_with(epi, n, k, prefill, placeholders)
        kernel = ck._gemv_for(func, LANES)
        assert kernel is not None, name
        assert [p.name for p in kernel.params][-1] == "y"
        fused = build(kernel)
        out_dtype = "float16" if "cast" in name else "float32"
        for rows in (1, 3, 8, 13):
            x = rng.standard_normal((1, rows, k) if prefill else (rows, 1, k)).astype(np.float32)
            extras = [rng.standard_normal(s_).astype(np.float32) for s_ in extra_shapes(rows)]
            out_shape = (1, rows, n) if prefill else (rows, 1, n)
            (y,) = run(plain, [x, qw, qs, qm], [(out_shape, "float32")])
            (got,) = run(fused, [x, qw, qs, qm, *extras], [(out_shape, out_dtype)])
            assert np.array_equal(got, numpy_epi(y, extras)), f"{name}, {rows} rows"


def test_epilogues_that_are_not_element_wise_are_not_fused():
    """A block reading the product anywhere but at its own index (a split, a reversal) is not an
    epilogue: the function is left to the schedule rules."""
    n, k = 64, 576
    func = projection_with(lambda P, ex, i: P[i] * P[(*i[:-1], n - 1 - i[-1])], n, k, False, [])
    assert ck._gemv_for(func, LANES) is None


def projection_into_heads(n, k, schedule):
    """A float32 model's fused QKV projection on its way to a float16 KV cache, as kiln's
    layers emit it: ``astype(reshape(q_matmul(x), heads), float16)``, through the CPU backend's
    pipeline (``schedule`` 1: kiln's, 0: unscheduled TIR); the pipeline's module and the
    compiled function."""
    from tvm import relax

    from kiln_backends.cpu import pipeline

    batch = tvm.tirx.Var("batch", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, 1, k), "float32"))
    qw = relax.Var("qw", relax.TensorType((n, k // 8), "uint32"))
    qs, qm = (relax.Var(name, relax.TensorType((n, k // 32), "float16")) for name in ("qs", "qm"))
    with bb.function("main", [x, qw, qs, qm]):
        with bb.dataflow():
            y = bb.emit_te(lambda *a: q_dense(*a, bits=4, group_size=32), x, qw, qs, qm, primfunc_name_hint="q_matmul")
            heads = bb.emit(relax.op.reshape(y, (batch, 1, n // 16, 16)))
            out = bb.emit_output(relax.op.astype(heads, "float16"))
        bb.emit_func_output(out)
    passes = pipeline(TARGET, {"schedule": schedule})
    lowered = passes(bb.get())
    vm = relax.VirtualMachine(tvm.compile(bb.get(), TARGET, relax_pipeline=passes), tvm.cpu())
    return lowered, vm["main"]


def test_a_cast_after_the_projections_reshape_runs_in_the_projection():
    """The cast to the KV cache's dtype after the QKV projection's reshape into heads becomes
    the projection kernel's epilogue (kiln's pipeline casts before reshaping): no kernel of its
    own, and the same values as the unscheduled pipeline's projection, reshape and cast."""
    n, k = 96, 576
    lowered, fused = projection_into_heads(n, k, schedule=1)
    kernels = {gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert any("q_matmul" in name and "cast" in name for name in kernels), kernels
    assert not any(name.startswith("cast") for name in kernels), kernels
    _, plain = projection_into_heads(n, k, schedule=0)
    rng = np.random.default_rng(11)
    qw, qs, qm = random_weights(rng, n, k, 4, True)
    for rows in (1, 3, 8):
        args = [tvm.runtime.tensor(a) for a in (rng.standard_normal((rows, 1, k)).astype(np.float32), qw, qs, qm)]
        got, want = fused(*args).numpy(), plain(*args).numpy()
        assert got.shape == want.shape == (rows, 1, n // 16, 16) and got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("m,n,k", [(1, 40, 64), (7, 33, 100), (16, 64, 128)])
def test_float_matmul_rule_matches_numpy(m, n, k):
    """The schedule rule for float projections (q0f32), including extents that do not divide
    the vector width or the rows per task."""
    rng = np.random.default_rng(m * n)
    X, Wt = te.placeholder((m, 1, k), "float32"), te.placeholder((n, k), "float32")
    mod = tvm.IRModule({"main": te.create_prim_func([X, Wt, dense(X, Wt)])})
    with TARGET:
        mod = schedule_pass(TARGET)(mod)
    x, w = rng.standard_normal((m, 1, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    (y,) = run(tvm.compile(mod, TARGET)["main"], [x, w], [((m, 1, n), "float32")])
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-4)


def silu_and_rms_norm(rows, dim):
    """TE inputs ``A`` [rows, 2 dim] and ``G`` [dim], a fused split + SiLU + multiply of ``A``
    (the injective rule's kind of kernel) and an RMSNorm of its first half (the reduction rules')."""
    A = te.placeholder((rows, 2 * dim), "float32")
    G = te.placeholder((dim,), "float32")
    silu = te.compute((rows, dim), lambda i, j: A[i, j] / (1 + te.exp(-A[i, j])) * A[i, dim + j], name="silu_mul")
    k = te.reduce_axis((0, dim), name="k")
    sq = te.compute((rows,), lambda i: te.sum(A[i, k] * A[i, k], axis=k), name="sq")
    norm = te.compute((rows, dim), lambda i, j: A[i, j] * te.rsqrt(sq[i] / dim + 1e-5) * G[j], name="norm")
    return A, G, silu, norm


@pytest.mark.parametrize("shape", [(3, 576), (5, 37)])
def test_injective_and_reduction_rules_match_the_unscheduled_kernels(shape):
    """RMSNorm (row-reduction rule, or dlight's reduction rule where the vector lanes do not
    divide the row) and a fused split + SiLU + multiply (injective rule)."""
    rng = np.random.default_rng(4)
    rows, dim = shape
    A, G, silu, norm = silu_and_rms_norm(rows, dim)
    a = rng.standard_normal((rows, 2 * dim)).astype(np.float32)
    g = rng.standard_normal(dim).astype(np.float32)
    for outs, inputs in (([A, silu], [a]), ([A, G, norm], [a, g])):
        plain = tvm.IRModule({"main": te.create_prim_func(outs)})
        mod = plain
        with TARGET:
            mod = schedule_pass(TARGET)(mod)
        assert "tirx.is_scheduled" in mod["main"].attrs
        if len(inputs) == 2:  # RMSNorm: a row's sum over vector lanes where they divide it
            assert ("_rf" in mod["main"].script()) == (dim % LANES == 0)
        (ref,) = run(tvm.compile(plain, TARGET)["main"], inputs, [((rows, dim), "float32")])
        (y,) = run(tvm.compile(mod, TARGET)["main"], inputs, [((rows, dim), "float32")])
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def legalized_norm(kind, dim):
    """TVM's own kernel for ``R.nn.rms_norm`` or ``R.nn.layer_norm`` over the last axis of
    ``[batch, 1, dim]`` float32 (``batch`` symbolic), as the models' norms reach the schedule rules."""
    from tvm import relax

    bb = relax.BlockBuilder()
    batch = tvm.tirx.Var("batch", "int64")
    x = relax.Var("x", relax.TensorType((batch, 1, dim), "float32"))
    g, b = (relax.Var(name, relax.TensorType((dim,), "float32")) for name in ("g", "b"))
    params = [x, g] if kind == "rms_norm" else [x, g, b]
    with bb.function("main", params):
        with bb.dataflow():
            norm = (relax.op.nn.rms_norm(x, g, axes=[-1], epsilon=1e-5) if kind == "rms_norm"
                    else relax.op.nn.layer_norm(x, g, b, axes=[-1], epsilon=1e-5))
            out = bb.emit_output(norm)
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    return next(f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


@pytest.mark.parametrize("kind", ["rms_norm", "layer_norm"])
def test_norms_are_computed_from_the_row_without_buffers_of_its_size(kind):
    """TVM's RMSNorm kernel casts, squares and scales a row into a buffer of the row's size at
    each step; scheduled, those steps are inlined (a row is read for its sum and again for the
    output, no row-sized buffer is allocated per call), with the unscheduled results.  The same
    for LayerNorm (its mean inlined into the variance and the output)."""
    dim = 576
    plain = legalized_norm(kind, dim).with_attr("global_symbol", "main")
    mod = tvm.IRModule({"main": plain})
    with TARGET:
        mod = serial_twins_pass()(schedule_pass(TARGET)(mod))
    scheduled = mod["main"]
    assert "tirx.is_scheduled" in scheduled.attrs
    script = scheduled.script()
    assert "T.sblock_alloc_buffer((batch, T.int64(1), T.int64(576))" not in script, script
    if kind == "rms_norm":  # TVM's own: three of them
        assert plain.script().count("T.sblock_alloc_buffer((batch, T.int64(1), T.int64(576))") == 3
    reference, fn = build(plain), tvm.compile(mod, TARGET)["main"]
    rng = np.random.default_rng(8)
    inputs = [rng.standard_normal(dim).astype(np.float32) for _ in range(2 if kind == "rms_norm" else 3)]
    for rows in (1, 3, 8, 40):  # serial and parallel
        inputs[0] = rng.standard_normal((rows, 1, dim)).astype(np.float32) * 3
        (ref,) = run(reference, inputs, [((rows, 1, dim), "float32")])
        (y,) = run(fn, inputs, [((rows, 1, dim), "float32")])
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_small_kernels_run_serially_and_large_ones_in_parallel_with_the_same_results():
    """The rules' kernels get a serial twin for small work (a decode step's RMSNorm and
    element-wise kernels): row counts on both sides of the threshold give the unscheduled
    kernel's results, and both loops are in the code."""
    rng = np.random.default_rng(7)
    dim = 576
    rows = te.var("rows", "int64")
    A, G, silu, norm = silu_and_rms_norm(rows, dim)
    for outs, with_g in (([A, silu], False), ([A, G, norm], True)):
        plain = tvm.IRModule({"main": te.create_prim_func(outs)})
        with TARGET:
            mod = serial_twins_pass()(schedule_pass(TARGET)(plain))
        func = mod["main"]
        twin = func.body.block.body
        assert isinstance(twin, tvm.tirx.IfThenElse)
        assert twin.then_case.kind == tvm.tirx.ForKind.SERIAL and twin.else_case.kind == tvm.tirx.ForKind.PARALLEL
        per_row = _iterations(twin.else_case.body) * int(twin.else_case.extent.b) if isinstance(
            twin.else_case.extent, tvm.tirx.Mul) else _iterations(twin.else_case.body)
        serial_rows = SERIAL_ITERATIONS // per_row
        assert serial_rows >= 1
        ref_fn = tvm.compile(plain, TARGET)["main"]
        fn = tvm.compile(mod, TARGET)["main"]
        for n in (1, serial_rows, serial_rows + 1, 3 * serial_rows + 5):
            a = rng.standard_normal((n, 2 * dim)).astype(np.float32)
            inputs = [a, rng.standard_normal(dim).astype(np.float32)] if with_g else [a]
            (ref,) = run(ref_fn, inputs, [((n, dim), "float32")])
            (y,) = run(fn, inputs, [((n, dim), "float32")])
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ attention
@pytest.mark.parametrize("name,low,high,ref", [("fast_exp2", -125, 126, np.exp2), ("fast_exp", -87, 88, np.exp)])
def test_polynomial_exponentials_are_accurate(name, low, high, ref):
    """The vectorizable exponentials of kiln.modeling (attention's exp2, the MLP's SiLU)."""
    fast = getattr(modeling, name)
    x = np.concatenate([np.linspace(low, high, 200001), np.linspace(-1, 1, 2001)]).astype(np.float32)
    X = te.placeholder(x.shape, "float32")
    fn = tvm.compile(te.create_prim_func([X, te.compute(x.shape, lambda i: fast(X[i]))]), TARGET)["main"]
    (y,) = run(fn, [x], [(x.shape, "float32")])
    np.testing.assert_allclose(y, ref(x.astype(np.float64)), rtol=3e-7)


def test_swiglu_matches_numpy():
    rng = np.random.default_rng(6)
    gate_up = (rng.standard_normal((3, 5, 2 * 37)) * 4).astype(np.float32)
    X = te.placeholder(gate_up.shape, "float32")
    mod = tvm.IRModule({"main": te.create_prim_func([X, modeling._swiglu(X)])})
    with TARGET:
        mod = schedule_pass(TARGET)(mod)
    (y,) = run(tvm.compile(mod, TARGET)["main"], [gate_up], [((3, 5, 37), "float32")])
    g, u = gate_up[..., :37].astype(np.float64), gate_up[..., 37:].astype(np.float64)
    np.testing.assert_allclose(y, g / (1 + np.exp(-g)) * u, rtol=1e-6, atol=1e-6)


def attention_reference(q, keys, values, causal_offset=None):
    """Softmax attention of each query row over ``keys``/``values`` [n, heads_kv, d] in float64;
    returns the output and TVM's log2-sum-exp."""
    heads, d = q.shape[1], q.shape[2]
    group = heads // keys.shape[1]
    out = np.zeros(q.shape)
    lse = np.zeros(q.shape[:2])
    for i in range(q.shape[0]):
        n = keys.shape[0] if causal_offset is None else causal_offset + i + 1
        for h in range(heads):
            s = keys[:n, h // group].astype(np.float64) @ q[i, h] / np.sqrt(d)
            p = np.exp(s - s.max())
            out[i, h] = p @ values[:n, h // group] / p.sum()
            lse[i, h] = (np.log(p.sum()) + s.max()) / np.log(2)
    return out, lse


@pytest.mark.parametrize("heads,kv_heads,dim,dtype", [(9, 3, 64, "float32"), (4, 4, 32, "float32"), (6, 2, 24, "float32"),
                                                    (9, 3, 64, "float16"), (6, 2, 24, "float16")])
def test_decode_attention_matches_numpy(heads, kv_heads, dim, dtype):
    """float16: the cache of the 4-bit schemes; the output is rounded to float16 (2**-11)."""
    rng = np.random.default_rng(heads * dim)
    page = 16
    lengths = [1, 16, 37, 100]  # one token, a full page, partly filled last pages
    fn = build(ck.decode_attention(heads, kv_heads, dim, dtype, page))
    n_pages = [-(-n // page) for n in lengths]
    pages = rng.standard_normal((sum(n_pages) + 2, 2, kv_heads, page, dim)).astype(dtype)
    order = rng.permutation(sum(n_pages)).astype(np.int32)  # pages scattered through the pool
    indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    last = np.array([n - (p - 1) * page for n, p in zip(lengths, n_pages)], np.int32)
    q = rng.standard_normal((len(lengths), heads, dim)).astype(dtype)
    zeros = np.zeros(len(lengths), np.int32)
    out, lse = run(fn, [q, pages, indptr, order, last, zeros, zeros],
                   [((len(lengths), heads, dim), dtype), ((len(lengths), heads), "float32")],
                   0, 1.0, 1e4, dim**-0.5)
    tol = 1e-5 if dtype == "float32" else 2e-3
    for b, n in enumerate(lengths):
        mine = order[indptr[b]:indptr[b + 1]]
        keys = pages[mine, 0].transpose(1, 0, 2, 3).reshape(kv_heads, -1, dim)[:, :n].transpose(1, 0, 2)
        values = pages[mine, 1].transpose(1, 0, 2, 3).reshape(kv_heads, -1, dim)[:, :n].transpose(1, 0, 2)
        ref, ref_lse = attention_reference(q[b:b + 1], keys, values)
        np.testing.assert_allclose(out[b].astype(np.float64), ref[0], rtol=tol, atol=tol)
        np.testing.assert_allclose(lse[b], ref_lse[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 32)])
def test_prefill_attention_matches_numpy(heads, kv_heads, dim):
    rng = np.random.default_rng(heads + dim)
    q_lens, kv_lens = [5, 1, 40], [5, 3, 57]  # causal rows see the keys before them plus the earlier ones
    fn = build(ck.prefill_attention(heads, kv_heads, dim, "float32"))
    q = rng.standard_normal((sum(q_lens), heads, dim)).astype(np.float32)
    k = rng.standard_normal((sum(kv_lens), kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((sum(kv_lens), kv_heads, dim)).astype(np.float32)
    q_ptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    kv_ptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    zeros_q, zeros_b = np.zeros(sum(q_lens), np.int32), np.zeros(len(q_lens), np.int32)
    for causal in (1, 0):
        out, lse = run(fn, [q, q_ptr, k, v, kv_ptr, zeros_q, zeros_b],
                       [((sum(q_lens), heads, dim), "float32"), ((sum(q_lens), heads), "float32")],
                       causal, 0, 1.0, 1e4, dim**-0.5)
        for b, (nq, nk) in enumerate(zip(q_lens, kv_lens)):
            rows = slice(q_ptr[b], q_ptr[b + 1])
            keys, values = k[kv_ptr[b]:kv_ptr[b + 1]], v[kv_ptr[b]:kv_ptr[b + 1]]
            ref, ref_lse = attention_reference(q[rows], keys, values, nk - nq if causal else None)
            np.testing.assert_allclose(out[rows], ref, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(lse[rows], ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,dim,dtype", [(9, 3, 64, "float32"), (4, 4, 32, "float32"), (9, 3, 64, "float16")])
def test_paged_prefill_attention_matches_numpy(heads, kv_heads, dim, dtype):
    """A prefill chunk's queries against the keys cached before it (a prompt longer than a chunk,
    a chat's next turn): sequences with several pages, a partly filled last page, one page, none;
    causal (row i sees the cache up to its own position) and not."""
    rng = np.random.default_rng(heads + dim + len(dtype))
    page = 16
    cached, q_lens = [37, 16, 0, 100], [5, 1, 3, 20]
    fn = build(ck.paged_prefill_attention(heads, kv_heads, dim, dtype, page))
    n_pages = [-(-n // page) for n in cached]
    pages = rng.standard_normal((sum(n_pages) + 2, 2, kv_heads, page, dim)).astype(dtype)
    order = rng.permutation(sum(n_pages) + 2)[:sum(n_pages)].astype(np.int32)  # scattered through the pool
    page_ptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    last = np.array([n - (p - 1) * page if p else 0 for n, p in zip(cached, n_pages)], np.int32)
    q_ptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((sum(q_lens), heads, dim)).astype(dtype)
    tol = 1e-5 if dtype == "float32" else 2e-3
    for causal in (0, 1):
        out, lse = run(fn, [q, q_ptr, pages, page_ptr, order, last, np.zeros(4, np.int32), np.zeros(sum(q_lens), np.int32)],
                       [((sum(q_lens), heads, dim), dtype), ((sum(q_lens), heads), "float32")],
                       causal, 0, 1.0, 1e4, dim**-0.5)
        for b, (n, nq) in enumerate(zip(cached, q_lens)):
            rows = slice(q_ptr[b], q_ptr[b + 1])
            if n == 0:  # nothing cached: no weight in the merge with the chunk's own attention
                assert np.all(out[rows] == 0) and np.all(lse[rows] < -1e4)
                continue
            mine = order[page_ptr[b]:page_ptr[b + 1]]
            keys = pages[mine, 0].transpose(1, 0, 2, 3).reshape(kv_heads, -1, dim)[:, :n].transpose(1, 0, 2)
            values = pages[mine, 1].transpose(1, 0, 2, 3).reshape(kv_heads, -1, dim)[:, :n].transpose(1, 0, 2)
            ref, ref_lse = attention_reference(q[rows], keys, values, n - nq if causal else None)
            np.testing.assert_allclose(out[rows].astype(np.float64), ref, rtol=tol, atol=tol, err_msg=f"causal={causal}")
            np.testing.assert_allclose(lse[rows], ref_lse, rtol=1e-5, atol=1e-5, err_msg=f"causal={causal}")


# ------------------------------------------------------------------------ RoPE
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("tokens", [3, 40], ids=["decode", "prefill"])  # one thread; in parallel
def test_kv_append_equals_tvms_kernel(tokens, dtype):
    """Every token lands in its slot (keys and values, every head), -1 slots are skipped, and
    nothing else in the pool changes: exactly what TVM's kernel does."""
    from tvm.relax.frontend.nn.llm.kv_cache import _kv_cache_transpose_append

    kv_heads, dim, page = 3, 64, 16
    rng = np.random.default_rng(tokens)
    pages = rng.standard_normal((8, 2, kv_heads, page, dim)).astype(dtype)
    k = rng.standard_normal((tokens, kv_heads, dim)).astype(dtype)
    v = rng.standard_normal((tokens, kv_heads, dim)).astype(dtype)
    slots = rng.permutation(8 * page)[:tokens].astype(np.int32)
    slots[1] = -1  # a token not to cache
    results = []
    for fn in (build(ck.kv_append(kv_heads, dim, dtype, page)), build(_kv_cache_transpose_append(kv_heads, dim, dtype))):
        pool = tvm.runtime.tensor(pages.copy())
        fn(pool, tvm.runtime.tensor(k), tvm.runtime.tensor(v), tvm.runtime.tensor(slots))
        results.append(pool.numpy())
    np.testing.assert_array_equal(results[0], results[1])
    assert not np.array_equal(results[0], pages)


@pytest.mark.parametrize("theta,scale,scaling", [
    (10000.0, 1.0, {}),
    (100000.0, 0.25, {}),  # linear scaling (positions scaled)
    (500000.0, 1.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}),
])
def test_rope_equals_tvms_kernel(theta, scale, scaling):
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

    heads, kv_heads, dim = 6, 2, 64
    record = {"theta": theta, "scale": scale, "rope_scaling": scaling, "rotary_dim": dim}
    mine = build(ck.rope(heads, kv_heads, dim, "float32", record))
    theirs = build(llama_rope_with_position_map(theta, scale, dim, heads, kv_heads, "float32", scaling))
    rng = np.random.default_rng(5)
    some = np.array([0, 1, 2, 17, 100, 1000, 4095, 5, 6, 8000, 3], np.int32)
    for positions in (some, np.concatenate([some, np.arange(300, 330, dtype=np.int32)])):  # a decode step, a prefill
        tokens = len(positions)
        qkv = rng.standard_normal((tokens, heads + 2 * kv_heads, dim)).astype(np.float32)
        shapes = [((tokens, heads, dim), "float32"), ((tokens, kv_heads, dim), "float32"), ((tokens, kv_heads, dim), "float32")]
        for apply in (1, 0):
            ours = run(mine, [qkv, positions], shapes, apply)
            ref = run(theirs, [qkv, positions], shapes, apply)
            for a, b in zip(ours, ref):
                np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)
