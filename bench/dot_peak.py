"""How many integer multiply-adds a second this CPU's dot-product instructions do: the ceiling of
kiln's projection kernels once a batch makes them compute-bound.

    python bench/dot_peak.py [--threads 2] [--float-ops 0,3]

kiln's CPU projections multiply 4-bit weight codes with int16 activations in ``vpdpwssd`` (2
multiply-adds per int32 lane), or with ``--opt activations=int8`` with int8 activations in
``vpdpbusd`` (4 per lane), both VNNI.  This script compiles (with TVM, for this CPU) a loop of
independent chains of each instruction, runs it on ``--threads`` threads, and prints the
multiply-adds per second.  ``--float-ops F`` adds F float multiply-adds per 16 dot-product
instructions, the mix of the interleaved kernel at 8 sequences (per group of 32 weights and
sequence: 16 dot products, then a multiply and two multiply-adds that apply the scales): where
the float unit shares its pipes with the dot products, the rate falls.  A decode step's
multiply-adds divided by the rate is the least time the step's projections can take.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

CHAINS = 16  # independent accumulators (more than the dot product's latency times its issue rate)
FLOAT_CHAINS = 6  # independent float accumulators for --float-ops


def peak_kernel(rows: int, intrinsic: str, per_lane: int, float_ops: int, threads: int):
    """A PrimFunc ``(words [rows], scales [2], out [threads, CHAINS, rows], n)``: ``n`` rounds of
    one dot product on each of ``CHAINS`` accumulators (and ``float_ops`` float multiply-adds per
    16 of them) on each of ``threads`` threads."""
    from tvm.script import tirx as T

    lanes = rows * per_lane
    operand = "int16" if per_lane == 2 else "int8"
    vec = T.Ramp(0, 1, rows)
    per_round = float_ops * CHAINS // 16

    @T.prim_func(s_tir=True)
    def peak(words: T.Buffer((rows,), "int32"), scales: T.Buffer((2,), "float32"),
             out: T.Buffer((threads, CHAINS, rows), "float32"), n: T.int32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for th in T.parallel(threads):
            with T.sblock("thread"):
                acc = T.sblock_alloc_buffer((CHAINS, rows), "int32")
                flt = T.sblock_alloc_buffer((FLOAT_CHAINS, rows), "float32")
                for c in T.unroll(CHAINS):
                    acc[c, vec] = T.Broadcast(T.Cast("int32", c + th), rows)
                for c in T.unroll(FLOAT_CHAINS):
                    flt[c, vec] = T.Broadcast(T.Cast("float32", c), rows)
                for _ in T.serial(n):
                    for c in T.unroll(CHAINS):
                        acc[c, vec] = T.call_llvm_pure_intrin(
                            f"int32x{rows}", intrinsic, acc[c, vec], T.reinterpret(f"{operand}x{lanes}", words[vec]),
                            T.reinterpret(f"{operand}x{lanes}", words[vec]))
                    for j in T.unroll(per_round):
                        flt[j % FLOAT_CHAINS, vec] = (flt[j % FLOAT_CHAINS, vec] * T.Broadcast(scales[0], rows)
                                                      + T.Broadcast(scales[1], rows))
                for c in T.unroll(CHAINS):
                    out[th, c, vec] = T.Cast(f"float32x{rows}", acc[c, vec]) + flt[c % FLOAT_CHAINS, vec]

    return peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="threads (TVM_NUM_THREADS), one chain set each")
    ap.add_argument("--float-ops", default="0,3", help="float multiply-adds per 16 dot products (a list)")
    ap.add_argument("--seconds", type=float, default=0.5, help="how long each measurement runs")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import kiln  # noqa: F401 - kiln's defaults before TVM's runtime starts

    import numpy as np
    import tvm

    from kiln_backends.cpu import host_target
    from kiln_backends.cpu_interleaved import DOTS, interleave_rows
    from kiln_backends.cpu_kernels import byte_dots

    target = tvm.target.Target(host_target({}))
    rows = interleave_rows(target)
    if not rows or not byte_dots(target):
        print("this CPU has no VNNI dot products (AVX-512 VNNI or AVX-VNNI)", file=sys.stderr)
        return 2
    dev = tvm.cpu()
    words = tvm.runtime.tensor(np.random.default_rng(0).integers(0, 2**15, rows, dtype=np.int32), dev)
    scales = tvm.runtime.tensor(np.array([0.999, 0.001], "float32"), dev)
    out = tvm.runtime.tensor(np.zeros((args.threads, CHAINS, rows), "float32"), dev)
    print(f"{target.attrs.get('mcpu', '')}, {args.threads} threads, {rows} int32 lanes")
    print(f"{'instruction':>12s} {'float ops/16':>12s} {'G instr/s/thread':>17s} {'G multiply-adds/s':>18s}")
    for per_lane, name in ((2, "int16"), (4, "int8")):
        for float_ops in map(int, args.float_ops.split(",")):
            kernel = peak_kernel(rows, DOTS[per_lane][rows], per_lane, float_ops, args.threads)
            f = tvm.compile(tvm.IRModule({"main": kernel}), target)["main"]
            n = 1000
            f(words, scales, out, n)
            while True:  # rounds for about --seconds
                t = time.perf_counter()
                f(words, scales, out, n)
                dt = time.perf_counter() - t
                if dt > args.seconds / 4 or n * 4 >= 2**31:  # n is an int32 argument
                    break
                n *= 4
            best = dt
            for _ in range(3):
                t = time.perf_counter()
                f(words, scales, out, n)
                best = min(best, time.perf_counter() - t)
            instr = n * CHAINS / best / 1e9
            macs = instr * args.threads * rows * per_lane
            print(f"{DOTS[per_lane][rows].split('.')[-2] + ' ' + name:>12s} {float_ops:12d} {instr:17.2f} {macs:18.1f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
