"""``kiln bench``: prefill and decode speed of a model, measured through :class:`kiln.Engine`.

What is measured is what a user of the engine gets: requests go through ``Engine.submit`` (the
entry point of ``completions.create`` and the server), are scheduled, prefilled in chunks,
decoded in batched steps, sampled and detokenized on the scheduler thread.  Each run submits
``batch`` requests at the same instant, each with its own prompt of ``prompt_tokens`` random
token ids (a fixed seed, so runs are repeatable and share no prefix), decoded greedily with
``ignore_eos`` so each generates exactly ``gen_tokens`` tokens.  One warm-up run comes first,
then ``runs`` measured runs.  Times are taken when the engine hands each token to its request
(on the scheduler thread, so no queue hop is counted); t0 is the moment the requests are
released to the scheduler.

The figures (each as the median with min–max over the runs):

* **prefill tok/s** = prompt tokens / time to first token; with ``batch`` > 1, the total
  prompt tokens of all requests / the time until the *last* request's first token.
* **time to first token** (ms): from t0 to the first token; with ``batch`` > 1, to the last
  request's first token (the same interval as prefill).
* **decode tok/s per request** = (gen_tokens - 1) / (time of its last token - time of its first
  token), averaged over the requests of a run.  Undefined for ``gen_tokens`` = 1.
* **aggregate decode tok/s** (``batch`` > 1): tokens per second over the interval in which all
  requests are decoding, from the moment the last request receives its first token to the
  moment the first request receives its last token.  Every decode step in that interval gives
  each of the ``batch`` requests one token, so the figure is ``batch`` × (decode steps in the
  interval) / (length of the interval), the steps counted as the tokens the first-finishing
  request received inside it.  Prefill of late requests and the tail after the first request
  finishes are outside the interval; it is undefined when the interval is empty.
* **peak memory**: the process's resident-set high-water mark (``VmHWM``), in MB.  On Linux it
  is reset once the model is loaded, so it covers the model in memory, its KV cache and the
  buffers used while generating, not the transients of converting, compiling or loading;
  elsewhere it is the peak of the whole process.

``profile=True`` adds a per-kernel time table of one decode step of ``batch`` sequences, each at
a context of ``prompt_tokens`` tokens (:mod:`kiln.runtime.profile`), run on the engine's
scheduler thread.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import KilnError, UsageError
from .profile import KernelTime, format_table, profile_decode

PROMPT_TOKEN_RANGE = (100, 30000)  # ids drawn for random prompts (clipped to the vocabulary)
PROFILE_STEPS = 5


# ------------------------------------------------------------------------------- results
@dataclass
class Figure:
    """A measured quantity over runs: median, minimum, maximum."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values) -> "Figure | None":
        values = [v for v in values if v is not None]
        if not values:
            return None
        return cls(float(statistics.median(values)), float(min(values)), float(max(values)))

    def format(self, fmt: str = "{:.1f}") -> str:
        return f"{fmt.format(self.median)}  ({fmt.format(self.min)}–{fmt.format(self.max)})"


@dataclass
class RunTiming:
    """One run: ``batch`` requests submitted together."""

    prefill_tok_s: float
    ttft_s: float
    decode_tok_s: float | None  # per request, mean over the requests
    aggregate_decode_tok_s: float | None  # batch > 1 only
    generated_tokens: list[int]  # per request
    wall_s: float


