"""Scheduled vs unscheduled CPU kernels: kiln's projection kernels on one weight matrix.

Builds the exact kernels kiln emits for a linear layer (float32 ``matmul`` and 4-bit
``q_matmul`` with fused dequantization, MLC's symmetric layout), once unscheduled and once the
way the CPU backend compiles them (its hand-written kernel where one applies, else its schedule
rules), checks both against numpy, and prints time, effective weight bandwidth and the
speed-up.  Usage:  python bench/gemv.py [--n 4096] [--k 4096] [--m 1] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="output rows (weight rows)")
    ap.add_argument("--k", type=int, default=4096, help="reduction length (weight columns)")
    ap.add_argument("--m", type=int, default=1, help="activation rows (1 = decode GEMV)")
    ap.add_argument("--threads", type=int, default=0, help="TVM threads (default: all cores)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import kiln  # noqa: F401 - sets TVM_NUM_THREADS to the core count unless given

    import numpy as np
    import tvm
    from tvm import te

    from kiln.modeling import dense
    from kiln.quantization import GroupQuant, dequantize_groups
    from kiln.quantization.layers import q_dense
    from kiln_backends.cpu import host_target
    from kiln_backends.cpu_kernels import replace_kernels
    from kiln_backends.cpu_schedules import schedule_pass

    target = tvm.target.Target(host_target({}))
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    n, k, m = args.n, args.k, args.m
    x = rng.standard_normal((m, 1, k)).astype("float32")
    w = (rng.standard_normal((n, k)) * 0.05).astype("float32")
    scheme = GroupQuant(model_dtype="float32", scale_dtype="float32")
    q = scheme.quantize_weight(w, "w.weight")
    qw, qs = q["w.q_weight"], q["w.q_scale"]

    batch = tvm.tirx.Var("batch", "int64")  # symbolic, as in a compiled decode step
    X = te.placeholder((batch, 1, k), "float32", name="x")
    cases = {
        "f32 matmul": (
            lambda: te.create_prim_func([X, W := te.placeholder((n, k), "float32", name="w"), dense(X, W)]),
            [x, w], x @ w.T, w.nbytes,
        ),
        "q4 matmul (fused dequant)": (
            lambda: te.create_prim_func([
                X, QW := te.placeholder(qw.shape, "uint32", name="qw"), QS := te.placeholder(qs.shape, "float32", name="qs"),
                q_dense(X, QW, QS, bits=4, group_size=32),
            ]),
            [x, qw, qs], x @ dequantize_groups(qw, qs).T, qw.nbytes + qs.nbytes,
        ),
    }
    print(f"target {target}  threads {os.environ.get('TVM_NUM_THREADS')}  M={m} N={n} K={k}")
    print(f"{'kernel':28s} {'unscheduled':>14s} {'scheduled':>14s} {'speed-up':>9s} {'GB/s (sched)':>13s}")
    for name, (make, inputs, ref, nbytes) in cases.items():
        times = []
        for scheduled in (False, True):
            func = "q_matmul" if name.startswith("q4") else "matmul"  # the names kiln's layers give them
            mod = tvm.IRModule({func: make().with_attr("global_symbol", "main")})
            if scheduled:
                with target:
                    mod = schedule_pass(target)(replace_kernels(target)(mod))
                assert "tirx.is_scheduled" in mod[func].attrs, "neither a kernel nor a schedule rule applied"
            lib = tvm.compile(mod, target)
            a = [tvm.runtime.tensor(v, dev) for v in inputs]
            out = tvm.runtime.empty(ref.shape, "float32", dev)
            lib["main"](*a, out)
            err = np.abs(out.numpy() - ref).max() / np.abs(ref).max()
            assert err < 1e-4, f"{name}: wrong result (relative error {err:.1e})"
            number = 2 if not scheduled else 20
            t = min(lib.jit().time_evaluator("main", dev, number=number, repeat=args.repeat)(*a, out).results)
            times.append(t)
        print(f"{name:28s} {times[0] * 1e3:11.3f} ms {times[1] * 1e3:11.3f} ms {times[0] / times[1]:8.1f}x {nbytes / times[1] / 1e9:12.1f}")


if __name__ == "__main__":
    sys.exit(main())
