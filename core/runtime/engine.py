"""The engine: one scheduler thread, continuous batching, an OpenAI-shaped API on top.

A request is tokenized in the caller's thread and queued.  The scheduler thread owns the VM
and the paged KV cache; every step it

1. admits waiting requests while there are free batch slots and KV pages (reusing the KV of
   a cached prefix, e.g. an earlier turn of the same chat, by forking it);
2. runs one chunked prefill (up to ``prefill_chunk_size`` tokens, over one or more sequences);
3. runs one batched decode step for every sequence that is generating;

and streams each new token back to its request.  Finished and cancelled sequences free their
KV pages at once (a finished one may stay as a cached prefix until the pages are needed).
Sampling never looks at other sequences, so a request's output does not depend on what it is
batched with.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import KilnError, RequestError
from . import protocol as P
from .sampler import Sampler, SamplingParams, log_softmax

log = logging.getLogger("kiln")

_PREFIX_CACHE_ENTRIES = 4
DEFAULT_BATCH = 8  # sequences decoded together unless asked otherwise
DEFAULT_KV_BUDGET = 2 << 30  # bytes of KV cache unless asked otherwise
_WAIT_IDLE = 0.05
# what lowers the memory estimate, in the words of each front end (the load log's hint names
# only options that the user's front end has)
REDUCE_MEMORY_HINTS = {
    "engine": "Engine's max_total_tokens, max_batch_size or context_window_size",
    "chat_module": "ChatModule's max_total_tokens or context_window_size",
    "chat": "--max-total-tokens or --context-window-size",
    "serve": "--max-total-tokens, --max-batch-size or --context-window-size",
}


# ------------------------------------------------------------------------------- internal state
@dataclass
class _Choice:
    index: int
    request: "_Request"
    sampler: Sampler
    detok: Any
    stop: Any
    tokens: list[int]  # every token of this sequence: prompt + generated
    seq_id: int = -1
    n_computed: int = 0  # tokens whose KV is in the cache
    generated: int = 0
    finish_reason: str | None = None
    pending: int | None = None  # sampled, not yet fed to the model

    @property
    def prompt_left(self) -> int:
        return len(self.tokens) - (1 if self.pending is not None else 0) - self.n_computed


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    n: int
    sink: Callable[[tuple], None]
    max_new: int
    stop_ids: frozenset[int]
    created: float = field(default_factory=time.time)
    choices: list[_Choice] = field(default_factory=list)
    cancelled: bool = False
    cached_tokens: int = 0
    started: float = 0.0
    first_token_at: float = 0.0
    prefill_tokens: int = 0
    finished_at: float = 0.0

    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)


@dataclass
class EngineStats:
    requests: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    cached_prompt_tokens: int = 0
    preemptions: int = 0


def _logprob_entry(logits: np.ndarray, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """The sampled token's log-probability and the ``top_n`` most likely tokens with theirs."""
    lp = log_softmax(logits)
    top: list[tuple[int, float]] = []
    if top_n:
        ids = np.argpartition(-lp, top_n - 1)[:top_n]
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        top = [(int(i), float(lp[i])) for i in ids]
    return float(lp[token]), top


