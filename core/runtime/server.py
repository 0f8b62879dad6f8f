"""``kiln serve``: an OpenAI-compatible REST server (FastAPI + uvicorn) over :class:`AsyncEngine`.

Endpoints: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions``,
``POST /v1/completions`` (streamed as server-sent events when ``stream`` is true),
``GET /health`` and ``GET /metrics`` (Prometheus text format).

How it stays up under load and bad input:

* Every request goes straight to the engine's scheduler, which batches it with the others
  (continuous batching); the server only admits, validates, and relays events.
* Admission (an ASGI middleware, :class:`_Gate`): after a shutdown signal every new request
  gets 503; ``/v1`` needs the API key when one is set (401); at most ``max_batch_size +
  max_queue`` generation requests may be in flight, the next gets 429.
* Bodies are read with a byte limit (413) and parsed and type-checked here, field by field,
  so every mistake is a 400 in OpenAI's error shape that names the field; range checks are the
  engine's (:class:`~kiln.errors.RequestError` carries ``param`` and ``code``).
* A generation runs in its own task next to a task that waits for the client to disconnect
  (:class:`_Generation`); whichever ends first cancels the other, and cancelling the
  generation closes the engine's iterator, which cancels the request and frees its KV pages.
  A stream's headers go out with its first token, so a request the engine refuses (a prompt
  longer than the context window, ...) still gets a proper 400 rather than a broken stream.
* SIGINT/SIGTERM (:class:`_Server`): stop admitting, let requests in flight finish for
  ``shutdown_grace`` seconds, cancel what is left, close, return (the process exits 0).
* Metrics come from the engine's event stream (:class:`_ServingEngine` wraps each request's
  event sink) and from :meth:`Engine.status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import json
import logging
import math
import signal
import socket
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from starlette.requests import ClientDisconnect, Request  # module level: FastAPI resolves the routes' annotations here
from starlette.responses import Response

from ..errors import KilnError, RequestError, UsageError
from .engine import _IGNORED_FIELDS, AsyncEngine

log = logging.getLogger("kiln")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_BODY_BYTES = 8 << 20
DEFAULT_SHUTDOWN_GRACE = 5.0

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
_GENERATION_PATHS = (CHAT_PATH, COMPLETIONS_PATH)
_ENDPOINTS = ("/v1/models", CHAT_PATH, COMPLETIONS_PATH, "/health", "/metrics")
_UNGUARDED = ("/health", "/metrics")  # no API key, not counted as in flight
_METHODS = ("GET", "POST", "OPTIONS", "HEAD", "PUT", "PATCH", "DELETE")

# when the request reached the server; the engine's sink wrapper reads it for time to first token
_ARRIVAL: contextvars.ContextVar[float | None] = contextvars.ContextVar("kiln_arrival", default=None)


# ------------------------------------------------------------------------------------- errors
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                503: "server_error"}


class HTTPError(Exception):
    """An error answered with ``status`` and OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def _as_http_error(exc: BaseException) -> HTTPError:
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, RequestError):
        return HTTPError(400, str(exc), exc.param, exc.code or "invalid_value")
    if isinstance(exc, KilnError):
        if "shut down" in str(exc):
            return HTTPError(503, str(exc), code="server_shutting_down")
        return HTTPError(500, str(exc), code="internal_error")
    return HTTPError(500, f"internal server error: {type(exc).__name__}", code="internal_error")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


