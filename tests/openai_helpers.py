"""Servers for the `openai` teacher's tests: a fault server of our own, and llama.cpp's real server.

The fault server answers OpenAI-style chat requests with the sum of the numbers in the last user turn and
the request's seed (`"7 #1234"`), so a test can tell every sample apart, and misbehaves on a schedule:
429 with Retry-After, 500, a hang past the client's timeout, a dropped connection, malformed JSON. Every
request it sees is logged with its arrival time.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from distill.models import llama_threads

ACTIONS = ("ok", "429", "500", "hang", "drop", "malformed")


@dataclass
class Hit:
    at: float  # time.monotonic() on arrival
    prompt: str
    seed: int
    attempt: int  # earlier requests for the same (prompt, seed)
    action: str


@dataclass
class FaultServer:
    """`schedule(prompt, seed, attempt) -> action` decides each answer (see ACTIONS)."""

    schedule: Callable[[str, int, int], str] = lambda prompt, seed, attempt: "ok"
    model: str = "fault"
    api_key: str | None = None
    hang_s: float = 3.0
    retry_after_s: int = 1
    # How top-k logprobs name tokens, when asked for: "id" (llama.cpp's C++ server: an `id` field), "token_id"
    # (vLLM's `token_id:N` texts), "text" (plain texts, as OpenAI), None (sends none). Each character of
    # the answer is one token whose id is its code point.
    logprobs: str | None = "id"
    reasoning: str | None = None  # sent as `reasoning_content`, as DeepSeek does
    hits: list[Hit] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._attempts: dict[tuple[str, int], int] = {}
        handler = type("Handler", (_Handler,), {"fault": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True  # a hung handler must not keep the test process alive
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def record(self, prompt: str, seed: int) -> Hit:
        with self._lock:
            attempt = self._attempts.get((prompt, seed), 0)
            self._attempts[(prompt, seed)] = attempt + 1
            hit = Hit(time.monotonic(), prompt, seed, attempt, self.schedule(prompt, seed, attempt))
            self.hits.append(hit)
        return hit

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    fault: FaultServer
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do: a dropped connection is then a surprise

    def do_GET(self):  # noqa: N802 - http.server's naming
        if not self._authorized():
            return
        self._send(200, {"object": "list", "data": [{"id": self.fault.model, "object": "model"}]})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self._authorized():
            return
        prompt = body["messages"][-1]["content"]
        hit = self.fault.record(prompt, body["seed"])
        if hit.action == "429":
            self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": str(self.fault.retry_after_s)})
        elif hit.action == "500":
            self._send(500, {"error": {"message": "internal error"}})
        elif hit.action == "hang":
            time.sleep(self.fault.hang_s)
            self.close_connection = True  # the client gave up long ago
        elif hit.action == "drop":
            self.close_connection = True  # no status line at all: the client sees the connection close
        elif hit.action == "malformed":
            self._send_raw(200, b'{"choices": [{"message": {"content": "7"')
        else:
            answer = f"{sum(int(n) for n in re.findall(r'[0-9]+', prompt))} #{body['seed']}"
            message = {"role": "assistant", "content": answer}
            if self.fault.reasoning:
                message["reasoning_content"] = self.fault.reasoning
            choice = {"index": 0, "finish_reason": "stop", "message": message}
            if body.get("logprobs"):
                choice["logprobs"] = self._logprobs(answer, body["top_logprobs"])
            self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [choice],
                             "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}})

    def _logprobs(self, answer: str, k: int) -> dict | None:
        style = self.fault.logprobs
        if style is None:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            if style == "id":
                return {"id": token_id, "token": chr(token_id), "logprob": logprob}
            return {"token": f"token_id:{token_id}" if style == "token_id" else chr(token_id), "logprob": logprob}

        # The sampled token is the 2nd best and listed last, after k alternatives (llama-cpp-python's server
        # appends it too): the client must sort and keep k.
        return {"content": [{**entry(ord(c), -1.0), "top_logprobs": [entry(ord(c) + 1, -0.5)]
                             + [entry(ord(c) + 2 + j, -2.0 - j) for j in range(k - 1)] + [entry(ord(c), -1.0)]}
                            for c in answer]}

    def _authorized(self) -> bool:
        if self.fault.api_key is None or self.headers.get("Authorization") == f"Bearer {self.fault.api_key}":
            return True
        self._send(401, {"error": {"message": "Incorrect API key provided"}})
        return False

    def _send(self, status: int, obj: dict, headers: dict | None = None):
        self._send_raw(status, json.dumps(obj).encode(), headers)

    def _send_raw(self, status: int, data: bytes, headers: dict | None = None):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client went away (after a timeout); nothing to answer

    def log_message(self, *args):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(gguf: str, alias: str, api_key: str | None = None, n_ctx: int = 1024,
                       extra: tuple[str, ...] = (), wait_s: float = 120) -> tuple[subprocess.Popen, str]:
    """Start llama-cpp-python's server (`python -m llama_cpp.server`, through `distill.llama_server`, which
    sets the project's llama.cpp model parameters) on a free loopback port; return (process, base URL) once
    `/v1/models` answers and one warm-up chat request (the first one pays for loading, seconds) is done."""
    port = free_port()
    cmd = [sys.executable, "-m", "distill.llama_server", "--model", gguf, "--model_alias", alias, "--host",
           "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(llama_threads()),
           "--verbose", "False", *extra]
    if api_key:
        cmd += ["--api_key", api_key]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/models", headers=headers, timeout=2).status_code == 200:
                httpx.post(f"{url}/chat/completions", headers=headers, timeout=wait_s,
                           json={"model": alias, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop(proc)
    raise RuntimeError(f"llama_cpp.server did not answer on {url} within {wait_s} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
