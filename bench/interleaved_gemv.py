"""kiln's two CPU projection kernels on the same weights: interleaved against row-major.

    python bench/interleaved_gemv.py [--shapes 3072x576,960x576,576x1536] [--batch 1,8] [--threads 1] [--int8]
                                     [--mcpu znver3]

On a CPU with AVX2 or AVX-512 the CPU backend stores projection weights interleaved 8 or 16 rows
to a vector when a model is loaded and multiplies them with ``kiln_backends.cpu_interleaved``'s
kernel; elsewhere (or with ``--opt interleave=0``) with the row-major kernel of
``kiln_backends.cpu_kernels``.  ``--mcpu`` compiles both for another CPU than this one (``znver3``:
AVX2 without VNNI, which any AVX-512 machine also runs).  This script times both kernels (alternating, best of 7) on the
same random 4-bit ``q4f32_2``-style weights and float activations, and prints the largest
difference between their results relative to the largest output (both round the activations to
int16 per group of 32, or with ``--int8`` to int8; they add in different orders).  The weights
stay in the caches unless the shape is larger than them: a decode step streams them from memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


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
    ap.add_argument("--int8", action="store_true", help="activations rounded to int8 (--opt activations=int8)")
    ap.add_argument("--mcpu", default="", help="LLVM CPU to compile for (default: this machine's)")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import kiln  # noqa: F401 - kiln's defaults before TVM's runtime starts

    import tvm

    from kiln_backends.cpu import host_target
    from kiln_backends.cpu_interleaved import interleave, interleave_rows, interleaved_gemv
    from kiln_backends.cpu_kernels import byte_dots, quantized_gemv
    from kiln_backends.cpu_schedules import vector_bits

    target = tvm.target.Target(host_target({"mcpu": args.mcpu}))
    rows, lanes, vnni = interleave_rows(target), max(vector_bits(target) // 32, 4), byte_dots(target)
    if not rows:
        print("the interleaved kernel needs AVX2 or AVX-512", file=sys.stderr)
        return 2
    print(f"{target.attrs.get('mcpu', '')}: {rows} rows a vector, {'with' if vnni else 'without'} VNNI")
    dev = tvm.cpu()
    rng = np.random.default_rng(0)

    def build(func):
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)["main"]

    print(f"{'shape':>12s} {'rows':>4s} {'row-major us':>13s} {'interleaved us':>15s} {'speedup':>8s} {'max diff':>9s}")
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint64).astype("uint32")
        qs = (rng.random((n, k // 32)) * 0.01 + 0.001).astype("float16")
        qm = (-rng.random((n, k // 32)) * 0.05).astype("float16")
        # both kernels take any number of rows (a symbolic dimension): built once per shape
        f_rows = build(quantized_gemv(n, k, 4, 32, "float16", True, "float32", "float32", lanes, batch_first=True,
                                      int8=args.int8, vnni=vnni))
        f_new = build(interleaved_gemv(n, k, 4, 32, "float16", True, "float32", "float32", batch_first=True,
                                       int8=args.int8, rows=rows, vnni=vnni))
        weights_rows = [tvm.runtime.tensor(v, dev) for v in (qw, qs, qm)]
        weights_new = [tvm.runtime.tensor(interleave(v, rows), dev) for v in (qw, qs, qm)]
        for b in map(int, args.batch.split(",")):
            x = tvm.runtime.tensor(rng.standard_normal((b, 1, k)).astype("float32"), dev)
            y_rows, y_new = (tvm.runtime.tensor(np.zeros((b, 1, n), "float32"), dev) for _ in range(2))
            reps = min(2000, max(3, int(3e8 // (n * k * b))))
            t_rows = t_new = float("inf")
            for _ in range(2):  # alternating
                t_rows = min(t_rows, best_time(f_rows, [x, *weights_rows, y_rows], reps))
                t_new = min(t_new, best_time(f_new, [x, *weights_new, y_new], reps))
            ref = y_rows.numpy()
            diff = float(np.abs(y_new.numpy() - ref).max() / np.abs(ref).max())
            print(f"{shape:>12s} {b:4d} {t_rows * 1e6:13.1f} {t_new * 1e6:15.1f} {t_rows / t_new:7.2f}x {diff:9.1e}",
                  flush=True)
            if diff > 1e-4:
                print("the two kernels disagree", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