@dataclass
class BenchResult:
    model: str
    quantization: str
    target: str
    device: str
    threads: int
    prompt_tokens: int
    gen_tokens: int
    batch: int
    runs: int
    prefill_tok_s: Figure
    ttft_ms: Figure
    decode_tok_s: Figure | None
    aggregate_decode_tok_s: Figure | None
    generated_tokens: int  # tokens each request generated (the same for all: gen_tokens)
    peak_rss_mb: float | None
    peak_rss_scope: str  # "runs" (reset after loading) or "process"
    per_run: list[RunTiming] = field(default_factory=list)
    profile: list[KernelTime] | None = None
    profile_step_ms: float | None = None  # one uninstrumented decode step

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.profile is not None:
            out["profile"] = [{"kernel": r.name, "calls": r.calls, "us_per_step": r.seconds * 1e6} for r in self.profile]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self) -> str:
        lines = [
            f"model: {self.model} ({self.quantization}, {self.target}, device {self.device}, {self.threads} threads)",
            f"{self.batch} request{'s' if self.batch > 1 else ''} at once, {self.prompt_tokens}-token random prompt"
            f"{'s' if self.batch > 1 else ''}, {self.gen_tokens} generated tokens each (greedy, ignore_eos); "
            f"median (min–max) of {self.runs} run{'s' if self.runs > 1 else ''} after 1 warm-up",
            f"  prefill                {self.prefill_tok_s.format()} tok/s",
            f"  time to first token    {self.ttft_ms.format()} ms",
        ]
        if self.decode_tok_s is not None:
            lines.append(f"  decode                 {self.decode_tok_s.format()} tok/s per request")
        else:
            lines.append("  decode                 n/a (needs --gen-tokens of 2 or more)")
        if self.batch > 1:
            if self.aggregate_decode_tok_s is not None:
                lines.append(f"  aggregate decode       {self.aggregate_decode_tok_s.format()} tok/s "
                             f"(all {self.batch} requests decoding)")
            else:
                lines.append("  aggregate decode       n/a (no interval in which all requests were decoding)")
        lines.append(f"  generated tokens       {self.generated_tokens} per request")
        if self.peak_rss_mb is not None:
            scope = "after loading" if self.peak_rss_scope == "runs" else "whole process"
            lines.append(f"  peak memory            {self.peak_rss_mb:.1f} MB (RSS high-water mark, {scope})")
        if self.profile is not None:
            lines.append("")
            lines.append(f"kernel profile of one decode step ({self.batch} sequence{'s' if self.batch > 1 else ''}, "
                         f"context {self.prompt_tokens} tokens each, "
                         f"mean of {PROFILE_STEPS} steps):")
            lines.append(format_table(self.profile, self.profile_step_ms / 1e3))
        return "\n".join(lines)


