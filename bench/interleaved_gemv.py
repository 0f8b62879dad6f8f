"""Probe for the next CPU projection kernel: weight rows interleaved 16 to a vector.

    python bench/interleaved_gemv.py [--shapes 3072x576,960x576,576x1536] [--batch 1,8] [--threads 1]

kiln's projection kernel (``kiln_backends.cpu_kernels.quantized_gemv``) reads each weight row's
words in order and transposes runs of 16 groups in registers, so that a lane sums a group; the
two groups after a 576-column row's run, the transposes and the sums across lanes cost it about
half of the multiplier's time at 8 sequences.  This probe times, on the same random 4-bit
``q4f32_2``-style weights and float activations, a kernel that reads the weights stored
interleaved instead: word ``w`` of rows ``16 i .. 16 i + 15`` side by side in one vector
(``[N / 16, W, 16]``, scales and minima ``[N / 16, G, 16]``), so that lane ``r`` is row ``r``.
Each 32-bit word of 8 codes gives four vectors of code pairs ``(c_s, c_{s+4})`` (a shift and a
mask), each meets the matching pair of int16 activations broadcast from memory in one
``vpdpwssd``, and the float part is one multiply, one FMA and one minimum term per group and
sequence for 16 rows: no transposes, no tail blocks, no sums across lanes.

It prints both kernels' times (alternating, best of 7) and the largest difference between their
results relative to the largest output (the order of float additions differs; activations are
rounded to int16 per group of 32 by both).  Not a kiln kernel: it takes no epilogue, no int8,
no other widths, no chunking of long rows, and its activation rounding is a scalar loop.
Needs AVX-512 VNNI (``vpdpwssd``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def interleaved_gemv(n: int, k: int, batch: int):
    """The probe kernel ``(x [B, K] f32, qw [N/16, W, 16] u32, qs, qm [N/16, G, 16] f16, y [B, N] f32)``."""
    from tvm.script import tirx as T

    W, G, RB = k // 8, k // 32, n // 16
    vnni = "llvm.x86.avx512.vpdpwssd.512"

    @T.prim_func(s_tir=True)
    def gemv(x: T.Buffer((batch, k), "float32"), qw: T.Buffer((RB, W, 16), "uint32"),
             qs: T.Buffer((RB, G, 16), "float16"), qm: T.Buffer((RB, G, 16), "float16"),
             y: T.Buffer((batch, n), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "main", "tirx.noalias": True})
        with T.sblock("root"):
            xq = T.sblock_alloc_buffer((batch, W * 4), "int32")  # pairs (a_s, a_{s+4}) of each word
            xd = T.sblock_alloc_buffer((batch, G), "float32")  # the group's step
            xs = T.sblock_alloc_buffer((batch, G), "float32")  # the rounded group's sum, times the step
            st = T.sblock_alloc_buffer((3,), "float32")
            for b, g in T.grid(batch, G):
                st[0] = T.float32(0)
                for i in T.serial(32):
                    st[0] = T.max(st[0], T.fabs(x[b, g * 32 + i]))
                st[1] = T.Select(st[0] > T.float32(0), T.float32(32767) / st[0], T.float32(0))
                st[2] = T.float32(0)
                for w, s in T.grid(4, 4):
                    lo: T.let[T.int32] = T.Cast("int32", T.round(x[b, g * 32 + w * 8 + s] * st[1]))
                    hi: T.let[T.int32] = T.Cast("int32", T.round(x[b, g * 32 + w * 8 + s + 4] * st[1]))
                    xq[b, (g * 4 + w) * 4 + s] = T.bitwise_or(T.bitwise_and(lo, 0xFFFF), T.shift_left(hi, 16))
                    st[2] = st[2] + T.Cast("float32", lo + hi)
                xd[b, g] = st[0] * T.float32(1.0 / 32767)
                xs[b, g] = st[2] * xd[b, g]
            for rb in T.parallel(RB):
                with T.sblock("rows"):
                    acc = T.sblock_alloc_buffer((batch, 16), "float32")
                    isum = T.sblock_alloc_buffer((batch, 16), "int32")
                    for b in T.unroll(batch):
                        acc[b, T.Ramp(0, 1, 16)] = T.Broadcast(T.float32(0), 16)
                    for g in T.serial(G):
                        for b in T.unroll(batch):
                            isum[b, T.Ramp(0, 1, 16)] = T.Broadcast(T.int32(0), 16)
                        for w in T.unroll(4):
                            for s in T.unroll(4):
                                for b in T.unroll(batch):
                                    isum[b, T.Ramp(0, 1, 16)] = T.call_llvm_pure_intrin(
                                        "int32x16", vnni, isum[b, T.Ramp(0, 1, 16)],
                                        T.reinterpret("int16x32", T.bitwise_and(
                                            T.shift_right(qw[rb, g * 4 + w, T.Ramp(0, 1, 16)], T.Broadcast(T.uint32(4 * s), 16)),
                                            T.Broadcast(T.uint32(0x000F000F), 16))),
                                        T.reinterpret("int16x32", T.Broadcast(xq[b, (g * 4 + w) * 4 + s], 16)))
                        for b in T.unroll(batch):
                            acc[b, T.Ramp(0, 1, 16)] = (
                                acc[b, T.Ramp(0, 1, 16)]
                                + T.Cast("float32x16", isum[b, T.Ramp(0, 1, 16)])
                                * (T.Cast("float32x16", qs[rb, g, T.Ramp(0, 1, 16)]) * T.Broadcast(xd[b, g], 16))
                                + T.Cast("float32x16", qm[rb, g, T.Ramp(0, 1, 16)]) * T.Broadcast(xs[b, g], 16))
                    for b in T.unroll(batch):
                        y[b, T.Ramp(rb * 16, 1, 16)] = acc[b, T.Ramp(0, 1, 16)]

    return gemv


def interleave(a: np.ndarray) -> np.ndarray:
    """``[N, C]`` row-major -> ``[N / 16, C, 16]``: element ``(r, c)`` at ``[r // 16, c, r % 16]``."""
    n, c = a.shape
    return np.ascontiguousarray(a.reshape(n // 16, 16, c).transpose(0, 2, 1))


def best_time(fn, args, reps: int) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(reps):
            fn(*args)
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="3072x576,960x576,576x1536", help="NxK projections (N a multiple of 16)")
    ap.add_argument("--batch", default="1,8", help="activation rows")
    ap.add_argument("--threads", type=int, default=1, help="TVM threads (TVM_NUM_THREADS)")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import kiln  # noqa: F401 - kiln's defaults before TVM's runtime starts

    import tvm
    from tvm.target.codegen import llvm_cpu_has_features

    from kiln_backends.cpu import host_target
    from kiln_backends.cpu_kernels import quantized_gemv

    target = tvm.target.Target(host_target({}))
    if not llvm_cpu_has_features(["avx512vnni"], target):
        print("this probe needs AVX-512 VNNI (vpdpwssd on 512-bit registers)", file=sys.stderr)
        return 2
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    print(f"{'shape':>12s} {'rows':>4s} {'kiln us':>9s} {'interleaved us':>15s} {'speedup':>8s} {'max diff':>9s}")
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint64).astype("uint32")
        qs = (rng.random((n, k // 32)) * 0.01 + 0.001).astype("float16")
        qm = (-rng.random((n, k // 32)) * 0.05).astype("float16")
        cur = quantized_gemv(n, k, 4, 32, "float16", True, "float32", "float32", 16, batch_first=True,
                             vnni=True).with_attr("global_symbol", "main")
        f_cur = tvm.compile(tvm.IRModule({"main": cur}), target)["main"]  # any batch: its rows are symbolic
        for b in map(int, args.batch.split(",")):
            x = rng.standard_normal((b, k)).astype("float32")
            f_new = tvm.compile(tvm.IRModule({"main": interleaved_gemv(n, k, b)}), target)["main"]
            a_cur = [tvm.runtime.tensor(v, dev) for v in (x.reshape(b, 1, k), qw, qs, qm)]
            y_cur = tvm.runtime.tensor(np.zeros((b, 1, n), "float32"), dev)
            a_new = [tvm.runtime.tensor(v, dev) for v in (x, interleave(qw), interleave(qs), interleave(qm))]
            y_new = tvm.runtime.tensor(np.zeros((b, n), "float32"), dev)
            reps = min(2000, max(3, int(3e8 // (n * k * b))))
            t_cur = t_new = float("inf")
            for _ in range(2):  # alternating
                t_cur = min(t_cur, best_time(f_cur, a_cur + [y_cur], reps))
                t_new = min(t_new, best_time(f_new, a_new + [y_new], reps))
            ref = y_cur.numpy().reshape(b, n)
            diff = float(np.abs(y_new.numpy() - ref).max() / np.abs(ref).max())
            print(f"{shape:>12s} {b:4d} {t_cur * 1e6:9.1f} {t_new * 1e6:15.1f} {t_cur / t_new:7.2f}x {diff:9.1e}", flush=True)
            if diff > 1e-4:
                print("the two kernels disagree", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
