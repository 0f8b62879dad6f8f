"""How fast a batched decode step's projections can be on this machine: kiln's projection kernel
on each of a model's projection shapes, on 1 and on 2 threads, with the weights in the caches and
streamed from memory, summed over one decode step.

    python bench/step_floor.py [--batch 8] [--threads 1,2] [--shapes 3072x576x4x30,...]
                               [--stream-mb 250] [--rounds 5]

Each shape is ``NxKxBITSxCALLS``: an ``N x K`` projection with ``BITS``-bit codes in groups of 32,
float32 scales and minima (``q4f32_2``), called ``CALLS`` times a step.  The default is
SmolLM2-135M's step: per layer (30) the fused QKV (960 x 576), O (576 x 576), fused gate/up
(3072 x 576) and down (576 x 1536) projections, 4-bit, and once the 8-bit LM head (49152 x 576).

For each shape and thread count the script builds the kernel the CPU backend uses
(:func:`kiln_backends.cpu_interleaved.interleaved_gemv`), and times it on random weights:

* ``warm``: one copy of the weights, called back to back (they stay in the caches that hold them);
* ``streamed``: ``--stream-mb`` of copies called in turn, so each call reads its weights from
  memory, as in a decode step, where ~100 MB of weights pass between two calls of one projection.

The totals are a step's projections.  The streamed one-thread total divided by the thread count
is what perfect scaling would give: with attention over the KV caches and the VM's work between
kernels added, it bounds how fast a batched step can be; a single request's step (``kiln bench``,
``--batch 1``) times the batch size over it bounds the aggregate decode speedup of a batch.  Each
thread count runs in a process of its own (TVM fixes its thread pool when it starts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

SMOLLM2 = "960x576x4x30,576x576x4x30,3072x576x4x30,576x1536x4x30,49152x576x8x1"
GROUP = 32


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            n, k, bits, calls = (int(v) for v in item.split("x"))
        except ValueError:
            raise SystemExit(f"shape {item!r}: expected NxKxBITSxCALLS, e.g. 3072x576x4x30") from None
        if bits not in (4, 8) or n % 16 or k % GROUP or calls < 1:
            raise SystemExit(f"shape {item!r}: BITS 4 or 8, N a multiple of 16, K a multiple of {GROUP}, CALLS >= 1")
        shapes.append((n, k, bits, calls))
    return shapes


def measure(shapes, batch: int, stream_mb: float, rounds: int) -> list[dict]:
    """In this process (its thread count fixed by ``TVM_NUM_THREADS``): each shape's median warm
    and streamed time of one call, in seconds."""
    import kiln  # noqa: F401 - kiln's defaults before TVM's runtime starts

    import tvm

    from kiln_backends.cpu import host_target
    from kiln_backends.cpu_interleaved import interleave, interleave_rows, interleaved_gemv
    from kiln_backends.cpu_kernels import byte_dots

    target = tvm.target.Target(host_target({}))
    rows = interleave_rows(target)
    if not rows:
        print("the interleaved kernel needs AVX2 or AVX-512", file=sys.stderr)
        raise SystemExit(2)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    out = []
    for n, k, bits, calls in shapes:
        per_word = 32 // bits
        func = interleaved_gemv(n, k, bits, GROUP, "float32", True, "float32", "float32", batch_first=True,
                                rows=rows, vnni=byte_dots(target))
        kernel = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)["main"]
        qw = rng.integers(0, 2**32, (n, k // per_word), dtype=np.uint64).astype("uint32")
        qs = (rng.random((n, k // GROUP)) * 0.01 + 0.001).astype("float32")
        qm = (-rng.random((n, k // GROUP)) * 0.05).astype("float32")
        nbytes = qw.nbytes + qs.nbytes + qm.nbytes
        copies = max(2, int(stream_mb * 1e6 // nbytes))
        weights = [[tvm.runtime.tensor(interleave(v, rows), dev) for v in (qw, qs, qm)] for _ in range(copies)]
        x = tvm.runtime.tensor(rng.standard_normal((batch, 1, k)).astype("float32"), dev)
        y = tvm.runtime.tensor(np.zeros((batch, 1, n), "float32"), dev)
        reps = max(3, int(2e8 // (n * k * batch)))
        warm, streamed = [], []
        for _ in range(rounds):
            for _ in range(3):
                kernel(x, *weights[0], y)
            t = time.perf_counter()
            for _ in range(reps):
                kernel(x, *weights[0], y)
            warm.append((time.perf_counter() - t) / reps)
            t = time.perf_counter()
            for i in range(2 * copies):
                kernel(x, *weights[i % copies], y)
            streamed.append((time.perf_counter() - t) / (2 * copies))
        out.append({"warm": statistics.median(warm), "streamed": statistics.median(streamed)})
        del weights
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="activation rows (sequences decoded at once)")
    ap.add_argument("--threads", default="1,2", help="thread counts, each measured in a process of its own")
    ap.add_argument("--shapes", default=SMOLLM2, help="NxKxBITSxCALLS projections of one step (default: SmolLM2)")
    ap.add_argument("--stream-mb", type=float, default=250.0, help="weight copies cycled for the streamed time")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per shape; the median is shown")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    if args.batch < 1 or args.rounds < 1 or args.stream_mb <= 0:
        raise SystemExit("--batch and --rounds must be at least 1, --stream-mb positive")
    if args.child:
        print(json.dumps(measure(shapes, args.batch, args.stream_mb, args.rounds)))
        return 0
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        raise SystemExit(f"--threads {args.threads!r}: expected counts such as 1,2") from None
    if not threads or min(threads) < 1:
        raise SystemExit("--threads: counts of at least 1")
    results = {}
    for t in threads:
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--batch", str(args.batch),
                              "--shapes", args.shapes, "--stream-mb", str(args.stream_mb), "--rounds", str(args.rounds)],
                             capture_output=True, text=True, env={**os.environ, "TVM_NUM_THREADS": str(t)})
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
            return res.returncode
        results[t] = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"batch {args.batch}; us per call (median of {args.rounds}); GMAC/s streamed")
    print(f"{'shape':>12s} {'bits':>4s} {'calls':>5s} {'threads':>7s} {'warm us':>9s} {'streamed us':>11s} {'GMAC/s':>7s}")
    for i, (n, k, bits, calls) in enumerate(shapes):
        for t in threads:
            r = results[t][i]
            print(f"{f'{n}x{k}':>12s} {bits:4d} {calls:5d} {t:7d} {r['warm'] * 1e6:9.1f} {r['streamed'] * 1e6:11.1f} "
                  f"{n * k * args.batch / r['streamed'] / 1e9:7.1f}")
    print()
    step = {t: {mode: sum(r[mode] * s[3] for r, s in zip(results[t], shapes)) for mode in ("warm", "streamed")}
            for t in threads}  # seconds of a step's projections
    for t in threads:
        print(f"step's projections, {t} thread{'s' if t > 1 else ''}: warm {step[t]['warm'] * 1e3:.3f} ms, "
              f"streamed {step[t]['streamed'] * 1e3:.3f} ms")
    if 1 in threads:
        one = step[1]["streamed"]
        for t in threads:
            if t > 1:
                print(f"perfect scaling to {t} threads: {one / t * 1e3:.3f} ms streamed ({t} threads reach "
                      f"{one / t / step[t]['streamed']:.0%} of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