# ------------------------------------------------------------------------------- helpers
def make_prompts(vocab_size: int, n_tokens: int, count: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``n_tokens`` random token ids (reproducible for a seed)."""
    lo, hi = PROMPT_TOKEN_RANGE
    hi = min(hi, vocab_size)
    lo = min(lo, hi // 2)
    rng = np.random.default_rng(seed)
    return [rng.integers(lo, hi, n_tokens).tolist() for _ in range(count)]


def tvm_threads() -> int:
    try:
        return int(os.environ.get("TVM_NUM_THREADS", "0")) or 1
    except ValueError:
        return 1


def _read_hwm_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux); ``False`` where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    kb = _read_hwm_kb()
    if kb is None:
        try:
            import resource

            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if sys.platform == "darwin":  # bytes there
                kb //= 1024
        except (ImportError, OSError):
            return None
    return kb / 1024


def on_scheduler(engine, fn, timeout: float | None = None):
    """Run ``fn()`` on the engine's scheduler thread, between steps, and return its result.

    The scheduler thread owns the VM and the KV cache; this is the mechanism ``Engine.score``
    uses (an ``("call", fn)`` item in the engine's inbox)."""
    result: dict = {}
    done = threading.Event()

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result["error"] = exc
        finally:
            done.set()

    engine._inbox.put(("call", run))
    while not done.wait(0.5):
        if engine.error is not None:
            raise KilnError(f"the engine stopped after an internal error: {engine.error}")
        if timeout is not None:
            timeout -= 0.5
            if timeout <= 0:
                raise KilnError("the engine's scheduler did not run the benchmark's call in time")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def weight_bytes_per_token(engine) -> int:
    """Bytes of weights one single-sequence decode step reads: every parameter, except that an
    embedding table which is not also the output projection contributes one row (a lookup)."""
    params = engine.model.metadata["params"]
    tied = not any("lm_head" in p["name"] for p in params)
    total = 0
    for p in params:
        nbytes = int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize
        if "embed" in p["name"] and not tied and p["shape"]:
            nbytes //= max(1, p["shape"][0])
        total += nbytes
    return total


# ------------------------------------------------------------------------------- checks
def check_args(prompt_tokens: int, gen_tokens: int, batch: int, runs: int) -> None:
    """Refuse numbers that cannot be measured (before any model is loaded)."""
    for flag, value in (("--prompt-tokens", prompt_tokens), ("--gen-tokens", gen_tokens), ("--batch", batch),
                        ("--runs", runs)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")


def check_fits(engine, prompt_tokens: int, gen_tokens: int, batch: int) -> None:
    """Refuse a benchmark the engine cannot run as asked (context window, batch, KV cache)."""
    if batch > engine.max_batch_size:
        raise UsageError(
            f"--batch {batch} is more than the engine allows ({engine.max_batch_size}: the model library's "
            f"max_batch_size); add --overrides max_batch_size={batch}")
    cw = engine.context_window_size
    if prompt_tokens + gen_tokens > cw:
        raise UsageError(
            f"--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} = {prompt_tokens + gen_tokens} tokens "
            f"exceed the context window of {cw} tokens")
    page = engine.model.kv_config.page_size
    need = batch * -(-(prompt_tokens + gen_tokens) // page)
    if need > engine.total_pages:
        raise UsageError(
            f"{batch} requests of {prompt_tokens + gen_tokens} tokens need {need} KV-cache pages but the cache holds "
            f"{engine.total_pages}; use a smaller --batch or shorter prompts")


def open_engine(model, model_lib=None, device: str = "auto", batch: int = 1, quantization: str | None = None,
                overrides=None, opt: str | None = None):
    """An engine for benchmarking: room for ``batch`` sequences, no prefix cache (every run
    computes its whole prompt).  :func:`check_fits` says whether a benchmark fits it."""
    from .engine import Engine

    return Engine(model, model_lib, device, max_batch_size=batch, prefix_cache=False, quantization=quantization,
                  overrides=overrides, opt=opt)


# ------------------------------------------------------------------------------- measurement
def measure(engine, prompts: list[list[int]], gen_tokens: int) -> RunTiming:
    """One run: submit every prompt at the same instant, greedy, ``gen_tokens`` tokens each."""
    # greedy and nothing else: a model's configured penalties must not add work to what is timed
    params = engine._params({"temperature": 0.0, "max_tokens": gen_tokens, "ignore_eos": True, "repetition_penalty": 1.0,
                             "presence_penalty": 0.0, "frequency_penalty": 0.0})
    b = len(prompts)
    stamps: list[list[float]] = [[] for _ in range(b)]
    finished = [threading.Event() for _ in range(b)]
    errors: list[BaseException] = []

    def sink_for(i):
        times = stamps[i]

        def sink(ev):
            kind = ev[0]
            if kind == "token":
                if ev[3] is not None:
                    times.append(time.perf_counter())
            elif kind == "done" or kind == "cancelled":
                finished[i].set()
            elif kind == "error":
                errors.append(ev[1])
                finished[i].set()

        return sink

    if not engine.wait_idle(120):
        raise KilnError("the engine is busy: the benchmark needs it idle")
    # hold the scheduler until every request is queued, so that all start together
    gate = threading.Event()
    engine._inbox.put(("call", lambda: gate.wait(60)))
    requests = []
    try:
        for i, p in enumerate(prompts):
            requests.append(engine.submit(p, params, 1, sink_for(i)))
    except BaseException:
        for req in requests:
            engine.cancel(req)
        raise
    finally:
        t0 = time.perf_counter()
        gate.set()
    for ev in finished:
        while not ev.wait(0.5):
            if engine.error is not None:
                raise KilnError(f"the engine stopped after an internal error: {engine.error}")
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    counts = [len(s) for s in stamps]
    if min(counts) != gen_tokens:
        raise KilnError(f"a request generated {min(counts)} tokens instead of {gen_tokens}")
    firsts = [s[0] for s in stamps]
    lasts = [s[-1] for s in stamps]
    start = max(firsts)
    ttft = start - t0
    prefill = sum(len(p) for p in prompts) / ttft
    decode = None
    if gen_tokens > 1:
        decode = statistics.fmean((gen_tokens - 1) / (s[-1] - s[0]) for s in stamps)
    aggregate = None
    if b > 1:
        first_done = int(np.argmin(lasts))
        end = lasts[first_done]
        steps = sum(1 for t in stamps[first_done] if start < t <= end)
        if steps and end > start:
            aggregate = b * steps / (end - start)
    return RunTiming(prefill, ttft, decode, aggregate, counts, wall)


def profile_step(engine, context_tokens: int, batch: int = 1,
                 steps: int = PROFILE_STEPS) -> tuple[list[KernelTime], float]:
    """Per-kernel times of one decode step of ``batch`` sequences, each at a context of
    ``context_tokens``, on the scheduler thread; the sequences it uses are removed again."""
    model = engine.model
    prompts = make_prompts(model.vocab_size, context_tokens, batch, seed=12345)

    def run():
        seqs = []
        need = batch * (engine._pages(context_tokens + 2 * steps + 3) + 1)
        if not engine._ensure_pages(need):
            raise KilnError("the KV cache is too full to profile a decode step now")
        try:
            for prompt in prompts:
                seq = next(engine._seq_ids)
                model.add_sequence(seq)
                seqs.append(seq)
                for i in range(0, len(prompt), engine.prefill_chunk_size):
                    model.prefill([seq], [prompt[i:i + engine.prefill_chunk_size]])
            return profile_decode(model, steps, seq_ids=seqs)
        finally:
            for seq in seqs:
                model.remove_sequence(seq)

    engine.wait_idle(120)
    return on_scheduler(engine, run)


def run_bench(engine, prompt_tokens: int = 100, gen_tokens: int = 128, batch: int = 1, runs: int = 3,
              profile: bool = False, seed: int = 0, warmup: bool = True) -> BenchResult:
    """Benchmark an open engine (see the module docstring for what each figure means)."""
    check_args(prompt_tokens, gen_tokens, batch, runs)
    check_fits(engine, prompt_tokens, gen_tokens, batch)
    vocab = engine.model.vocab_size
    scope = "runs" if reset_peak_rss() else "process"
    if warmup:
        measure(engine, make_prompts(vocab, prompt_tokens, batch, seed + 1_000_003), gen_tokens)
    timings = [measure(engine, make_prompts(vocab, prompt_tokens, batch, seed + r), gen_tokens) for r in range(runs)]
    peak = peak_rss_mb()
    meta = engine.model.metadata
    try:
        target = json.loads(meta["target"]) if isinstance(meta["target"], str) else dict(meta["target"])
        target_name = " ".join(str(target[k]) for k in ("kind", "mcpu") if target.get(k))
    except (ValueError, TypeError, KeyError):
        target_name = str(meta.get("target"))
    result = BenchResult(
        model=engine.model_name, quantization=meta.get("quantization", "?"), target=target_name,
        device=str(engine.model.device), threads=tvm_threads(), prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
        batch=batch, runs=runs,
        prefill_tok_s=Figure.of(t.prefill_tok_s for t in timings),
        ttft_ms=Figure.of(t.ttft_s * 1e3 for t in timings),
        decode_tok_s=Figure.of(t.decode_tok_s for t in timings),
        aggregate_decode_tok_s=Figure.of(t.aggregate_decode_tok_s for t in timings) if batch > 1 else None,
        generated_tokens=min(min(t.generated_tokens) for t in timings),
        peak_rss_mb=peak, peak_rss_scope=scope, per_run=timings,
    )
    if profile:
        rows, plain = profile_step(engine, prompt_tokens, batch)
        result.profile, result.profile_step_ms = rows, plain * 1e3
    return result


def bench(model, model_lib=None, device: str = "auto", *, prompt_tokens: int = 100, gen_tokens: int = 128,
          batch: int = 1, runs: int = 3, profile: bool = False, quantization: str | None = None,
          seed: int = 0, overrides=None, opt: str | None = None) -> BenchResult:
    """Open ``model`` (anything :class:`kiln.Engine` accepts), benchmark it, close it."""
    check_args(prompt_tokens, gen_tokens, batch, runs)
    engine = open_engine(model, model_lib, device, batch, quantization, overrides, opt)
    try:
        return run_bench(engine, prompt_tokens, gen_tokens, batch, runs, profile=profile, seed=seed)
    finally:
        engine.close()


__all__ = ["Figure", "RunTiming", "BenchResult", "bench", "run_bench", "measure", "open_engine", "make_prompts",
           "check_args", "check_fits", "profile_step", "weight_bytes_per_token", "on_scheduler"]
