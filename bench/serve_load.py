"""Load on `kiln serve`: requests/s, aggregate generated tokens/s, and p50/p95 time to first
token (TTFT) and inter-token latency (ITL) seen by 1, 8 and 32 concurrent streaming clients.

Usage:
  python bench/serve_load.py --model MODEL [--model-lib LIB] [--device D]   # starts a server on 127.0.0.1
  python bench/serve_load.py --url http://127.0.0.1:8000 [--api-key KEY]     # uses a running server

Every request streams ``/v1/completions`` (greedy, ``ignore_eos``, so each generates exactly
``--max-tokens`` tokens, counted from the server's usage chunk).  Bounded: ``--requests`` per
level (default: twice the clients, at least 8) and no new request after ``--time-limit``
seconds of a level.  Loopback only: the clients never leave this machine.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlsplit

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly box jumping frogs near "
         "an old stone bridge under pale autumn light").split()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Client:
    def __init__(self, url: str, api_key: str | None):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not is_loopback(parts.hostname):
            raise SystemExit(f"error: --url must be an http:// address on this machine (loopback), got {url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def connect(self, timeout: float = 300) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def get_json(self, path: str):
        conn = self.connect(10)
        try:
            conn.request("GET", path, headers=self.headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET {path}: {resp.status} {body[:200]!r}")
            return json.loads(body)
        finally:
            conn.close()

    def stream(self, body: dict) -> dict:
        """One streamed completion: time to first token, gaps between tokens, tokens generated."""
        conn = self.connect()
        try:
            start = time.perf_counter()
            conn.request("POST", "/v1/completions", body=json.dumps(body), headers=self.headers)
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"POST /v1/completions: {resp.status} {resp.read()[:300]!r}")
            first = last = None
            gaps: list[float] = []
            tokens = 0
            for line in resp:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"stream error: {event['error']['message']}")
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if event.get("choices") and event["choices"][0].get("text"):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
            end = time.perf_counter()
            return {"ttft": (first or end) - start, "gaps": gaps, "tokens": tokens, "end": end}
        finally:
            conn.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    pos = (len(values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def run_level(client: Client, clients: int, requests: int, time_limit: float, make_body) -> dict:
    lock = threading.Lock()
    issued = 0
    results: list[dict] = []
    errors: list[str] = []
    start = time.perf_counter()
    deadline = start + time_limit

    def worker():
        nonlocal issued
        while True:
            with lock:
                if issued >= requests or time.perf_counter() > deadline or errors:
                    return
                index = issued
                issued += 1
            try:
                result = client.stream(make_body(index))
            except Exception as exc:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(exc))
                return
            with lock:
                results.append(result)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"error: {len(errors)} request(s) failed at {clients} clients; first: {errors[0]}")
    wall = max(r["end"] for r in results) - start
    gaps = [g for r in results for g in r["gaps"]]
    ttfts = [r["ttft"] for r in results]
    return {"clients": clients, "requests": len(results), "wall": wall, "req_s": len(results) / wall,
            "tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft50": percentile(ttfts, 0.5), "ttft95": percentile(ttfts, 0.95),
            "itl50": percentile(gaps, 0.5), "itl95": percentile(gaps, 0.95)}


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, str, object]:
    log = tempfile.NamedTemporaryFile(prefix="kiln-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "kiln.serve", args.model, "--host", "127.0.0.1", "--port", "0", "--no-access-log",
           "--max-batch-size", str(max_batch), "--device", args.device]
    if args.model_lib:
        cmd += ["--model-lib", args.model_lib]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with {proc.returncode}:\n{open(log.name).read()}")
        m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", open(log.name, errors="replace").read())
        if m:
            url = f"http://127.0.0.1:{m.group(1)}"
            try:
                Client(url, None).get_json("/health")
                return proc, url, log
            except (OSError, RuntimeError):
                pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"error: the server did not start within {args.start_timeout} s (log: {log.name})")


def main(argv=None):
    # the whole docstring: its first line alone stopped mid-sentence
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="Start `kiln serve MODEL` on 127.0.0.1 (anything `kiln serve` accepts).")
    where.add_argument("--url", help="Use a server already running on this machine, e.g. http://127.0.0.1:8000.")
    ap.add_argument("--model-lib", default=None, help="Compiled model library (with --model).")
    ap.add_argument("--device", default="auto", help="Device the started server runs on (with --model).")
    ap.add_argument("--api-key", default=os.environ.get("KILN_API_KEY"), help="API key of the server "
                    "(default: $KILN_API_KEY).")
    ap.add_argument("--concurrency", default="1,8,32", help="Client counts, comma-separated.")
    ap.add_argument("--requests", type=int, default=None, help="Requests per level (default: 2 x clients, >= 8).")
    ap.add_argument("--max-tokens", type=int, default=64, help="Tokens each request generates.")
    ap.add_argument("--prompt-words", type=int, default=32, help="Words in each prompt.")
    ap.add_argument("--time-limit", type=float, default=120.0, help="Seconds per level before no new requests.")
    ap.add_argument("--start-timeout", type=float, default=900.0, help="Seconds to wait for a started server.")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1:
        raise SystemExit("error: --concurrency needs positive integers")

    proc = log = None
    url = args.url
    if args.model:
        proc, url, log = start_server(args, max(levels))
    try:
        client = Client(url, args.api_key)
        model = client.get_json("/v1/models")["data"][0]

        def make_body(i: int) -> dict:
            words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(args.prompt_words)]
            return {"model": model["id"], "prompt": f"request {i}: " + " ".join(words), "max_tokens": args.max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

        client.stream(make_body(-1))  # warm-up
        print(f"server: {url}  model: {model['id']}  ({'started here' if proc else 'already running'})")
        print(f"each request: a {args.prompt_words}-word prompt, {args.max_tokens} generated tokens (greedy, streamed)")
        print(f"{'clients':>7} {'requests':>8} {'req/s':>8} {'gen tok/s':>10} {'TTFT p50':>9} {'TTFT p95':>9} "
              f"{'ITL p50':>8} {'ITL p95':>8}")
        for clients in levels:
            n = args.requests or max(2 * clients, 8)
            r = run_level(client, clients, n, args.time_limit, make_body)
            print(f"{r['clients']:>7} {r['requests']:>8} {r['req_s']:>8.2f} {r['tok_s']:>10.1f} "
                  f"{r['ttft50'] * 1e3:>7.1f}ms {r['ttft95'] * 1e3:>7.1f}ms {r['itl50'] * 1e3:>6.2f}ms "
                  f"{r['itl95'] * 1e3:>6.2f}ms", flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            os.unlink(log.name)


if __name__ == "__main__":
    main()
