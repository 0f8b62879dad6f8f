"""The CPU backend's kernels over weights interleaved 16 (AVX-512) or 8 (AVX2) rows to a vector,
the relayout that makes that layout at load, and the compile pass that decides which weights
get it.  Each kernel variant is tested where this CPU can run it: all of them on one with
AVX-512 VNNI.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

import kiln  # noqa: F401 - sets TVM's thread count
from kiln.quantization.layers import q_dense, q_take
from kiln_backends import cpu_interleaved as ci
from kiln_backends import cpu_kernels as ck
from kiln_backends.cpu import host_target
from tvm.target.codegen import llvm_cpu_has_features

from test_cpu_kernels import ACTIVATIONS, build, dequantize, random_weights, rounded_activations, run

TARGET = tvm.target.Target(host_target({}))
HOST_ROWS = ci.interleave_rows(TARGET)
pytestmark = pytest.mark.skipif(not HOST_ROWS, reason="the interleaved kernels are written for AVX2 and AVX-512")

# (weight rows per vector, VNNI dot products): AVX-512 with and without VNNI, AVX2 with and without
VARIANTS = [pytest.param(16, True, id="avx512-vnni"), pytest.param(16, False, id="avx512"),
            pytest.param(8, True, id="avx2-vnni"), pytest.param(8, False, id="avx2")]


def need(rows, vnni):
    """Skip a variant this CPU cannot run (its instructions, not kiln's choice for the CPU)."""
    has = lambda f: llvm_cpu_has_features([f], TARGET)  # noqa: E731
    ok = has("avx512bw") if rows == 16 else has("avx2")
    if vnni:
        ok = ok and (has("avx512vnni") and (rows == 16 or has("avx512vl")) or rows == 8 and has("avxvnni"))
    if not ok:
        pytest.skip(f"this CPU cannot run the {rows}-row kernel{' with VNNI' if vnni else ''}")


def interleaved(*arrays, rows=16):
    return [ci.interleave(a, rows) for a in arrays if a is not None]


CASES = [  # (N, K, bits, asymmetric)
    (64, 576, 4, True),  # SmolLM2's rows of 576: 18 groups
    (32, 1536, 4, True),
    (48, 96, 4, False),
    (32, 576, 8, False),  # 8-bit codes, as kiln stores embeddings: pairs (c_s, c_s+2)
    (16, 544, 8, True),
    (16, 1088, 2, True),  # 2-bit codes: pairs (c_s, c_s+8)
]


@pytest.mark.parametrize("n,k,bits,asym", CASES)
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
@pytest.mark.parametrize("activations", ["int16", "int8"])
@pytest.mark.parametrize("rows,vnni", VARIANTS)
def test_interleaved_projection_matches_numpy(n, k, bits, asym, prefill, activations, rows, vnni):
    need(rows, vnni)
    rng = np.random.default_rng(n + k + bits)
    qw, qs, qm = random_weights(rng, n, k, bits, asym)
    scaled, offset = dequantize(qw, qs, qm, bits)
    fn = build(ci.interleaved_gemv(n, k, bits, 32, "float16", asym, "float32", "float32", batch_first=not prefill,
                                   int8=activations == "int8", rows=rows, vnni=vnni))
    for batch in (1, 2, 3, 7, 8, 13, 70):  # tiles of 8 (AVX2: 4), 4, 2 and 1 sequences; two chunks of 64
        x = rng.standard_normal((batch, k)).astype(np.float32)
        shape, out_shape = ((1, batch, k), (1, batch, n)) if prefill else ((batch, 1, k), (batch, 1, n))
        (y,) = run(fn, [x.reshape(shape), *interleaved(qw, qs, qm, rows=rows)], [(out_shape, "float32")])
        y = y.reshape(batch, n)
        xq, step = rounded_activations(x, ACTIVATIONS[activations])
        emulated = xq @ (scaled + offset).T  # the dequantized weights times the rounded activations
        np.testing.assert_allclose(y, emulated, rtol=1e-5, atol=1e-5 * np.abs(emulated).max())
        exact = x.astype(np.float64) @ (scaled + offset).T  # each activation off by at most half a step
        bound = (step / 2) @ np.abs(scaled + offset).T
        assert np.all(np.abs(y - exact) <= bound * 1.01 + 1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("int8", [False, True], ids=["int16", "int8"])
@pytest.mark.parametrize("rows,vnni", VARIANTS)
def test_interleaved_projection_does_not_depend_on_the_batch(int8, rows, vnni):
    """Each output is one lane accumulated group after group: a row's result is bit for bit the
    same alone and in any batch, so batching does not change what a request generates."""
    need(rows, vnni)
    rng = np.random.default_rng(1)
    n, k = 64, 576
    qw, qs, qm = random_weights(rng, n, k, 4, True)
    fn = build(ci.interleaved_gemv(n, k, 4, 32, "float16", True, "float32", "float32", batch_first=False, int8=int8,
                                   rows=rows, vnni=vnni))
    weights = interleaved(qw, qs, qm, rows=rows)
    x = rng.standard_normal((1, 75, k)).astype(np.float32)
    (whole,) = run(fn, [x, *weights], [((1, 75, n), "float32")])
    for rows in (1, 2, 3, 5, 8, 13):
        parts = [run(fn, [x[:, i:i + rows], *weights], [((1, min(rows, 75 - i), n), "float32")])[0]
                 for i in range(0, 75, rows)]
        assert np.array_equal(np.concatenate(parts, axis=1), whole), f"batches of {rows} differ"


def test_shapes_the_interleaved_kernel_does_not_take():
    assert ci.interleaved_takes(64, 576, 4, 32)
    assert not ci.interleaved_takes(40, 576, 4, 32)  # rows not a multiple of 16
    assert ci.interleaved_takes(40, 576, 4, 32, rows=8)  # but of 8 (AVX2)
    assert not ci.interleaved_takes(64, 576, 4, 32, rows=4)  # 128-bit vectors keep the row-major kernel
    assert not ci.interleaved_takes(64, 576, 4, 24)  # a group that does not fold in halves to 8 lanes
    assert not ci.interleaved_takes(64, 1024, 8, 512)  # a group's int32 sum could overflow
    assert ci.interleaved_takes(64, 1024, 8, 512, int8=True)  # not with int8 steps
    with pytest.raises(ValueError, match="not supported"):
        ci.interleaved_gemv(40, 576, 4, 32, "float16", True, "float32", "float32", batch_first=True)


@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
def test_interleaved_kernel_takes_the_fused_residual_add(prefill):
    """A projection fused with the residual add after it (FuseOps) becomes one interleaved kernel
    whose result is bit for bit the kernel's product plus the residual."""
    rng = np.random.default_rng(5)
    n, k = 64, 576
    qw, qs, qm = random_weights(rng, n, k, 4, True)
    batch = tvm.tirx.Var("batch", "int64")
    X = te.placeholder((1, batch, k) if prefill else (batch, 1, k), "float32", name="x")
    QW = te.placeholder((n, k // 8), "uint32", name="qw")
    QS, QM = te.placeholder((n, k // 32), "float16", name="qs"), te.placeholder((n, k // 32), "float16", name="qm")
    R = te.placeholder((1, batch, n) if prefill else (batch, 1, n), "float32", name="r")
    P = q_dense(X, QW, QS, QM, bits=4, group_size=32)
    out = te.compute(P.shape, lambda *i: R[i] + P[i], name="T_add")
    func = te.create_prim_func([X, QW, QS, QM, R, out])
    vnni = ck.byte_dots(TARGET)
    assert ck._gemv_for(func, HOST_ROWS, build=False, interleaved=True) == {"qw": 1, "qs": 2, "qm": 3}
    fused = build(ck._gemv_for(func, HOST_ROWS, interleaved=True, vnni=vnni))
    plain = build(ci.interleaved_gemv(n, k, 4, 32, "float16", True, "float32", "float32", batch_first=not prefill,
                                      rows=HOST_ROWS, vnni=vnni))
    for rows in (1, 8, 13):
        shape, out_shape = ((1, rows, k), (1, rows, n)) if prefill else ((rows, 1, k), (rows, 1, n))
        x = rng.standard_normal(shape).astype(np.float32)
        r = rng.standard_normal(out_shape).astype(np.float32)
        (y,) = run(plain, [x, *interleaved(qw, qs, qm, rows=HOST_ROWS)], [(out_shape, "float32")])
        (got,) = run(fused, [x, *interleaved(qw, qs, qm, rows=HOST_ROWS), r], [(out_shape, "float32")])
        assert np.array_equal(got, r + y)


@pytest.mark.parametrize("n,c,dtype", [(64, 72, "uint32"), (32, 18, "float16"), (48, 5, "float32")])
@pytest.mark.parametrize("rows", [16, 8])
def test_relayout_kernel_equals_numpy(n, c, dtype, rows):
    rng = np.random.default_rng(n * c)
    a = (rng.integers(0, 2**32, (n, c), dtype=np.uint64) if dtype == "uint32" else rng.standard_normal((n, c))).astype(dtype)
    (got,) = run(build(ci.interleave_kernel(n, c, dtype, rows)), [a], [((n, c), dtype)])
    assert np.array_equal(got, ci.interleave(a, rows))
    assert np.array_equal(got.reshape(n // rows, c, rows)[1, 2, 3], a[rows + 3, 2])  # row rows + 3, column 2


def test_rows_per_vector_follow_the_target():
    def rows(**attrs):
        return ci.interleave_rows(tvm.target.Target({"kind": "llvm", **attrs}))

    assert rows(mcpu="sapphirerapids") == 16
    assert rows(mcpu="znver3") == 8  # AVX2
    assert rows(mcpu="nehalem") == 0  # SSE only: row-major
    assert rows(mtriple="aarch64-linux-gnu", mcpu="cortex-a76") == 0


@pytest.mark.parametrize("bits,asym", [(8, False), (4, True)])
@pytest.mark.parametrize("rows", [16, 8])
def test_interleaved_gather_equals_q_take(bits, asym, rows):
    """A tied embedding's table is the LM head's: the gather reads it interleaved and gives bit for
    bit what kiln's ``q_take`` gives on the row-major table, ids out of range clipped alike."""
    rng = np.random.default_rng(bits)
    vocab, dim = 96, 64
    qw, qs, qm = random_weights(rng, vocab, dim, bits, asym)
    n = tvm.tirx.Var("n", "int64")
    ids = te.placeholder((n,), "int32", name="ids")
    QW, QS = te.placeholder(qw.shape, "uint32", name="qw"), te.placeholder(qs.shape, "float16", name="qs")
    QM = te.placeholder(qm.shape, "float16", name="qm") if asym else None
    out = q_take(ids, QW, QS, QM, bits=bits, group_size=32, dim=dim, dtype="float32")
    func = te.create_prim_func([ids, QW, QS, *([QM] if asym else []), out])
    assert ci._take_for(func, rows, build=False) == {"qw": 1, "qs": 2, **({"qm": 3} if asym else {})}
    plain = tvm.compile(func, TARGET)["main"]
    gather = build(ci._take_for(func, rows))
    tokens = np.array([0, 95, 17, 16, 200, -3, 31], dtype=np.int32)
    weights = [qw, qs] + ([qm] if asym else [])
    (want,) = run(plain, [tokens, *weights], [((len(tokens), dim), "float32")])
    (got,) = run(gather, [tokens, *interleaved(*weights, rows=rows)], [((len(tokens), dim), "float32")])
    assert np.array_equal(got, want)
    assert np.array_equal(got[4], want[1])  # 200 clipped to the last row


@pytest.fixture(scope="module", params=[320, 260], ids=["vocab320", "vocab260"])
def tied_checkpoint(request, tmp_path_factory):
    """A small random Llama with tied embeddings; a vocabulary of 260 rows is not a whole number
    of 16- or 8-row blocks, so its table (embedding and LM head) must stay row-major."""
    from kiln.testing import make_hf_checkpoint, write_byte_tokenizer

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": request.param,
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 256, "bos_token_id": 256, "eos_token_id": 257,
              "tie_word_embeddings": True}
    path = make_hf_checkpoint(tmp_path_factory.mktemp("interleaved") / "ckpt", config, init_std=0.1)
    write_byte_tokenizer(path)
    return path, request.param


def test_compiled_model_lays_out_exactly_the_weights_its_kernels_read(kiln_build, tied_checkpoint):
    """On a whole model: the library's ``_param_layout`` interleaves the quantized tensors of every
    projection and of the tied embedding (when its rows are whole blocks of 16, or 8 with AVX2) and returns every
    other parameter as stored; the model then computes what the row-major kernels compute."""
    from kiln.runtime.model import LoadedModel, load_params

    path, vocab = tied_checkpoint
    built = kiln_build(path, "q4f32_2", context_window_size=128, max_batch_size=4)
    rows = kiln_build(path, "q4f32_2", opt="interleave=0", context_window_size=128, max_batch_size=4)
    model, plain = LoadedModel(built.model_dir, built.lib), LoadedModel(rows.model_dir, rows.lib)
    assert model.vm.module.implements_function("_param_layout")
    assert not plain.vm.module.implements_function("_param_layout")
    stored = load_params(model.model_dir, model.param_names, model.device)
    changed = 0
    for name, before, after in zip(model.param_names, stored, model.params):
        before, after = before.numpy(), after.numpy()
        quantized = name.rsplit(".", 1)[-1] in ("q_weight", "q_scale", "q_min")
        if quantized and (vocab % HOST_ROWS == 0 or "embed_tokens" not in name):
            assert np.array_equal(after, ci.interleave(before, HOST_ROWS)), name
            changed += 1
        else:
            assert np.array_equal(after, before), name
    assert changed >= 2 * 4 * 3  # 4 projections a layer, 3 tensors each (q4f32_2 has minima)
    tokens = [[5, 80, 200, 13, 7, 99], [1, 2, 3]]
    logits = {}
    for key, m in (("interleaved", model), ("rows", plain)):
        m.create_kv_cache(4, 128)
        for seq in (0, 1):
            m.add_sequence(seq)
        first = m.prefill([0, 1], tokens)
        logits[key] = np.concatenate([first, m.decode([0, 1], [17, 42])])
    # the two sum in different orders, and a last-bit difference can round an activation to the
    # next int16 step in a later layer: close, not equal (a wrong layout would be off by the logits)
    want = logits["rows"]
    np.testing.assert_allclose(logits["interleaved"], want, rtol=0, atol=1e-3 * np.abs(want).max())
