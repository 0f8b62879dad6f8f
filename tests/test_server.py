"""`kiln serve` (python -m kiln.serve) as a subprocess on 127.0.0.1, driven by the official
`openai` client and by raw HTTP.

Two models: the small random Llama of test_engine (context 256) for answers, errors and
concurrency; a bigger one ("slow", about 4 ms a token, context 2048) wherever a request must
still be running when the test acts on it (disconnects, a full queue, shutdown), so that no
test depends on timing: its long requests take seconds, the actions milliseconds.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest

from kiln.testing import BYTE_SPECIALS, make_hf_checkpoint, write_byte_tokenizer

from test_engine import CONFIG

EOS = 256 + BYTE_SPECIALS.index("</s>")
SLOW_CONFIG = {**CONFIG, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
               "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 2048}
API_KEY = "sk-kiln-test-4f1c9e"


# ------------------------------------------------------------------------------------- helpers
def wait_until(predicate, what: str, timeout: float = 120.0):
    """Poll ``predicate`` until it returns something truthy (a wait, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


class Server:
    """``python -m kiln.serve`` on a free port of 127.0.0.1, ready once /health answers."""

    def __init__(self, built, log_dir: Path, *args: str, env: dict | None = None):
        self.log_path = log_dir / f"server-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "kiln.serve", str(built.model_dir), "--model-lib", str(built.lib),
               "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "KILN_NO_PROGRESS": "1", **(env or {})})
        self.port = wait_until(self._ready, "the server to start", timeout=300)
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
        m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", self.log())
        if not m:
            return None
        try:
            conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=5)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
        except OSError:
            return None
        return int(m.group(1)) if ok else None

    def client(self, api_key: str = "unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=300, **kw)

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None,
                chunked: bool = False) -> Response:
        conn = self.connect()
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if chunked:
            conn.request(method, path, body=iter([data[i:i + 1000] for i in range(0, len(data), 1000)]),
                         headers=hdrs, encode_chunked=True)
        else:
            conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        out = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        conn.close()
        return out

    def post(self, path: str, body, **kw) -> Response:
        return self.request("POST", path, body, **kw)

    def metrics(self) -> dict[str, float]:
        text = self.request("GET", "/metrics").body.decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def idle(self) -> dict[str, float] | None:
        m = self.metrics()
        busy = (m["kiln_requests_waiting"], m["kiln_sequences_running"], m["kiln_server_generation_requests_in_flight"])
        return m if busy == (0, 0, 0) else None

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the server did not stop:\n{self.log()}") from None
        finally:
            self._log.close()


class Stream:
    """A raw SSE request: ``events()`` yields each ``data:`` payload (parsed; ``"[DONE]"`` as is)."""

    def __init__(self, server: Server, path: str, body: dict, headers: dict | None = None):
        self.conn = server.connect()
        self.conn.request("POST", path, body=json.dumps(body).encode(),
                          headers={"Content-Type": "application/json", **(headers or {})})
        self.resp = None

    def open(self) -> "Stream":
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.read()
        assert self.resp.getheader("content-type").startswith("text/event-stream")
        return self

    def events(self):
        if self.resp is None:
            self.open()
        for line in self.resp:
            line = line.decode().rstrip("\r\n")
            if line.startswith("data: "):
                data = line[len("data: "):]
                yield data if data == "[DONE]" else json.loads(data)

    def close(self):
        if self.resp is not None:
            self.resp.close()
        self.conn.close()


def stalled_upload(server: Server, path: str = "/v1/completions") -> tuple[socket.socket, bytes]:
    """A request whose body has not all arrived yet: in flight for as long as the test wants.
    Returns the socket and the rest of the body."""
    body = json.dumps({"prompt": "hello", "max_tokens": 2, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=300)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:5])
    return sock, body[5:]


def read_http_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    status = int(head.split()[1])
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    while len(rest) < length:
        rest += sock.recv(65536)
    return status, rest


def tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def assert_error(resp: Response, status: int, param=None, code=None, contains: str = ""):
    assert resp.status == status, (resp.status, resp.body)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert err["type"] == {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                           405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                           503: "server_error"}[status]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    assert contains in err["message"], err
    return err


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def built(tmp_path_factory, kiln_build):
    ckpt = make_hf_checkpoint(tmp_path_factory.mktemp("server") / "ckpt", CONFIG, init_std=0.1)
    write_byte_tokenizer(ckpt)
    return kiln_build(ckpt, "q0f32", conv_template="chatml", context_window_size=256, prefill_chunk_size=32,
                      max_batch_size=8)


@pytest.fixture(scope="module")
def slow_built(tmp_path_factory, kiln_build):
    ckpt = make_hf_checkpoint(tmp_path_factory.mktemp("server-slow") / "ckpt", SLOW_CONFIG, init_std=0.1)
    write_byte_tokenizer(ckpt)
    return kiln_build(ckpt, "q0f32", conv_template="chatml", context_window_size=2048, prefill_chunk_size=64,
                      max_batch_size=4)


@pytest.fixture(scope="module")
def server(built, tmp_path_factory):
    srv = Server(built, tmp_path_factory.mktemp("server-logs"))
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def guarded(slow_built, tmp_path_factory):
    """Auth, CORS, a small body limit, one sequence at a time plus one queued, no prefix cache
    (so an idle server holds no KV pages at all)."""
    srv = Server(slow_built, tmp_path_factory.mktemp("guarded-logs"), "--api-key", API_KEY, "--allowed-origins",
                 "http://example.com", "--max-body-bytes", "4096", "--max-batch-size", "1", "--max-queue", "1",
                 "--no-prefix-cache")
    yield srv
    assert srv.stop() == 0


AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def model_id(server):
    return server.client().models.list().data[0].id


# ------------------------------------------------------------------------------------- answers
def test_start_up_log_names_device_model_library_memory_and_address(server, built):
    log = server.log()
    assert re.search(r"^Device: cpu:0 \(", log, re.M), log
    assert re.search(r"^Total memory usage: [\d.]+ MB \(Parameters: [\d.]+ MB\. KVCache: [\d.]+ MB\. "
                     r"Temporary buffer: [\d.]+ MB\)$", log, re.M), log
    assert f"Model: {built.model_dir.name} ({built.model_dir})" in log
    assert f"Model library: {built.lib}" in log
    assert f"Serving the OpenAI API on http://127.0.0.1:{server.port}/v1" in log
    # the hint names options `kiln serve` has
    hint = re.search(r"To reduce memory, lower (.*)\.$", log, re.M).group(1)
    assert hint == "--max-total-tokens, --max-batch-size or --context-window-size"
    help_ = subprocess.run([sys.executable, "-m", "kiln.cli", "serve", "--help"], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "COLUMNS": "250"}).stdout  # no names cut short
    assert all(re.search(rf"{option}\b", help_) for option in re.findall(r"--[a-z-]+", hint))


def test_models_list_and_model_names(server, built, model_id):
    client = server.client()
    models = client.models.list().data
    assert [m.id for m in models] == [built.model_dir.name] and model_id == built.model_dir.name
    assert models[0].owned_by == "kiln" and models[0].object == "model"
    assert client.models.retrieve(model_id).id == model_id
    # the reference the server was started with works as the model name too
    for name in (model_id, str(built.model_dir)):
        out = client.completions.create(model=name, prompt="hi", max_tokens=2, temperature=0)
        assert out.model == model_id
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"