# ------------------------------------------------------------------------------- the engine
class Engine:
    """An OpenAI-style engine over one compiled model.

    ``Engine(model, model_lib=None, device="auto", max_batch_size=None, max_total_tokens=None,
    context_window_size=None, prefill_chunk_size=None, prefix_cache=True, quantization=None,
    overrides=None, opt=None)``.
    ``front_end`` (``engine``, ``chat_module``, ``chat``, ``serve``) only picks the words of the
    load log's "to reduce memory" hint.
    ``model`` is a kiln model directory, a Hugging Face checkpoint directory, a ``.gguf`` file or
    a packaged model name (``smollm2``); what is not yet converted or compiled is built once into
    the cache (``quantization`` picks the scheme then; default: the device's).  ``overrides``
    (``"context_window_size=4096;prefill_chunk_size=512"`` or a dict; also ``max_batch_size``,
    ``sliding_window_size``) are compiled into the library, a cache entry of its own, and are
    the engine's limits unless the arguments of the same names say otherwise; a library given
    as ``model_lib`` cannot grow beyond what it was built for.  ``opt`` are the backend's
    ``compile --opt`` options (``"activations=int8"``), a cache entry of their own too.
    """

    def __init__(
        self,
        model: str | Path,
        model_lib: str | Path | None = None,
        device: str = "auto",
        *,
        max_batch_size: int | None = None,
        max_total_tokens: int | None = None,
        context_window_size: int | None = None,
        prefill_chunk_size: int | None = None,
        prefix_cache: bool = True,
        quantization: str | None = None,
        overrides: str | dict | None = None,
        opt: str | None = None,
        front_end: str = "engine",
    ):
        from ..pipeline.compile import parse_size_overrides
        from .conversation import Conversation
        from .model import LoadedModel
        from .references import resolve_model
        from .tokenizer import Tokenizer

        sizes = parse_size_overrides(overrides)
        prepared = resolve_model(model, model_lib, device, quantization, sizes, opt)
        self.model = LoadedModel(prepared.model_dir, prepared.lib, device)
        for key in ("context_window_size", "prefill_chunk_size", "max_batch_size"):
            built_for = getattr(self.model, key)
            if sizes.get(key, 0) > built_for:
                log.warning("overrides ask for %s=%d, but the model library %s was built for %d: using %d "
                            "(without a given library kiln compiles one with the overrides)",
                            key, sizes[key], self.model.lib_path, built_for, built_for)
        context_window_size = context_window_size or sizes.get("context_window_size")
        prefill_chunk_size = prefill_chunk_size or sizes.get("prefill_chunk_size")
        max_batch_size = max_batch_size or sizes.get("max_batch_size")
        self.model_name = prepared.name
        cfg = self.model.chat_config
        self.chat_config = cfg
        self.tokenizer = Tokenizer.from_model_dir(self.model.model_dir, cfg)
        self.conversation = Conversation.from_chat_config(cfg, tokenizer=self.tokenizer)
        lib_ctx = self.model.context_window_size
        self.context_window_size = min(context_window_size or lib_ctx, lib_ctx)
        self.max_batch_size = min(max_batch_size or DEFAULT_BATCH, self.model.max_batch_size)
        self.prefill_chunk_size = min(prefill_chunk_size or self.model.prefill_chunk_size, self.model.prefill_chunk_size)
        self.max_total_tokens = max_total_tokens or self._default_total_tokens()
        if self.max_total_tokens < self.context_window_size:
            self.context_window_size = self.max_total_tokens
        self.model.create_kv_cache(self.max_batch_size, self.max_total_tokens, self.prefill_chunk_size)
        self.total_pages = self.model.free_pages()
        self._log_memory(REDUCE_MEMORY_HINTS.get(front_end, REDUCE_MEMORY_HINTS["engine"]))
        self.defaults = {
            k: cfg[k] for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
            if cfg.get(k) is not None
        }
        self.prefix_cache_enabled = prefix_cache
        self.stats = EngineStats()
        self.chat = _Chat(self)
        self.completions = _Completions(self)

        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[_Request] = deque()
        self._prefilling: list[_Choice] = []
        self._running: list[_Choice] = []
        self._cache: OrderedDict[int, list[int]] = OrderedDict()  # seq id -> tokens in its KV
        self._seq_ids = itertools.count(1)
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="kiln-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ setup helpers
    def _default_total_tokens(self) -> int:
        """KV budget: every batch slot can hold a full context, within min(RAM / 8, 2 GiB)."""
        want = self.context_window_size * self.max_batch_size
        try:
            import os

            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            ram = 8 << 30
        budget = min(ram // 8, DEFAULT_KV_BUDGET)
        return max(min(want, budget // self.model.kv_bytes_per_token()), min(self.context_window_size, want))

    def _log_memory(self, reduce_hint: str):
        mb = 1 / (1 << 20)
        params = self.model.param_bytes * mb
        kv = self.model.kv_bytes_per_token() * self.total_pages * self.model.kv_config.page_size * mb
        mc = self.model.metadata["model_config"]
        itemsize = np.dtype(self.model.model_dtype).itemsize
        temp = (self.prefill_chunk_size * (6 * mc["hidden_size"] + 3 * mc["num_attention_heads"] * mc["head_dim"]) * itemsize
                + self.max_batch_size * mc["vocab_size"] * 4) * mb
        log.info("Device: %s (%s)", self.model.device, self.model.metadata["target"])
        log.info(
            "Total memory usage: %.2f MB (Parameters: %.2f MB. KVCache: %.2f MB. Temporary buffer: %.2f MB)",
            params + kv + temp, params, kv, temp,
        )
        log.info("KV cache: %d tokens for up to %d sequences, context window %d. To reduce memory, lower %s.",
                 self.max_total_tokens, self.max_batch_size, self.context_window_size, reduce_hint)

    # ------------------------------------------------------------------ public helpers
    def close(self) -> None:
        """Stop the scheduler (requests in flight are cancelled) and release the model."""
        if self._stopping:
            return
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=30)

    terminate = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def token_text(self, token: int) -> str:
        """A token as OpenAI shows it: its text, or ``bytes:\\xNN...`` when it is part of a character."""
        raw = self.tokenizer.token_bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    @property
    def error(self) -> BaseException | None:
        """The internal error that stopped the scheduler, if one did (requests then fail)."""
        return self._error

    def kv_pages_in_use(self) -> int:
        """Pages held by sequences (generating ones and cached prefixes)."""
        return self.total_pages - self.model.free_pages()

    def score(self, tokens: list[int]) -> np.ndarray:
        """Logits ``[len(tokens), vocab]`` of every position of ``tokens`` (teacher forcing), run
        on the scheduler thread between steps (for evaluations such as perplexity)."""
        if not tokens or len(tokens) >= self.context_window_size:
            raise RequestError(f"score needs 1..{self.context_window_size - 1} tokens, got {len(tokens)}")
        result: dict = {}
        done = threading.Event()

        def run():
            seq = next(self._seq_ids)
            try:
                if not self._ensure_pages(self._pages(len(tokens)) + 1):
                    raise RequestError("the KV cache is too busy to score now", code="kv_cache_full")
                self.model.add_sequence(seq)
                try:
                    chunks = [tokens[i:i + self.prefill_chunk_size] for i in range(0, len(tokens), self.prefill_chunk_size)]
                    result["logits"] = np.concatenate([self.model.prefill([seq], [c], all_logits=True) for c in chunks])
                finally:
                    self.model.remove_sequence(seq)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                result["error"] = exc
            finally:
                done.set()

        self._inbox.put(("call", run))
        done.wait()
        if "error" in result:
            raise result["error"]
        return result["logits"]

    def clear_prefix_cache(self) -> None:
        """Drop cached prefixes (runs on the scheduler thread)."""
        done = threading.Event()
        self._inbox.put(("call", lambda: (self._evict_cache(len(self._cache)), done.set())))
        done.wait(30)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until no request is queued or running; ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._inbox.empty() and not (self._waiting or self._prefilling or self._running):
                return True
            time.sleep(0.005)
        return False

    def status(self) -> dict:
        return {
            "waiting": len(self._waiting) + self._inbox.qsize(),
            "running": len(self._running) + len(self._prefilling),
            "kv_pages_total": self.total_pages,
            "kv_pages_in_use": self.kv_pages_in_use(),
            "cached_prefixes": len(self._cache),
        }

    # ------------------------------------------------------------------ requests
    def _params(self, kw: dict) -> SamplingParams:
        merged = {**self.defaults, **{k: v for k, v in kw.items() if v is not None}}
        stop = merged.pop("stop", None)
        if isinstance(stop, str):
            stop = [stop]
        params = SamplingParams(**{k: v for k, v in merged.items() if k in SamplingParams.__dataclass_fields__})
        params.stop = list(stop or [])
        params.logit_bias = {int(k): float(v) for k, v in (params.logit_bias or {}).items()}
        params.validate(self.model.vocab_size)
        return params

    def submit(self, prompt: list[int], params: SamplingParams, n: int, sink: Callable[[tuple], None],
               extra_stop: tuple[str, ...] = (), extra_stop_ids: tuple[int, ...] = (), truncate: int | None = None,
               param_name: str = "prompt") -> _Request:
        """Queue a tokenized request; events go to ``sink`` from the scheduler thread."""
        if self._stopping:
            raise KilnError("the engine is shut down")
        if self._error is not None:
            raise KilnError(f"the engine stopped after an internal error: {self._error}")
        if n < 1 or n > self.max_batch_size:
            raise RequestError(f"n must be between 1 and {self.max_batch_size} (the engine's batch size), got {n}",
                               param="n", code="invalid_value")
        if truncate is not None:
            if truncate < 1:
                raise RequestError("truncate_prompt_tokens must be positive", param="truncate_prompt_tokens")
            prompt = prompt[-truncate:]
        if not prompt:
            raise RequestError("the prompt is empty", param=param_name, code="invalid_value")
        if len(prompt) >= self.context_window_size:
            raise RequestError(
                f"the prompt has {len(prompt)} tokens, more than the model's context window of "
                f"{self.context_window_size} tokens allows (at most {self.context_window_size - 1})",
                param=param_name, code="context_length_exceeded",
            )
        bad = [t for t in prompt if not 0 <= t < self.model.vocab_size]
        if bad:
            raise RequestError(f"prompt token {bad[0]} is outside the vocabulary (0..{self.model.vocab_size - 1})",
                               param=param_name, code="invalid_value")
        room = self.context_window_size - len(prompt)
        max_new = min(params.max_tokens, room) if params.max_tokens else room
        stop_ids = set(params.stop_token_ids) | set(extra_stop_ids)
        if not params.ignore_eos:
            stop_ids |= set(self.tokenizer.eos_token_ids)
        req = _Request(id=f"req-{uuid.uuid4().hex[:24]}", prompt=list(prompt), params=params, n=n, sink=sink,
                       max_new=max_new, stop_ids=frozenset(stop_ids))
        from .tokenizer import StopMatcher

        stops = list(params.stop) + [s for s in extra_stop if s not in params.stop]
        for i in range(n):
            sampler = Sampler(params, i)
            sampler.observe_prompt(req.prompt)
            req.choices.append(_Choice(i, req, sampler, self.tokenizer.detokenizer(), StopMatcher(stops),
                                       tokens=list(req.prompt)))
        self.stats.requests += 1
        self._inbox.put(req)
        return req

    def cancel(self, req: _Request) -> None:
        if not req.cancelled and not req.done():
            req.cancelled = True
            self._inbox.put(("cancel", req))

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self):
        try:
            while True:
                if not (self._waiting or self._prefilling or self._running):
                    if not self._handle(self._inbox.get()):  # idle: block until something arrives
                        return
                while True:
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if not self._handle(item):
                        return
                self._step()
        except BaseException as exc:  # noqa: BLE001 - report to every request, never die silently
            log.exception("kiln scheduler failed")
            self._error = exc
            for req in self._all_requests():
                req.sink(("error", KilnError(f"internal error in the engine: {exc}")))

    def _handle(self, item) -> bool:
        """Apply one inbox item; ``False`` means shut down."""
        if item is None:
            self._shutdown()
            return False
        if isinstance(item, _Request):
            if not item.cancelled:
                self._waiting.append(item)
        elif item[0] == "cancel":
            self._drop_request(item[1], "cancelled")
        elif item[0] == "call":
            item[1]()
        return True

    def _all_requests(self) -> list[_Request]:
        seen = {id(r): r for r in self._waiting}
        for c in self._prefilling + self._running:
            seen[id(c.request)] = c.request
        return list(seen.values())

    def _shutdown(self):
        for req in self._all_requests():
            self._drop_request(req, "cancelled")
        self._evict_cache(len(self._cache))

    def _step(self):
        self._admit()
        if self._prefilling:
            self._prefill_step()
        if self._running:
            self._decode_step()

    # -- KV bookkeeping
    def _free_seq(self, choice: _Choice, keep: bool) -> None:
        if choice.seq_id < 0:
            return
        if keep and self.prefix_cache_enabled and choice.n_computed > 0:
            self._cache[choice.seq_id] = choice.tokens[: choice.n_computed]
            self._cache.move_to_end(choice.seq_id)
            while len(self._cache) > _PREFIX_CACHE_ENTRIES:
                self._evict_cache(1)
        else:
            self.model.remove_sequence(choice.seq_id)
        choice.seq_id = -1

    def _evict_cache(self, count: int) -> int:
        freed = 0
        for _ in range(min(count, len(self._cache))):
            seq_id, _ = self._cache.popitem(last=False)
            self.model.remove_sequence(seq_id)
            freed += 1
        return freed

    def _pages(self, tokens: int) -> int:
        page = self.model.kv_config.page_size
        return -(-tokens // page)

    def _ensure_pages(self, needed: int, protect: set[int] = frozenset()) -> bool:
        """Evict cached prefixes (oldest first, never those in ``protect``) until ``needed`` pages are free."""
        while self.model.free_pages() < needed:
            victims = [s for s in self._cache if s not in protect]
            if not victims:
                break
            del self._cache[victims[0]]
            self.model.remove_sequence(victims[0])
        return self.model.free_pages() >= needed

    def _best_prefix(self, tokens: list[int]) -> tuple[int, int]:
        """(cached sequence id, shared length) of the longest cached prefix of ``tokens``."""
        best, best_len = -1, 0
        arr = np.asarray(tokens)
        for seq_id, cached in self._cache.items():
            n = min(len(cached), len(tokens))
            if n <= best_len:
                continue
            diff = np.flatnonzero(np.asarray(cached[:n]) != arr[:n])
            shared = int(diff[0]) if diff.size else n
            if shared > best_len:
                best, best_len = seq_id, shared
        return best, best_len

    # -- admission
    def _slots_used(self) -> int:
        return len(self._running) + len(self._prefilling)

    def _admit(self):
        while self._waiting:
            req = self._waiting[0]
            if req.cancelled:
                self._waiting.popleft()
                continue
            fresh = req.started == 0.0
            # a fresh request prefills its prompt once, then forks its n choices from it
            todo = req.choices[:1] if fresh else [c for c in req.choices if c.finish_reason is None and c.seq_id < 0]
            if self._slots_used() + (req.n if fresh else len(todo)) > self.max_batch_size:
                return
            plans = [self._plan(c) for c in todo]
            need = sum(pages for _, _, pages in plans) + (req.n - 1 if fresh else 0)
            if not self._ensure_pages(need + self._promised_pages(), protect={parent for parent, _, _ in plans}):
                if not self._running and not self._prefilling:
                    self._waiting.popleft()
                    self._fail(req, RequestError(
                        f"the request needs {need} KV-cache pages but the cache has only {self.total_pages}; "
                        "raise max_total_tokens", code="kv_cache_full"))
                    continue
                return
            self._waiting.popleft()
            if fresh:
                req.started = time.time()
            for choice, (parent, shared, _) in zip(todo, plans):
                self._place(choice, parent, shared)
                self._prefilling.append(choice)
            if fresh:
                req.cached_tokens = req.choices[0].n_computed
                self.stats.cached_prompt_tokens += req.cached_tokens

    def _promised_pages(self) -> int:
        """Pages that admitted sequences will still take before they decode (the rest of their
        prompt, and the forks of a fresh request's other choices): free pages are only free
        beyond these, or concurrent admissions and decode steps overfill the cache."""
        total = 0
        for c in self._prefilling:
            feed = len(c.tokens) - (1 if c.pending is not None else 0)
            total += self._pages(feed + 1) - self._pages(c.n_computed)
            if c.pending is None:
                total += sum(1 for o in c.request.choices if o is not c and o.seq_id < 0 and o.finish_reason is None)
        return total

    def _plan(self, choice: _Choice) -> tuple[int, int, int]:
        """``(cached parent, shared tokens, new pages needed)`` for placing ``choice``."""
        feed = len(choice.tokens) - (1 if choice.pending is not None else 0)
        parent, shared = self._best_prefix(choice.tokens[:feed]) if self._cache else (-1, 0)
        shared = min(shared, feed - 1)  # the last prompt token is always computed: its logits are needed
        if shared <= 0:
            parent, shared = -1, 0
        page = self.model.kv_config.page_size
        return parent, shared, self._pages(feed + 1) - shared // page

    def _place(self, choice: _Choice, parent: int, shared: int):
        """Give ``choice`` a KV sequence, forked from a cached prefix when ``parent`` is one."""
        choice.seq_id = next(self._seq_ids)
        if parent >= 0:
            self.model.fork_sequence(parent, choice.seq_id, shared)
            self._cache.move_to_end(parent)
            choice.n_computed = shared
        else:
            self.model.add_sequence(choice.seq_id)
            choice.n_computed = 0

    # -- prefill
    def _prefill_step(self):
        budget = self.prefill_chunk_size
        batch: list[tuple[_Choice, list[int]]] = []
        for choice in self._prefilling:
            if budget <= 0 or len(batch) >= self.max_batch_size:
                break
            left = choice.prompt_left
            take = min(left, budget)
            batch.append((choice, choice.tokens[choice.n_computed: choice.n_computed + take]))
            budget -= take
        started = time.perf_counter()
        logits = self.model.prefill([c.seq_id for c, _ in batch], [t for _, t in batch])
        elapsed = time.perf_counter() - started
        n_tokens = sum(len(t) for _, t in batch)
        self.stats.prefill_tokens += n_tokens
        self.stats.prefill_seconds += elapsed
        for row, (choice, toks) in enumerate(batch):
            choice.n_computed += len(toks)
            choice.request.prefill_tokens += len(toks)
            if choice.prompt_left > 0:
                continue
            self._prefilling.remove(choice)
            if choice.pending is not None:  # resumed after preemption: its next token is known
                self._running.append(choice)
                continue
            self._start_choices(choice, logits[row])

    def _start_choices(self, first: _Choice, logits: np.ndarray):
        """The prompt is computed: fork the other choices from it and sample every first token."""
        req = first.request
        req.first_token_at = req.first_token_at or time.time()
        for choice in req.choices:
            if choice is not first and choice.seq_id < 0 and choice.finish_reason is None:
                choice.seq_id = next(self._seq_ids)
                self.model.fork_sequence(first.seq_id, choice.seq_id, first.n_computed)
                choice.n_computed = first.n_computed
        for choice in req.choices:
            if choice.finish_reason is None:
                self._running.append(choice)
                self._accept(choice, logits)

    # -- decode
    def _decode_step(self):
        page = self.model.kv_config.page_size
        need = sum(1 for c in self._running if c.n_computed % page == 0)
        while need and not self._ensure_pages(need + self._promised_pages()):
            victim = self._running[-1].request  # the newest request gives way
            self._preempt(victim)
            need = sum(1 for c in self._running if c.n_computed % page == 0)
            if not self._running:
                return
        choices = list(self._running)
        started = time.perf_counter()
        logits = self.model.decode([c.seq_id for c in choices], [c.pending for c in choices])
        elapsed = time.perf_counter() - started
        self.stats.decode_tokens += len(choices)
        self.stats.decode_seconds += elapsed
        self.stats.decode_steps += 1
        for row, choice in enumerate(choices):
            choice.n_computed += 1
            choice.pending = None
            self._accept(choice, logits[row])

    def _preempt(self, req: _Request):
        """Free ``req``'s KV; it waits at the head of the queue and recomputes when readmitted."""
        self.stats.preemptions += 1
        for choice in req.choices:
            if choice in self._running:
                self._running.remove(choice)
            if choice in self._prefilling:
                self._prefilling.remove(choice)
            if choice.seq_id >= 0:
                self.model.remove_sequence(choice.seq_id)
                choice.seq_id = -1
            choice.n_computed = 0
        self._waiting.appendleft(req)

    # -- tokens out
    def _accept(self, choice: _Choice, logits: np.ndarray):
        """Sample from ``logits``, stream the token, and finish the choice if it is done."""
        req = choice.request
        params = req.params
        token = choice.sampler.sample(logits)
        choice.sampler.observe(token)
        choice.generated += 1
        choice.tokens.append(token)
        choice.pending = token
        logprob = _logprob_entry(logits, token, params.top_logprobs) if params.logprobs else None
        finish = None
        text = ""
        if token in req.stop_ids:
            finish = "stop"
            tail, _ = choice.stop.put(choice.detok.flush())  # text held back before the stop token
            text = tail + choice.stop.flush()
        else:
            text, stopped = choice.stop.put(choice.detok.put(token))
            if stopped:
                finish = "stop"
        if finish is None and (choice.generated >= req.max_new
                               or choice.n_computed + 1 >= self.context_window_size):
            finish = "length"
        if finish is not None:
            if finish == "length":
                tail, _ = choice.stop.put(choice.detok.flush())
                text += tail + choice.stop.flush()
            self._finish_choice(choice, finish, text, token, logprob)
        else:
            req.sink(("token", choice.index, text, token, logprob))

    def _finish_choice(self, choice: _Choice, reason: str, text: str, token: int | None, logprob):
        req = choice.request
        choice.finish_reason = reason
        if choice in self._running:
            self._running.remove(choice)
        # the KV holds everything but the last sampled token; cache it for a follow-up turn
        self._free_seq(choice, keep=True)
        req.sink(("token", choice.index, text, token, logprob))
        req.sink(("finish", choice.index, reason))
        if req.done():
            req.finished_at = time.time()
            req.sink(("done", self._usage(req)))

    def _usage(self, req: _Request) -> P.Usage:
        completion = sum(c.generated for c in req.choices)
        return P.Usage(len(req.prompt), completion, len(req.prompt) + completion,
                       P.PromptTokensDetails(req.cached_tokens))

    def _drop_request(self, req: _Request, reason: str):
        if req in self._waiting:
            self._waiting.remove(req)
        for choice in req.choices:
            if choice in self._running:
                self._running.remove(choice)
            if choice in self._prefilling:
                self._prefilling.remove(choice)
            if choice.seq_id >= 0:
                self.model.remove_sequence(choice.seq_id)
                choice.seq_id = -1
            if choice.finish_reason is None:
                choice.finish_reason = reason
        req.sink(("cancelled", None))

    def _fail(self, req: _Request, error: Exception):
        for choice in req.choices:
            choice.finish_reason = choice.finish_reason or "error"
        req.sink(("error", error))


# ------------------------------------------------------------------------------- the OpenAI-style API
_CHAT_FIELDS = {
    "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "stop", "seed", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "logit_bias", "stop_token_ids", "ignore_eos",
}
_IGNORED_FIELDS = {  # OpenAI fields kiln accepts and does not act on
    "user", "model", "response_format", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
    "service_tier", "store", "metadata", "modalities", "audio", "prediction", "reasoning_effort", "suffix",
    "best_of", "web_search_options", "verbosity",
}


@dataclass
class _Prepared:
    prompt: list[int]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    extra_stop: tuple[str, ...]
    extra_stop_ids: tuple[int, ...]
    truncate: int | None
    param_name: str
    echo_text: str = ""


class _API:
    """Turns OpenAI-style arguments into a request, and engine events into OpenAI objects."""

    chat = False

    def __init__(self, engine: "Engine"):
        self.engine = engine

    # -- arguments
    def _prepare(self, kw: dict, prompt_tokens: list[int], param_name: str, extra_stop=(), extra_stop_ids=()):
        unknown = sorted(k for k in kw if k not in _CHAT_FIELDS | {"logprobs", "top_logprobs", "n", "stream",
                                                                   "stream_options", "truncate_prompt_tokens", "echo"})
        ignored = [k for k in unknown if k in _IGNORED_FIELDS]
        rejected = [k for k in unknown if k not in _IGNORED_FIELDS]
        if ignored or rejected:
            log.warning("ignoring unsupported request field(s): %s", ", ".join(ignored + rejected))
        sampling = {k: kw[k] for k in _CHAT_FIELDS if kw.get(k) is not None}
        if "max_completion_tokens" in sampling:
            sampling["max_tokens"] = sampling.pop("max_completion_tokens")
        if self.chat:
            sampling["logprobs"] = bool(kw.get("logprobs"))
            sampling["top_logprobs"] = int(kw.get("top_logprobs") or 0)
            if sampling["top_logprobs"] and not sampling["logprobs"]:
                raise RequestError("top_logprobs requires logprobs=true", param="top_logprobs")
        elif kw.get("logprobs") is not None:
            if not isinstance(kw["logprobs"], int) or not 0 <= kw["logprobs"] <= 5:
                raise RequestError("logprobs must be an integer between 0 and 5", param="logprobs")
            sampling["logprobs"], sampling["top_logprobs"] = True, int(kw["logprobs"])
        params = self.engine._params(sampling)
        n = 1 if kw.get("n") is None else kw["n"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise RequestError(f"n must be a positive integer, got {n!r}", param="n", code="invalid_value")
        stream_options = kw.get("stream_options") or {}
        return _Prepared(prompt_tokens, params, n, bool(kw.get("stream")), bool(stream_options.get("include_usage")),
                         tuple(extra_stop), tuple(extra_stop_ids), kw.get("truncate_prompt_tokens"), param_name)

    # -- events
    def _submit(self, prep: _Prepared, sink):
        return self.engine.submit(prep.prompt, prep.params, prep.n, sink, prep.extra_stop, prep.extra_stop_ids,
                                  prep.truncate, prep.param_name)

    def _token_text(self, token: int) -> str:
        return self.engine.token_text(token)

    def _logprob_obj(self, entry):
        token, (lp, top) = entry
        tb = self.engine.tokenizer.token_bytes
        return P.TokenLogprob(self._token_text(token), lp, list(tb(token)),
                              [P.TopLogprob(self._token_text(i), v, list(tb(i))) for i, v in top])

    def _new_id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]

    def _collect(self, events: Iterator[tuple], prep: _Prepared):
        texts = [[] for _ in range(prep.n)]
        lps: list[list] = [[] for _ in range(prep.n)]
        reasons: list[str | None] = [None] * prep.n
        usage = None
        for ev in events:
            kind = ev[0]
            if kind == "token":
                _, idx, text, token, logprob = ev
                texts[idx].append(text)
                if logprob is not None:
                    lps[idx].append((token, logprob))
            elif kind == "finish":
                reasons[ev[1]] = ev[2]
            elif kind == "done":
                usage = ev[1]
        return ["".join(t) for t in texts], lps, reasons, usage

    def _final(self, prep: _Prepared, events) -> Any:
        texts, lps, reasons, usage = self._collect(events, prep)
        rid, created, model = self._new_id(), int(time.time()), self.engine.model_name
        if self.chat:
            choices = [
                P.ChatChoice(i, P.ChatMessage("assistant", texts[i]), reasons[i],
                             P.ChoiceLogprobs([self._logprob_obj(e) for e in lps[i]]) if prep.params.logprobs else None)
                for i in range(prep.n)
            ]
            return P.ChatCompletion(rid, created, model, choices, usage)
        choices = [P.CompletionChoice(i, prep.echo_text + texts[i], reasons[i],
                                      self._completion_logprobs(lps[i], len(prep.echo_text)) if prep.params.logprobs else None)
                   for i in range(prep.n)]
        return P.Completion(rid, created, model, choices, usage)

    def _completion_logprobs(self, entries, offset: int) -> P.CompletionLogprobs:
        out = P.CompletionLogprobs()
        for token, (lp, top) in entries:
            text = self._token_text(token)
            out.tokens.append(text)
            out.token_logprobs.append(lp)
            out.top_logprobs.append({self._token_text(i): v for i, v in top})
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def _chunk_builder(self, prep: _Prepared) -> "Callable[[tuple | None], list]":
        """``build(event) -> chunks``; ``build(None)`` gives the opening chunks."""
        rid, created, model = self._new_id(), int(time.time()), self.engine.model_name
        chat = self.chat

        def chunk(choices, usage=None):
            if chat:
                return P.ChatCompletionChunk(rid, created, model, choices, usage=usage)
            return P.Completion(rid, created, model, choices, usage=usage)

        def build(ev):
            if ev is None:
                return [chunk([P.ChatChunkChoice(i, P.Delta("assistant", "")) for i in range(prep.n)])] if chat else []
            kind = ev[0]
            if kind == "token":
                _, idx, text, token, logprob = ev
                if not text and logprob is None:
                    return []
                if chat:
                    lp = P.ChoiceLogprobs([self._logprob_obj((token, logprob))]) if logprob is not None else None
                    return [chunk([P.ChatChunkChoice(idx, P.Delta(None, text), None, lp)])]
                lp = self._completion_logprobs([(token, logprob)], 0) if logprob is not None else None
                return [chunk([P.CompletionChoice(idx, text, None, lp)])]
            if kind == "finish":
                if chat:
                    return [chunk([P.ChatChunkChoice(ev[1], P.Delta(), ev[2])])]
                return [chunk([P.CompletionChoice(ev[1], "", ev[2])])]
            if kind == "done" and prep.include_usage:
                return [chunk([], usage=ev[1])]
            return []

        return build

    def _chunks(self, prep: _Prepared, events) -> Iterator[Any]:
        build = self._chunk_builder(prep)
        yield from build(None)
        for ev in events:
            yield from build(ev)

    # -- the two front ends share everything above
    def _events_sync(self, prep: _Prepared) -> Iterator[tuple]:
        q: queue.Queue = queue.Queue()
        req = self._submit(prep, q.put)
        try:
            while True:
                ev = q.get()
                if ev[0] == "error":
                    raise ev[1]
                if ev[0] == "cancelled":
                    return
                yield ev
                if ev[0] == "done":
                    return
        finally:
            self.engine.cancel(req)

    def _run(self, prep: _Prepared):
        if prep.stream:
            return self._chunks(prep, self._events_sync(prep))
        return self._final(prep, self._events_sync(prep))


class _ChatCompletions(_API):
    chat = True

    def _prepare_chat(self, messages, kw) -> _Prepared:
        engine = self.engine
        conv = engine.conversation
        text = conv.render(messages)
        prompt = list(conv.system_prefix_token_ids) + engine.tokenizer.encode(text)
        return self._prepare(kw, prompt, "messages", conv.stop_str, conv.stop_token_ids)

    def create(self, messages: list[dict], **kw):
        """OpenAI ``chat.completions.create``: a ChatCompletion, or an iterator of chunks with
        ``stream=True`` (closing the iterator cancels the request)."""
        return self._run(self._prepare_chat(messages, kw))


class _Chat:
    def __init__(self, engine: "Engine", api=_ChatCompletions):
        self.completions = api(engine)


class _Completions(_API):
    def _prepare_text(self, prompt, kw) -> _Prepared:
        engine = self.engine
        if isinstance(prompt, str):
            tokens = engine.tokenizer.encode(prompt, add_bos=engine.tokenizer.add_bos_token)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            tokens = list(prompt)
        else:
            raise RequestError("prompt must be a string or a non-empty list of token ids", param="prompt",
                               code="invalid_type")
        prep = self._prepare(kw, tokens, "prompt")
        if kw.get("echo"):
            prep.echo_text = prompt if isinstance(prompt, str) else engine.tokenizer.decode(tokens)
        return prep

    def create(self, prompt: str | list[int], **kw):
        """OpenAI ``completions.create`` (prompt as text or token ids)."""
        return self._run(self._prepare_text(prompt, kw))


# ------------------------------------------------------------------------------- asyncio front end
class _AsyncMixin:
    async def _events_async(self, prep: _Prepared):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = self._submit(prep, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        try:
            while True:
                ev = await q.get()
                if ev[0] == "error":
                    raise ev[1]
                if ev[0] == "cancelled":
                    return
                yield ev
                if ev[0] == "done":
                    return
        finally:
            self.engine.cancel(req)

    async def _run_async(self, prep: _Prepared):
        if prep.stream:
            return self._achunks(prep)
        events = [ev async for ev in self._events_async(prep)]
        return self._final(prep, iter(events))

    async def _achunks(self, prep: _Prepared):
        build = self._chunk_builder(prep)
        for chunk in build(None):
            yield chunk
        events = self._events_async(prep)
        try:
            async for ev in events:
                for chunk in build(ev):
                    yield chunk
        finally:
            await events.aclose()


class _AsyncChatCompletions(_AsyncMixin, _ChatCompletions):
    async def create(self, messages: list[dict], **kw):
        return await self._run_async(self._prepare_chat(messages, kw))


class _AsyncCompletions(_AsyncMixin, _Completions):
    async def create(self, prompt: str | list[int], **kw):
        return await self._run_async(self._prepare_text(prompt, kw))


class AsyncEngine(Engine):
    """The same engine with ``async`` ``chat.completions.create`` / ``completions.create``;
    streaming returns an async iterator (closing it cancels the request)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chat = _Chat(self, _AsyncChatCompletions)
        self.completions = _AsyncCompletions(self)