async def _send_json(send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    data = _dumps(body)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _send_error(send, err: HTTPError) -> None:
    await _send_json(send, err.status, err.body(), err.headers)


# ------------------------------------------------------------------------------------- metrics
class _Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, out: list[str]) -> None:
        out += [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, n in zip(self.buckets, self.counts):
            total += n
            out.append(f'{self.name}_bucket{{le="{bound:g}"}} {total}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{self.name}_sum {self.sum!r}")
        out.append(f"{self.name}_count {self.count}")


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters and histograms; updated from the event loop and the scheduler thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.http: dict[tuple[str, str, int], int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.outcomes = {"completed": 0, "cancelled": 0, "failed": 0}
        self.ttft = _Histogram("kiln_time_to_first_token_seconds",
                               "Time from a request's arrival to its first generated token.",
                               (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.itl = _Histogram("kiln_inter_token_latency_seconds",
                              "Time between two consecutive tokens of one sequence.",
                              (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.duration = _Histogram("kiln_request_duration_seconds",
                                   "Time from a request's arrival to its last token (completed requests).",
                                   (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))

    def count_http(self, endpoint: str, method: str, status: int) -> None:
        with self.lock:
            key = (endpoint, method, status)
            self.http[key] = self.http.get(key, 0) + 1

    def render(self, gauges: list[tuple[str, str, str, float]], info: dict[str, str]) -> str:
        out: list[str] = []
        labels = ",".join(f'{k}="{_label(v)}"' for k, v in info.items())
        out += ["# HELP kiln_model_info The model this server runs.", "# TYPE kiln_model_info gauge",
                f"kiln_model_info{{{labels}}} 1"]
        with self.lock:
            out += ["# HELP kiln_http_requests_total HTTP requests by endpoint, method and status code.",
                    "# TYPE kiln_http_requests_total counter"]
            for (endpoint, method, status), n in sorted(self.http.items()):
                out.append(f'kiln_http_requests_total{{endpoint="{_label(endpoint)}",method="{method}",'
                           f'status="{status}"}} {n}')
            out += ["# HELP kiln_prompt_tokens_total Prompt tokens of requests the engine accepted.",
                    "# TYPE kiln_prompt_tokens_total counter", f"kiln_prompt_tokens_total {self.prompt_tokens}",
                    "# HELP kiln_generation_tokens_total Generated tokens.",
                    "# TYPE kiln_generation_tokens_total counter",
                    f"kiln_generation_tokens_total {self.generation_tokens}",
                    "# HELP kiln_requests_total Engine requests by outcome (cancelled: client gone or shutdown).",
                    "# TYPE kiln_requests_total counter"]
            out += [f'kiln_requests_total{{outcome="{k}"}} {v}' for k, v in self.outcomes.items()]
            for hist in (self.ttft, self.itl, self.duration):
                hist.render(out)
        for name, kind, help_, value in gauges:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
        return "\n".join(out) + "\n"


class _Tracker:
    """One engine request's timings, fed by its events on the scheduler thread."""

    __slots__ = ("engine", "arrival", "req", "last", "first", "closed")

    def __init__(self, engine: "_ServingEngine", arrival: float):
        self.engine = engine
        self.arrival = arrival
        self.req = None
        self.last: dict[int, float] = {}
        self.first = False
        self.closed = False

    def event(self, ev: tuple) -> None:
        kind = ev[0]
        metrics = self.engine.metrics
        now = time.monotonic()
        if kind == "token":
            with metrics.lock:
                metrics.generation_tokens += 1
                last = self.last.get(ev[1])
                if last is not None:
                    metrics.itl.observe(now - last)
                elif not self.first:
                    self.first = True
                    metrics.ttft.observe(now - self.arrival)
            self.last[ev[1]] = now
            return
        outcome = {"done": "completed", "cancelled": "cancelled", "error": "failed"}.get(kind)
        if outcome is None or self.closed:
            return
        self.closed = True
        with metrics.lock:
            metrics.outcomes[outcome] += 1
            if outcome == "completed":
                metrics.duration.observe(now - self.arrival)
        self.engine._untrack(self)


class _ServingEngine(AsyncEngine):
    """:class:`AsyncEngine` that records metrics from each request's events and can cancel
    every request it runs (for shutdown)."""

    def __init__(self, *args, metrics: Metrics, **kwargs):
        self.metrics = metrics
        self._live: set[_Tracker] = set()
        self._live_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def submit(self, prompt, params, n, sink, *args, **kwargs):
        tracker = _Tracker(self, _ARRIVAL.get() or time.monotonic())

        def timed(ev):
            tracker.event(ev)
            sink(ev)

        with self._live_lock:
            self._live.add(tracker)
        try:
            req = super().submit(prompt, params, n, timed, *args, **kwargs)
        except BaseException:
            self._untrack(tracker)
            raise
        tracker.req = req
        with self.metrics.lock:
            self.metrics.prompt_tokens += len(req.prompt)
        return req

    def _untrack(self, tracker: _Tracker) -> None:
        with self._live_lock:
            self._live.discard(tracker)

    def cancel_all(self) -> int:
        """Cancel every request in flight; returns how many."""
        with self._live_lock:
            live = [t.req for t in self._live if t.req is not None]
        for req in live:
            self.cancel(req)
        return len(live)


# ------------------------------------------------------------------------------------- request parsing
def _type_name(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _bad_type(name: str, want: str, value) -> RequestError:
    return RequestError(f"'{name}' must be {want}, got {_type_name(value)}", param=name, code="invalid_type")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(name, v):
    if not _is_int(v):
        raise _bad_type(name, "an integer", v)
    return v


def _check_number(name, v):
    if not (_is_int(v) or isinstance(v, float)):
        raise _bad_type(name, "a number", v)
    if not math.isfinite(v):
        raise RequestError(f"'{name}' must be a finite number", param=name, code="invalid_value")
    return v


def _check_bool(name, v):
    if not isinstance(v, bool):
        raise _bad_type(name, "a boolean", v)
    return v


def _check_str(name, v):
    if not isinstance(v, str):
        raise _bad_type(name, "a string", v)
    return v


def _check_stop(name, v):
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return v
    raise _bad_type(name, "a string or an array of strings", v)


def _check_int_list(name, v):
    if not isinstance(v, list) or not all(_is_int(t) for t in v):
        raise _bad_type(name, "an array of integers", v)
    return v


def _check_logit_bias(name, v):
    if not isinstance(v, dict):
        raise _bad_type(name, "an object mapping token ids to numbers", v)
    out = {}
    for key, bias in v.items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError(f"'{name}' keys must be token ids, got {key!r}", param=name,
                               code="invalid_value") from None
        out[token] = _check_number(name, bias)
    return out


def _check_stream_options(name, v):
    if not isinstance(v, dict):
        raise _bad_type(name, "an object", v)
    if v.get("include_usage") is not None:
        _check_bool(f"{name}.include_usage", v["include_usage"])
    return v


_COMMON: dict[str, Callable] = {
    "model": _check_str, "user": _check_str,
    "stream": _check_bool, "stream_options": _check_stream_options,
    "temperature": _check_number, "top_p": _check_number, "top_k": _check_int,
    "max_tokens": _check_int, "max_completion_tokens": _check_int, "n": _check_int, "seed": _check_int,
    "presence_penalty": _check_number, "frequency_penalty": _check_number, "repetition_penalty": _check_number,
    "stop": _check_stop, "stop_token_ids": _check_int_list, "ignore_eos": _check_bool,
    "logit_bias": _check_logit_bias, "truncate_prompt_tokens": _check_int,
}
_CHAT = {**_COMMON, "logprobs": _check_bool, "top_logprobs": _check_int}
_COMPLETION = {**_COMMON, "logprobs": _check_int, "echo": _check_bool}
_SERVER_ONLY = {"model", "user"}  # used (or accepted as metadata) here, not passed to the engine


def _check_prompt(v):
    """A completion prompt: text or token ids (a one-element batch of either is unwrapped)."""
    if isinstance(v, list) and len(v) == 1 and (isinstance(v[0], str) or isinstance(v[0], list)):
        v = v[0]
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(_is_int(t) for t in v):
        return v
    if isinstance(v, list) and len(v) > 1 and all(isinstance(p, (str, list)) for p in v):
        raise RequestError("batches of prompts are not supported: send one prompt per request", param="prompt",
                           code="invalid_value")
    if isinstance(v, list) and not v:
        raise RequestError("'prompt' must not be empty", param="prompt", code="invalid_value")
    raise _bad_type("prompt", "a string or an array of token ids", v)


def parse_request(body: Any, chat: bool) -> tuple[Any, dict, int, bool]:
    """``(messages or prompt, engine keyword arguments, n, stream)`` from a request body;
    raises :class:`RequestError` naming the offending field."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_type_name(body)}", code="invalid_type")
    required = "messages" if chat else "prompt"
    if body.get(required) is None:
        raise RequestError(f"'{required}' is required", param=required, code="missing_required_parameter")
    checks = _CHAT if chat else _COMPLETION
    kwargs: dict[str, Any] = {}
    unknown = []
    for name, value in body.items():
        if name == required:
            continue
        check = checks.get(name)
        if check is None:
            unknown.append(name)
            continue
        if value is None:
            continue
        value = check(name, value)
        if name not in _SERVER_ONLY:
            kwargs[name] = value
    if unknown:
        # the engine's own wording; OpenAI fields kiln does not act on are not errors
        log.warning("ignoring unsupported request field(s): %s",
                    ", ".join(sorted(unknown, key=lambda k: (k not in _IGNORED_FIELDS, k))))
    if kwargs.get("max_completion_tokens", 1) < 1:  # the engine knows it as max_tokens
        raise RequestError(f"max_completion_tokens must be at least 1, got {kwargs['max_completion_tokens']}",
                           param="max_completion_tokens", code="invalid_value")
    payload = body["messages"] if chat else _check_prompt(body["prompt"])
    return payload, kwargs, kwargs.get("n", 1), bool(kwargs.get("stream"))


# ------------------------------------------------------------------------------------- server state
@dataclass
class ServerOptions:
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_queue: int = DEFAULT_MAX_QUEUE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE


class ServerState:
    def __init__(self, engine: AsyncEngine, options: ServerOptions, model_names: tuple[str, ...] = ()):
        self.engine = engine
        self.options = options
        self.metrics: Metrics = getattr(engine, "metrics", None) or Metrics()
        self.model_id = engine.model_name
        self.model_names = {self.model_id, *(n for n in model_names if n)}
        self.created = int(time.time())
        self.capacity = engine.max_batch_size + options.max_queue
        self.in_flight = 0  # requests past the gate, except /health and /metrics
        self.generating = 0  # of those, generation requests (the 429 limit counts these)
        self.draining = False
        self.drain_deadline = 0.0
        self.aborted = False

    def check_model(self, model: str | None) -> None:
        if model is None or model in self.model_names or model.rstrip("/") in self.model_names:
            return
        raise HTTPError(404, f"The model '{model}' does not exist; this server runs '{self.model_id}'",
                        param="model", code="model_not_found")

    def begin_drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.drain_deadline = time.monotonic() + self.options.shutdown_grace

    def abort(self) -> int:
        """Cancel every engine request (the grace period is over)."""
        self.aborted = True
        cancel_all = getattr(self.engine, "cancel_all", None)
        return cancel_all() if cancel_all else 0

    def gauges(self) -> list[tuple[str, str, str, float]]:
        st = self.engine.status()
        stats = self.engine.stats
        return [
            ("kiln_decode_steps_total", "counter", "Batched decode steps the engine ran.", stats.decode_steps),
            ("kiln_decode_tokens_total", "counter",
             "Tokens those decode steps produced (divided by the steps: the mean decode batch).", stats.decode_tokens),
            ("kiln_prefill_tokens_total", "counter", "Prompt tokens the engine computed (not reused from the "
             "prefix cache).", stats.prefill_tokens),
            ("kiln_preemptions_total", "counter", "Requests whose KV was freed for others (recomputed later).",
             stats.preemptions),
            ("kiln_requests_waiting", "gauge", "Requests queued in the engine, waiting for a batch slot.",
             st["waiting"]),
            ("kiln_sequences_running", "gauge", "Sequences in the running batch (prefilling or decoding).",
             st["running"]),
            ("kiln_kv_cache_pages_in_use", "gauge", "KV-cache pages held by sequences and cached prefixes.",
             st["kv_pages_in_use"]),
            ("kiln_kv_cache_pages_total", "gauge", "KV-cache pages in all.", st["kv_pages_total"]),
            ("kiln_kv_cache_cached_prefixes", "gauge", "Finished sequences kept as reusable prefixes.",
             st["cached_prefixes"]),
            ("kiln_server_requests_in_flight", "gauge", "HTTP requests being served (not /health or /metrics).",
             self.in_flight),
            ("kiln_server_generation_requests_in_flight", "gauge",
             "Generation requests being served (limit: max batch size + max queue).", self.generating),
            ("kiln_server_draining", "gauge", "1 while shutting down (new requests get 503).", int(self.draining)),
        ]


# ------------------------------------------------------------------------------------- ASGI pieces
class _Gate:
    """Admission, auth, in-flight accounting and request metrics, outside the routes (pure ASGI,
    so streaming responses pass straight through)."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state
        key = state.options.api_key
        self.key = key.encode() if key else None

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st = self.state
        path, method = scope["path"], scope["method"]
        # bounded label values: a client must not be able to grow the metrics without limit
        endpoint = path if path in _ENDPOINTS else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        method_label = method if method in _METHODS else "other"
        status = 0

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        counted = generating = False
        try:
            if st.draining and path != "/metrics":
                raise HTTPError(503, "the server is shutting down", code="server_shutting_down",
                                headers={"Retry-After": "1", "Connection": "close"})
            if path not in _UNGUARDED:
                if self.key is not None and path.startswith("/v1") and method != "OPTIONS" \
                        and not self._authorized(scope):
                    raise HTTPError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                if method == "POST" and path in _GENERATION_PATHS:
                    if st.generating >= st.capacity:
                        raise HTTPError(429, f"the server is busy: {st.generating} requests in flight, the limit is "
                                             f"{st.capacity} (max batch size + --max-queue); retry later",
                                        code="queue_full", headers={"Retry-After": "1"})
                    st.generating += 1
                    generating = True
                st.in_flight += 1
                counted = True
            _ARRIVAL.set(time.monotonic())
            await self.app(scope, receive, send_status)
        except HTTPError as err:
            await _send_error(send_status, err)
        finally:
            if counted:
                st.in_flight -= 1
            if generating:
                st.generating -= 1
            if not status:
                status = 499 if scope.get("kiln.client_gone") else 500
            st.metrics.count_http(endpoint, method_label, status)


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _Generation(Response):
    """The response of a generation request (an ASGI app).  ``start()`` is the engine call.

    The generation and a disconnect watcher run side by side; a client that goes away cancels
    the generation task, and the engine's iterator, closed on the way out, cancels the request.
    """

    def __init__(self, state: ServerState, start: Callable[[], Awaitable[Any]], stream: bool, n: int, chat: bool):
        super().__init__()
        self.state = state
        self.start = start
        self.stream = stream
        self.n = n
        self.chat = chat

    async def __call__(self, scope, receive, send):
        worker = asyncio.ensure_future(self._run(send))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((worker, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not worker.done():
                scope["kiln.client_gone"] = watcher.done()
                worker.cancel()
            watcher.cancel()
            await asyncio.gather(worker, watcher, return_exceptions=True)
        if not worker.cancelled() and worker.exception() is not None:
            log.error("generation request failed", exc_info=worker.exception())

    async def _run(self, send):
        try:
            result = await self.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error response
            return await self._fail_before_headers(send, exc)
        if not self.stream:
            body = result.to_dict()
            if any(c.get("finish_reason") is None for c in body["choices"]):
                return await _send_error(send, self._aborted())
            return await _send_json(send, 200, body)
        await self._stream(send, result)

    async def _fail_before_headers(self, send, exc: BaseException):
        err = _as_http_error(exc)
        if err.status >= 500 and not isinstance(exc, KilnError):
            log.error("request failed", exc_info=exc)
        await _send_error(send, err)

    def _aborted(self) -> HTTPError:
        return HTTPError(503, "the server shut down before the request finished; it was cancelled",
                         code="server_shutting_down")

    async def _stream(self, send, chunks):
        finished: set[int] = set()

        async def emit(chunk):
            data = chunk.to_dict()
            for choice in data.get("choices") or ():
                if choice.get("finish_reason") is not None:
                    finished.add(choice["index"])
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + _dumps(data) + b"\n\n"})

        it = chunks.__aiter__()
        headers_sent = False
        try:
            # Hold the headers until the request is in the engine and has its first token: the
            # engine checks the prompt (context length, ...) when it queues the request, and a
            # refusal should be a 400, not a broken stream.  A chat stream opens with a role
            # chunk made before the request is queued, so take two chunks there.
            head, ended = [], False
            while len(head) < (2 if self.chat else 1):
                try:
                    head.append(await it.__anext__())
                except StopAsyncIteration:
                    ended = True
                    break
        except asyncio.CancelledError:
            await chunks.aclose()
            raise
        except Exception as exc:  # noqa: BLE001
            await chunks.aclose()
            return await self._fail_before_headers(send, exc)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            headers_sent = True
            for chunk in head:
                await emit(chunk)
            if not ended:
                async for chunk in it:
                    await emit(chunk)
            if len(finished) < self.n:  # cut short: only a shutdown cancels a request we still serve
                raise self._aborted()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - report it in the stream; the status is already sent
            err = _as_http_error(exc)
            if err.status >= 500 and not isinstance(exc, (KilnError, HTTPError)):
                log.error("stream failed", exc_info=exc)
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + _dumps(err.body()) + b"\n\n"})
        finally:
            await chunks.aclose()
        if headers_sent:
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


# ------------------------------------------------------------------------------------- the app
async def _read_json(request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPError(413, f"the request body has {int(length)} bytes, more than the limit of {limit} "
                             "(--max-body-bytes)", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"the request body is larger than the limit of {limit} bytes (--max-body-bytes)",
                            code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise HTTPError(400, "the request body is empty: send a JSON object", code="invalid_json")

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise HTTPError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def create_app(state: ServerState):
    """The FastAPI application serving ``state.engine``."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="kiln", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kiln = state
    engine = state.engine

    def model_card():
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "kiln",
                "root": str(engine.model.model_dir), "max_model_len": engine.context_window_size}

    @app.get("/health")
    async def health():
        if getattr(engine, "_error", None) is not None:
            return JSONResponse({"status": "error", "detail": str(engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        info = {"model": state.model_id, "device": str(engine.model.device)}
        return PlainTextResponse(state.metrics.render(state.gauges(), info),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        state.check_model(model_id)
        return model_card()

    async def generation(request: Request, chat: bool):
        try:
            body = await _read_json(request, state.options.max_body_bytes)
        except ClientDisconnect:  # gone while uploading: nobody to answer
            request.scope["kiln.client_gone"] = True
            return Response(status_code=499)
        payload, kwargs, n, stream = parse_request(body, chat)
        state.check_model(body.get("model"))
        if chat:
            start = lambda: engine.chat.completions.create(messages=payload, **kwargs)  # noqa: E731
        else:
            start = lambda: engine.completions.create(prompt=payload, **kwargs)  # noqa: E731
        return _Generation(state, start, stream, n, chat)

    @app.post(CHAT_PATH)
    async def chat_completions(request: Request):
        return await generation(request, chat=True)

    @app.post(COMPLETIONS_PATH)
    async def completions(request: Request):
        return await generation(request, chat=False)

    def error_response(err: HTTPError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPError)
    async def _http_error(request, exc: HTTPError):
        return error_response(exc)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return error_response(_as_http_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(exc.status_code, message, None, code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):  # uvicorn logs the traceback
        return error_response(_as_http_error(exc))

    app.add_middleware(_Gate, state=state)
    if state.options.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        origins = list(state.options.allowed_origins)
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"], allow_credentials=False)
    return app


# ------------------------------------------------------------------------------------- running it
def _uvicorn_server_class():
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's server with kiln's shutdown: a signal starts draining (503 for new requests);
        once nothing is in flight, or the grace period is over and what was left is cancelled,
        the server closes.  The signal is not re-raised afterwards, so the process exits 0."""

        def __init__(self, config, state: ServerState):
            super().__init__(config)
            self.kiln = state
            self.abort_deadline = 0.0
            self.signals = 0
            self.drain_logged = False

        def handle_exit(self, sig, frame):  # a signal handler: set flags only
            self.signals += 1
            self.kiln.begin_drain()
            if self.signals > 1:  # a second signal: stop now
                self.kiln.drain_deadline = 0.0
                self.force_exit = sig == signal.SIGINT

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        async def on_tick(self, counter: int) -> bool:
            st = self.kiln
            if st.draining and not self.should_exit:
                now = time.monotonic()
                if not self.drain_logged:
                    self.drain_logged = True
                    log.info("shutting down: new requests get 503; %d request(s) in flight may finish within %g s",
                             st.in_flight, st.options.shutdown_grace)
                if st.in_flight == 0:
                    self.should_exit = True
                elif not st.aborted and now >= st.drain_deadline:
                    n = st.abort()
                    log.info("grace period over (or a second signal): cancelled %d request(s) still running", n)
                    self.abort_deadline = now + 2.0
                elif st.aborted and now >= self.abort_deadline:
                    self.should_exit = True  # what is left (e.g. an unfinished upload) uvicorn cancels
                elif counter % 50 == 0 and not st.aborted:
                    log.info("shutting down: waiting for %d request(s) in flight (at most %.0f s more)",
                             st.in_flight, max(0.0, st.drain_deadline - now))
            return await super().on_tick(counter)

    return _Server


def _is_loopback(address: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on '{host}': {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise KilnError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (choose another --port or --host)") \
            from None
    return sock


def serve(
    model: str | Path,
    model_lib: str | Path | None = None,
    device: str = "auto",
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    allowed_origins: str | list[str] | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_batch_size: int | None = None,
    context_window_size: int | None = None,
    max_total_tokens: int | None = None,
    prefix_cache: bool = True,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    access_log: bool = True,
    quantization: str | None = None,
    overrides: str | None = None,
    opt: str | None = None,
) -> int:
    """Load ``model`` and serve it until SIGINT/SIGTERM; returns 0 after a clean shutdown."""
    import uvicorn

    for name, value, least in (("--max-queue", max_queue, 0), ("--max-body-bytes", max_body_bytes, 1),
                               ("--port", port, 0)):
        if value < least:
            raise UsageError(f"{name} must be at least {least}, got {value}")
    if shutdown_grace < 0:
        raise UsageError(f"--shutdown-grace must not be negative, got {shutdown_grace}")
    if isinstance(allowed_origins, str):
        allowed_origins = [o.strip() for o in allowed_origins.split(",") if o.strip()]
    options = ServerOptions(api_key=api_key or None, allowed_origins=tuple(allowed_origins or ()),
                            max_queue=max_queue, max_body_bytes=max_body_bytes, shutdown_grace=shutdown_grace)

    extra = {"quantization": quantization} if quantization else {}
    if overrides:
        extra["overrides"] = overrides
    if opt:
        extra["opt"] = opt
    engine = _ServingEngine(model, model_lib, device, metrics=Metrics(), max_batch_size=max_batch_size,
                            max_total_tokens=max_total_tokens, context_window_size=context_window_size,
                            prefix_cache=prefix_cache, front_end="serve", **extra)
    try:
        model_dir = Path(engine.model.model_dir)
        names = (str(model), str(model).rstrip("/"), Path(str(model)).name, model_dir.name, str(model_dir))
        state = ServerState(engine, options, names)
        app = create_app(state)
        sock = _bind(host, port)
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        log.info("Model: %s (%s)", state.model_id, model_dir)
        log.info("Model library: %s", engine.model.lib_path)
        log.info("Batch: up to %d sequences, queue up to %d more requests; context window %d tokens",
                 engine.max_batch_size, max_queue, engine.context_window_size)
        if options.api_key:
            log.info("API key required on /v1 (Authorization: Bearer ...)")
        elif not _is_loopback(bound[0]):
            log.warning("listening on %s without --api-key: anyone who can reach this address can use the model",
                        shown)
        if options.allowed_origins:
            log.info("CORS: allowed origins %s", ", ".join(options.allowed_origins))
        log.info("Serving the OpenAI API on http://%s:%d/v1 (health: /health, metrics: /metrics)", shown, bound[1])
        config = uvicorn.Config(app, log_config=None, log_level=logging.getLevelName(min(log.getEffectiveLevel(),
                                                                                          logging.INFO)).lower(),
                                access_log=access_log, timeout_graceful_shutdown=3, lifespan="off",
                                server_header=False)
        server = _uvicorn_server_class()(config, state)
        server.run(sockets=[sock])
        log.info("server stopped")
    finally:
        engine.close()
    return 0