def test_chat_streamed_deltas_join_to_the_answer(server, model_id):
    client = server.client()
    kw = dict(model=model_id, messages=[{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": "What is the meaning of life?"}],
              temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = full.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # the raw stream: data lines and a final [DONE]
    events = list(Stream(server, "/v1/chat/completions", {**kw, "stream": True}).events())
    assert events[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_completions_max_tokens_finish_reason_and_usage(server, model_id):
    client = server.client()
    out = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 7 and out.usage.prompt_tokens == len("Once upon a time")
    assert out.usage.total_tokens == 7 + len("Once upon a time")
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 5
    # EOS forced by logit_bias: finish_reason "stop" after one token
    eos = client.completions.create(model=model_id, prompt="hi", max_tokens=10, temperature=0,
                                    logit_bias={str(EOS): 100})
    assert eos.choices[0].finish_reason == "stop" and eos.choices[0].text == "" and eos.usage.completion_tokens == 1


def test_token_id_prompts_equal_text_prompts(server, model_id):
    client = server.client()
    text = client.completions.create(model=model_id, prompt="hello world", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    ids = client.completions.create(model=model_id, prompt=list(b"hello world"), max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert ids.choices[0].text == text.choices[0].text and ids.usage.prompt_tokens == 11
    streamed = client.completions.create(model=model_id, prompt=list(b"hello world"), max_tokens=12, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text.choices[0].text
    # echo returns the prompt in front of the answer
    echo = server.post("/v1/completions", {"prompt": [104, 105], "max_tokens": 3, "temperature": 0, "echo": True,
                                           "ignore_eos": True}).json()
    assert echo["choices"][0]["text"].startswith("hi")


def test_stop_strings(server, model_id):
    client = server.client()
    prompt = tokens(12, seed=3)
    text = client.completions.create(model=model_id, prompt=prompt, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(text) > 8
    stop = text[5:8]
    for value in (stop, [stop, "\x00never"]):
        out = client.completions.create(model=model_id, prompt=prompt, max_tokens=24, temperature=0, stop=value,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == text[: text.index(stop)] and out.choices[0].finish_reason == "stop"
        streamed = client.completions.create(model=model_id, prompt=prompt, max_tokens=24, temperature=0, stop=value,
                                             stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text


def test_every_sampling_field_is_accepted(server, model_id):
    client = server.client()
    messages = [{"role": "user", "content": "hi"}]
    out = client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=6, temperature=0.9, top_p=0.9, n=2, seed=11,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"65": 5}, logprobs=True, top_logprobs=3,
        user="tester", stop=["\x00"],
        extra_body={"top_k": 20, "repetition_penalty": 1.1, "stop_token_ids": [EOS], "ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1]
    assert sum(len(c.logprobs.content) for c in out.choices) == out.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for c in out.choices for t in c.logprobs.content)
    # seeded sampling is reproducible (top_p=1: no float-noise-sensitive cut, see test_engine)
    kw = dict(model=model_id, messages=messages, max_tokens=12, temperature=1.0, top_p=1.0, n=2, seed=5,
              extra_body={"ignore_eos": True})
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    out = client.completions.create(model=model_id, prompt="hi", max_tokens=3, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    assert len(out.choices[0].logprobs.top_logprobs) == 3 and len(out.choices[0].logprobs.top_logprobs[0]) == 2


def test_unknown_openai_fields_are_ignored_with_a_warning(server, model_id):
    resp = server.post("/v1/chat/completions", {
        "model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "response_format": {"type": "text"}, "service_tier": "auto", "metadata": {"a": "b"}, "kiln_made_up": 1})
    assert resp.status == 200 and resp.json()["choices"][0]["message"]["role"] == "assistant"
    wait_until(lambda: "ignoring unsupported request field(s): metadata, response_format, service_tier, kiln_made_up"
               in server.log(), "the warning in the log", timeout=30)


# ------------------------------------------------------------------------------------- bad input
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "hi", "max_tokens": 2}
BAD_REQUESTS = [
    # (path, body or raw bytes, status, param, code, words in the message)
    ("chat", b'{"messages": [', 400, None, "invalid_json", "not valid JSON"),
    ("chat", b"", 400, None, "invalid_json", "empty"),
    ("chat", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None, "invalid_json",
     "NaN"),
    ("chat", b"[1, 2]", 400, None, "invalid_type", "JSON object"),
    ("chat", b'{"messages": "\xff"}', 400, None, "invalid_json", "utf-8"),
    ("chat", {"max_tokens": 2}, 400, "messages", "missing_required_parameter", "'messages' is required"),
    ("completion", {"max_tokens": 2}, 400, "prompt", "missing_required_parameter", "'prompt' is required"),
    ("chat", {**CHAT, "messages": "hi"}, 400, "messages", None, "messages must be a list"),
    ("chat", {**CHAT, "messages": []}, 400, "messages", None, "empty"),
    ("chat", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", None, "'wizard'"),
    ("chat", {**CHAT, "messages": [{"role": "user"}]}, 400, "messages[0].content", "missing_required_parameter",
     "'messages[0].content' is required"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}, 400,
     "messages[1].content", "missing_required_parameter", "'messages[1].content' is required"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_type",
     "'messages[0].content' must be a string or an array of text parts, got integer"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]", None, "text"),
    ("chat", {**CHAT, "temperature": "hot"}, 400, "temperature", "invalid_type", "must be a number"),
    ("chat", {**CHAT, "max_tokens": "10"}, 400, "max_tokens", "invalid_type", "must be an integer"),
    ("chat", {**CHAT, "max_tokens": 2.5}, 400, "max_tokens", "invalid_type", "must be an integer"),
    ("chat", {**CHAT, "n": True}, 400, "n", "invalid_type", "must be an integer"),
    ("chat", {**CHAT, "stream": "yes"}, 400, "stream", "invalid_type", "boolean"),
    ("chat", {**CHAT, "stop": 5}, 400, "stop", "invalid_type", "string"),
    ("chat", {**CHAT, "stop": ["a", 1]}, 400, "stop", "invalid_type", "string"),
    ("chat", {**CHAT, "logit_bias": {"abc": 1}}, 400, "logit_bias", "invalid_value", "token ids"),
    ("chat", {**CHAT, "logit_bias": [1]}, 400, "logit_bias", "invalid_type", ""),
    ("chat", {**CHAT, "stream_options": {"include_usage": "yes"}}, 400, "stream_options.include_usage",
     "invalid_type", ""),
    ("chat", {**CHAT, "model": 7}, 400, "model", "invalid_type", "string"),
    ("chat", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}', 400, "temperature",
     "invalid_value", "finite"),
    ("chat", {**CHAT, "max_tokens": -5}, 400, "max_tokens", "invalid_value", "-5"),
    ("chat", {**CHAT, "max_tokens": 0}, 400, "max_tokens", "invalid_value", ""),
    ("chat", {**CHAT, "max_completion_tokens": -1}, 400, "max_completion_tokens", "invalid_value", "-1"),
    ("chat", {**CHAT, "temperature": -0.5}, 400, "temperature", "invalid_value", "-0.5"),
    ("chat", {**CHAT, "top_p": 0}, 400, "top_p", "invalid_value", ""),
    ("chat", {**CHAT, "n": 0}, 400, "n", "invalid_value", ""),
    ("chat", {**CHAT, "n": 1000}, 400, "n", "invalid_value", ""),
    ("chat", {**CHAT, "presence_penalty": 9}, 400, "presence_penalty", "invalid_value", ""),
    ("chat", {**CHAT, "logit_bias": {"99999": 1}}, 400, "logit_bias", "invalid_value", "vocabulary"),
    ("chat", {**CHAT, "top_logprobs": 3}, 400, "top_logprobs", None, "logprobs"),
    ("completion", {**COMPLETION, "prompt": []}, 400, "prompt", "invalid_value", "empty"),
    ("completion", {**COMPLETION, "prompt": [1, "a"]}, 400, "prompt", "invalid_type", ""),
    ("completion", {**COMPLETION, "prompt": ["a", "b"]}, 400, "prompt", "invalid_value", "one prompt"),
    ("completion", {**COMPLETION, "prompt": [99999]}, 400, "prompt", "invalid_value", "vocabulary"),
    ("completion", {**COMPLETION, "logprobs": 9}, 400, "logprobs", None, ""),
    ("completion", {**COMPLETION, "prompt": "x" * 300}, 400, "prompt", "context_length_exceeded",
     "the prompt has 300 tokens, more than the model's context window of 256"),
    ("completion", {**COMPLETION, "prompt": "x" * 300, "stream": True}, 400, "prompt", "context_length_exceeded",
     "300 tokens"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": "x" * 300}], "stream": True}, 400, "messages",
     "context_length_exceeded", "context window of 256"),
    ("chat", {**CHAT, "model": "gpt-4o"}, 404, "model", "model_not_found", "'gpt-4o'"),
    ("completion", {**COMPLETION, "model": "gpt-4o", "stream": True}, 404, "model", "model_not_found", ""),
]


@pytest.mark.parametrize("path,body,status,param,code,words", BAD_REQUESTS,
                         ids=[f"{i}-{c[3] or c[4]}" for i, c in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, path, body, status, param, code, words):
    path = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}[path]
    resp = server.post(path, None, raw=body) if isinstance(body, bytes) else server.post(path, body)
    err = assert_error(resp, status, param, code, words)
    assert "NoneType" not in err["message"]  # JSON's names for types, not Python's
    ok = server.post("/v1/chat/completions", CHAT)
    assert ok.status == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_client_sees_the_errors(server, model_id):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "x" * 400}])
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    assert "context window of 256" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], temperature=-1,
                                       stream=True)
    assert info.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hi")
    assert info.value.param == "model"


def test_unknown_routes_and_methods(server):
    assert_error(server.request("GET", "/v1/nothing"), 404, code="not_found")
    assert_error(server.request("GET", "/v1/chat/completions"), 405, code="method_not_allowed")


def test_auth_off_accepts_any_or_no_key(server):
    assert server.post("/v1/completions", COMPLETION, headers={"Authorization": "Bearer whatever"}).status == 200
    assert server.request("GET", "/v1/models").status == 200
    assert "access-control-allow-origin" not in server.request("GET", "/v1/models",
                                                               headers={"Origin": "http://x.org"}).headers


# ------------------------------------------------------------------------------------- concurrency
def test_sixteen_concurrent_streams_each_equal_their_own_answer(server, model_id):
    client = server.client()
    prompts = [[{"role": "user", "content": f"question {i}: " + "why " * (i % 5)}] for i in range(16)]
    kw = dict(model=model_id, temperature=0, max_tokens=16, extra_body={"ignore_eos": True})
    alone = [client.chat.completions.create(messages=p, **kw).choices[0].message.content for p in prompts]
    results: list = [None] * 16
    errors: list = []
    barrier = threading.Barrier(16)

    def run(i):
        try:
            own = server.client()
            barrier.wait()
            stream = own.chat.completions.create(messages=prompts[i], stream=True, **kw)
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    before = server.metrics()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == alone
    m = server.metrics()
    assert m['kiln_http_requests_total{endpoint="/v1/chat/completions",method="POST",status="200"}'] >= 32
    # they were batched: their decoded tokens took fewer decode steps than there are tokens
    steps = m["kiln_decode_steps_total"] - before["kiln_decode_steps_total"]
    decoded = m["kiln_decode_tokens_total"] - before["kiln_decode_tokens_total"]
    assert 0 < steps < decoded


def test_async_engine_streams_concurrent_requests_in_one_batch(built):
    """kiln.AsyncEngine without the server: two streamed requests awaited together share decode
    steps and each streams what it answers alone (token ids); closing a stream cancels it."""
    import asyncio

    from kiln import AsyncEngine
    from test_engine import token_ids

    prompts = [tokens(10, seed=61), tokens(37, seed=62)]
    kw = dict(max_tokens=20, temperature=0, ignore_eos=True, logprobs=0)

    async def streamed(engine, p):
        ids, text, finish, usage = [], "", None, None
        table = {engine.token_text(i): i for i in range(engine.model.vocab_size)}
        async for chunk in await engine.completions.create(prompt=p, stream=True,
                                                           stream_options={"include_usage": True}, **kw):
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
                ids += [table[t] for t in (choice.logprobs.tokens if choice.logprobs else [])]
        return ids, text, finish, usage

    async def main(engine):
        alone = [await engine.completions.create(prompt=p, **kw) for p in prompts]
        # hold the scheduler until both requests are queued, so they start in one step
        entered, gate = threading.Event(), threading.Event()
        engine._inbox.put(("call", lambda: (entered.set(), gate.wait(300))))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 60)
        steps, decoded = engine.stats.decode_steps, engine.stats.decode_tokens
        both = asyncio.gather(*(streamed(engine, p) for p in prompts))
        while engine._inbox.qsize() < 2:
            await asyncio.sleep(0.005)
        gate.set()
        results = await both
        for out, (ids, text, finish, usage) in zip(alone, results):
            assert ids == token_ids(engine, out) and text == out.choices[0].text
            assert finish == "length" and usage.completion_tokens == 20
        assert engine.stats.decode_tokens - decoded == 2 * 19
        # they decoded together (the longer prompt's second prefill chunk costs the other one step)
        assert engine.stats.decode_steps - steps <= 20
        # a streamed chat, closed after its first token: the request is cancelled, its KV freed
        chunks = await engine.chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=500,
                                                      ignore_eos=True, stream=True)
        first = [c async for c, _ in zip_first(chunks, 2)]
        assert first[0].choices[0].delta.role == "assistant"
        await chunks.aclose()
        assert await asyncio.get_running_loop().run_in_executor(None, engine.wait_idle, 60)
        # cancelled at once: a few decode steps at most, not the hundreds the request asked for
        assert engine.kv_pages_in_use() == 0 and engine.stats.decode_tokens - decoded - 2 * 19 < 20

    engine = AsyncEngine(built.model_dir, built.lib, prefix_cache=False)
    try:
        asyncio.run(main(engine))
    finally:
        engine.close()


async def zip_first(chunks, n):
    """The first ``n`` items of an async iterator, with their index (the iterator stays open)."""
    i = 0
    async for chunk in chunks:
        yield chunk, i
        i += 1
        if i == n:
            return


def test_a_full_kv_cache_under_load_is_no_error(server, model_id):
    """Sixteen requests near the context window, arriving together while cached prefixes hold
    half of the KV cache: admission must count the pages it promised to requests still
    prefilling (it did not, and the scheduler died with 'The KV cache is full')."""
    client = server.client()
    kw = dict(model=model_id, max_tokens=56, temperature=0, extra_body={"ignore_eos": True})
    prompts = [tokens(190 + i % 7, seed=500 + i) for i in range(16)]
    alone = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    results: list = [None] * 16
    errors: list = []
    barrier = threading.Barrier(16)

    def run(i):
        try:
            own = server.client()
            barrier.wait()
            stream = own.completions.create(prompt=prompts[i], stream=True, **kw)
            results[i] = "".join(c.choices[0].text for c in stream if c.choices)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == alone
    assert server.request("GET", "/health").json() == {"status": "ok"}


def test_metrics_in_prometheus_format(server):
    text = server.request("GET", "/metrics").body.decode()
    m = server.metrics()
    for name in ("kiln_time_to_first_token_seconds", "kiln_inter_token_latency_seconds",
                 "kiln_request_duration_seconds"):
        assert f"# TYPE {name} histogram" in text
        assert m[f"{name}_count"] > 0 and m[f'{name}_bucket{{le="+Inf"}}'] == m[f"{name}_count"]
    for name in ("kiln_prompt_tokens_total", "kiln_generation_tokens_total", "kiln_decode_steps_total",
                 "kiln_decode_tokens_total", "kiln_prefill_tokens_total"):
        assert f"# TYPE {name} counter" in text and m[name] > 0
    assert m["kiln_decode_tokens_total"] > m["kiln_decode_steps_total"]
    assert "# TYPE kiln_preemptions_total counter" in text
    assert m["kiln_kv_cache_pages_total"] > 0 and 0 <= m["kiln_kv_cache_pages_in_use"] <= m["kiln_kv_cache_pages_total"]
    for gauge in ("kiln_requests_waiting", "kiln_sequences_running", "kiln_server_draining"):
        assert f"# TYPE {gauge} gauge" in text
    assert m['kiln_http_requests_total{endpoint="/v1/chat/completions",method="POST",status="400"}'] > 0
    assert m['kiln_requests_total{outcome="completed"}'] > 0


# ------------------------------------------------------------------------------------- the guarded server
def test_auth(guarded):
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
    assert_error(guarded.post("/v1/completions", body), 401, code="invalid_api_key")
    assert_error(guarded.post("/v1/completions", body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(guarded.post("/v1/completions", body, headers={"Authorization": API_KEY}), 401)
    assert_error(guarded.request("GET", "/v1/models"), 401)
    assert guarded.post("/v1/completions", body, headers=AUTH).status == 200
    assert guarded.request("GET", "/health").status == 200  # probes and scrapes need no key
    assert guarded.request("GET", "/metrics").status == 200
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong").models.list()
    assert guarded.client(API_KEY).models.list().data
    assert API_KEY not in guarded.log()


def test_cors(guarded):
    pre = guarded.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status == 200 and pre.headers["access-control-allow-origin"] == "http://example.com"
    get = guarded.request("GET", "/v1/models", headers={**AUTH, "Origin": "http://example.com"})
    assert get.status == 200 and get.headers["access-control-allow-origin"] == "http://example.com"
    other = guarded.request("GET", "/v1/models", headers={**AUTH, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    # errors carry CORS headers too, so a browser can read them
    denied = guarded.request("GET", "/v1/models", headers={"Origin": "http://example.com"})
    assert denied.status == 401 and denied.headers["access-control-allow-origin"] == "http://example.com"


def test_body_size_limit(guarded):
    big = {"prompt": "x" * 5000, "max_tokens": 1}
    assert_error(guarded.post("/v1/completions", big, headers=AUTH), 413, code="request_too_large",
                 contains="4096")
    # without a Content-Length (chunked upload) the limit holds while reading
    assert_error(guarded.post("/v1/completions", big, headers=AUTH, chunked=True), 413, code="request_too_large")
    assert guarded.post("/v1/completions", {"prompt": "hi", "max_tokens": 1}, headers=AUTH).status == 200


def test_client_disconnect_cancels_and_frees_kv_pages(guarded):
    before = wait_until(guarded.idle, "an idle server")
    assert before["kiln_kv_cache_pages_in_use"] == 0
    for i in range(3):
        stream = Stream(guarded, "/v1/completions", {"prompt": tokens(40, seed=i), "max_tokens": 2000,
                                                     "temperature": 0, "ignore_eos": True, "stream": True}, AUTH)
        events = stream.events()
        next(events), next(events)  # it is generating
        stream.close()  # ... and the client goes away
    middle = wait_until(guarded.idle, "the cancelled requests to go")
    assert middle["kiln_kv_cache_pages_in_use"] == 0
    cancelled = 'kiln_requests_total{outcome="cancelled"}'
    assert middle[cancelled] - before[cancelled] == 3
    assert middle["kiln_generation_tokens_total"] - before["kiln_generation_tokens_total"] < 3 * 2000
    # a non-streamed request whose client leaves before the answer
    conn = guarded.connect()
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2000, "ignore_eos": True}),
                 {**AUTH, "Content-Type": "application/json"})
    wait_until(lambda: guarded.metrics()["kiln_sequences_running"] == 1, "the request to run")
    conn.close()
    after = wait_until(guarded.idle, "the cancelled request to go")
    assert after["kiln_kv_cache_pages_in_use"] == 0 and after[cancelled] - middle[cancelled] == 1
    assert guarded.post("/v1/completions", {"prompt": "hi", "max_tokens": 2}, headers=AUTH).status == 200


def test_full_queue_gets_429(guarded, slow_built):
    wait_until(guarded.idle, "an idle server")
    body = {"prompt": "hi", "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True}
    running = Stream(guarded, "/v1/completions", body, AUTH)
    next(running.events())
    queued = Stream(guarded, "/v1/completions", body, AUTH)  # waits behind it (batch size 1)
    wait_until(lambda: guarded.metrics()["kiln_server_generation_requests_in_flight"] == 2, "the second request")
    err = assert_error(guarded.post("/v1/completions", {"prompt": "hi", "max_tokens": 2}, headers=AUTH), 429,
                       code="queue_full")
    assert "--max-queue" in err["message"]
    with pytest.raises(openai.RateLimitError):
        guarded.client(API_KEY).chat.completions.create(model=slow_built.model_dir.name,
                                                        messages=[{"role": "user", "content": "hi"}])
    wait_until(lambda: guarded.metrics()["kiln_requests_waiting"] == 1, "the second request in the engine's queue")
    running.close()
    queued.close()
    wait_until(guarded.idle, "the server to drain its queue")
    assert guarded.post("/v1/completions", {"prompt": "hi", "max_tokens": 2}, headers=AUTH).status == 200


# ------------------------------------------------------------------------------------- shutdown
def test_sigterm_finishes_requests_in_flight_refuses_new_ones_and_exits_0(slow_built, tmp_path):
    srv = Server(slow_built, tmp_path, "--shutdown-grace", "120")
    try:
        upload, rest = stalled_upload(srv)  # holds the shutdown open until the test sends the rest
        stream = Stream(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 60, "temperature": 0,
                                                 "ignore_eos": True, "stream": True,
                                                 "stream_options": {"include_usage": True}})
        events = stream.events()
        next(events)
        wait_until(lambda: srv.metrics()["kiln_server_requests_in_flight"] == 2, "both requests in flight")
        srv.proc.send_signal(signal.SIGTERM)
        refused = wait_until(lambda: (r := srv.request("GET", "/v1/models")).status == 503 and r, "a 503")
        assert_error(refused, 503, code="server_shutting_down")
        assert_error(srv.post("/v1/completions", {"prompt": "hi"}), 503)
        assert srv.request("GET", "/health").status == 503
        assert srv.metrics()["kiln_server_draining"] == 1
        rest_events = list(events)  # the stream in flight runs to its end
        assert rest_events[-1] == "[DONE]"
        assert rest_events[-3]["choices"][0]["finish_reason"] == "length"
        assert rest_events[-2]["usage"]["completion_tokens"] == 60
        upload.sendall(rest)  # the request admitted before the signal is still answered
        status, body = read_http_response(upload)
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2
        upload.close()
        assert srv.proc.wait(timeout=120) == 0
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()


def test_sigint_cancels_what_outlives_the_grace_period_and_exits_0(slow_built, tmp_path):
    srv = Server(slow_built, tmp_path, "--shutdown-grace", "0.5")
    try:
        stream = Stream(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2000, "temperature": 0,
                                                 "ignore_eos": True, "stream": True})
        events = stream.events()
        next(events)
        srv.proc.send_signal(signal.SIGINT)
        rest = list(events)
        assert rest[-1] == "[DONE]"
        assert rest[-2]["error"]["code"] == "server_shutting_down"  # cut short, and told why
        assert srv.proc.wait(timeout=120) == 0
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()


def test_load_benchmark_help_describes_it_in_full():
    script = Path(__file__).resolve().parent.parent / "bench" / "serve_load.py"
    res = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert ("Load on `kiln serve`: requests/s, aggregate generated tokens/s, and p50/p95 time to first token (TTFT) "
            "and inter-token latency (ITL) seen by 1, 8 and 32 concurrent streaming clients.") in text
    assert "Loopback only" in text and "--api-key" in text


def test_kiln_serve_command_line_errors(built, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "kiln.cli", "serve", *map(str, args)], capture_output=True,
                              text=True, env={**os.environ, "KILN_NO_PROGRESS": "1"}, timeout=300)

    res = run(tmp_path / "nowhere")
    assert res.returncode != 0 and res.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in res.stderr
    res = run(built.model_dir, "--model-lib", built.lib, "--max-queue", "-1")
    assert res.returncode == 2 and "error: --max-queue must be at least 0" in res.stderr
    # a port already taken is one line, not a traceback
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        res = run(built.model_dir, "--model-lib", built.lib, "--port", taken.getsockname()[1])
    assert res.returncode == 1 and "error: cannot listen on 127.0.0.1:" in res.stderr and "Traceback" not in res.stderr
    help_ = subprocess.run([sys.executable, "-m", "kiln.serve", "--help"], capture_output=True, text=True, timeout=300)
    assert help_.returncode == 0 and "--max-queue" in help_.stdout and "--api-key" in help_.stdout
