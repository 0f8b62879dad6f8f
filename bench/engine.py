"""Engine throughput: single-request prefill/decode speed and aggregate decode throughput of
1, 4 and 8 concurrent requests (continuous batching) on one model.

Usage:  python bench/engine.py MODEL [--model-lib LIB] [--device auto] [--prompt-tokens 100] [--gen-tokens 128]
MODEL is anything ``kiln.Engine`` accepts (a kiln model directory, ...).  Greedy decoding with
``ignore_eos`` so every request generates exactly --gen-tokens tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="Packaged model name, .gguf file, checkpoint or kiln model directory.")
    ap.add_argument("--model-lib", default=None, help="Compiled model library (default: compiled and cached).")
    ap.add_argument("--device", default="auto", help="Device to run on: auto (the best one present), cpu, cuda, ...")
    ap.add_argument("--prompt-tokens", type=int, default=100, help="Prompt length (random token ids).")
    ap.add_argument("--gen-tokens", type=int, default=128, help="Tokens each request generates.")
    ap.add_argument("--runs", type=int, default=3, help="Runs per figure (the median is shown).")
    ap.add_argument("--concurrency", default="1,4,8", help="Concurrent request counts, comma-separated.")
    args = ap.parse_args(argv)

    import numpy as np

    from kiln import Engine

    levels = [int(c) for c in args.concurrency.split(",")]
    engine = Engine(args.model, args.model_lib, args.device, max_batch_size=max(levels), prefix_cache=False)
    vocab = engine.model.vocab_size
    rng = np.random.default_rng(0)

    def prompt():
        return rng.integers(100, min(vocab, 30000), args.prompt_tokens).tolist()

    def one(tokens):
        t0 = time.perf_counter()
        first = None
        n = 0
        for chunk in engine.completions.create(prompt=tokens, max_tokens=args.gen_tokens, temperature=0,
                                               ignore_eos=True, stream=True, stream_options={"include_usage": True}):
            if first is None and chunk.choices:
                first = time.perf_counter()
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
        end = time.perf_counter()
        return first - t0, (n - 1) / (end - first), n

    one(prompt())  # warm-up
    ttft, decode = [], []
    for _ in range(args.runs):
        t, d, n = one(prompt())
        ttft.append(t)
        decode.append(d)
    prefill = [args.prompt_tokens / t for t in ttft]
    print(f"model: {engine.model_name}  ({engine.model.metadata['quantization']}, device {engine.model.device}, "
          f"{engine.model.metadata['target']})")
    print(f"single request, {args.prompt_tokens}-token prompt, {args.gen_tokens} generated (median of {args.runs}):")
    print(f"  prefill {statistics.median(prefill):8.1f} tok/s   time to first token {statistics.median(ttft) * 1e3:.1f} ms")
    print(f"  decode  {statistics.median(decode):8.1f} tok/s")
    single = statistics.median(decode)
    for c in levels:
        results = []

        def worker():
            results.append(one(prompt()))

        threads = [threading.Thread(target=worker) for _ in range(c)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        total = sum(r[2] for r in results)
        print(f"  {c} concurrent: aggregate {total / wall:8.1f} generated tok/s over {wall:.2f} s "
              f"(x{total / wall / single:.2f} of single-request decode)")
    engine.close()


if __name__ == "__main__":
    sys.exit(main())
