"""`distill serve` and `distill chat`: the official openai client against the server, the security matrix
(keys, bad bodies, caps, 413, a full queue, a deadline), schemathesis against the OpenAPI spec, hostile
chat templates, SIGTERM drain, and the CLI's refusals. The server runs the tiny random model as a GGUF."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import run_cli

KEY = "test-key-123"
HOSTILE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"


@contextlib.contextmanager
def running(model: Path, kind: str = "gguf", **overrides):
    """A real uvicorn server on a free loopback port, in a thread; yields (base URL, FastAPI app)."""
    import uvicorn

    from distill.serve import ServeConfig, create_app, load_backend

    cfg = ServeConfig(str(model), **{"api_key": KEY, "max_tokens": 32, "n_ctx": 512, **overrides})
    app = create_app(cfg, load_backend(kind, model, cfg.n_ctx), "tiny")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join()


@pytest.fixture(scope="module")
def server(tiny_gguf):
    with running(tiny_gguf) as (url, app):
        yield url, app


AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "What is 1 + 1?"}], "max_tokens": 4}


def test_openai_client_chat_stream_and_models(server):
    from openai import OpenAI

    url, _ = server
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=5, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=5,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content  # greedy: the stream says what the plain call said
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 5
    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=3, n=2, temperature=0)
    assert len(done.choices) == 2 and done.choices[0].text == done.choices[1].text


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                          ("POST", "/v1/completions"), ("GET", "/openapi.json"),
                                          ("GET", "/docs"), ("GET", "/no/such/route")])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_no_or_wrong_key_is_401_everywhere_but_health(server, method, path, headers):
    url, _ = server
    r = httpx.request(method, url + path, headers=headers, json=CHAT)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/health").status_code == 200


@pytest.mark.parametrize("body, message", [
    ([1, 2], "valid dictionary"),
    ("just a string", "valid dictionary"),
    (None, "body"),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({**CHAT, "max_tokens": "many"}, "max_tokens"),
    ({**CHAT, "max_tokens": -5}, "max_tokens"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "max_tokens": 10**12}, "over this server's cap of 32"),
    ({**CHAT, "n": 10**6}, "over this server's cap of 4"),
    ({**CHAT, "n": 0}, "n"),
    ({**CHAT, "temperature": "hot"}, "temperature"),
    ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**CHAT, "n": 2, "stream": True}, "stream supports one choice"),
])
def test_bad_bodies_are_400_with_a_message(server, body, message):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_malformed_and_huge_bodies_are_4xx_and_the_server_stays_up(server):
    url, _ = server
    post = lambda **kw: httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=60, **kw)  # noqa: E731
    assert post(content=b"{not json").status_code == 400
    assert post(content=b"[" * 200_000 + b"]" * 200_000).status_code == 400  # nesting past the parser's limit
    assert post(content=b"x" * 10_000_000).status_code == 413  # Content-Length over the limit

    def chunks():  # no Content-Length: the bytes that arrive are counted
        for _ in range(100):
            yield b"x" * 100_000

    assert post(content=chunks()).status_code == 413
    prompt = "word " * 2000  # over the 512-token context
    r = httpx.post(url + "/v1/completions", headers=AUTH, json={"prompt": prompt, "max_tokens": 4})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    assert post(json=CHAT).status_code == 200
    assert httpx.get(url + "/health").json()["pending"] == 0


def test_full_queue_is_503_with_retry_after_and_deadline_holds(tiny_gguf):
    with running(tiny_gguf, queue=0, timeout_s=2.0) as (url, app):
        gate = threading.Event()
        app.state.worker.submit(gate.wait)  # the one worker is busy until the gate opens
        with httpx.Client(headers=AUTH, timeout=60) as client:
            waiting = threading.Thread(target=lambda: results.append(client.post(url + "/v1/chat/completions",
                                                                                   json=CHAT)))
            results: list = []
            waiting.start()
            while httpx.get(url + "/health").json()["pending"] < 1:
                time.sleep(0.02)
            full = client.post(url + "/v1/chat/completions", json=CHAT)
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            waiting.join()  # the gate is still shut: the waiting request runs out of time in the queue
            assert results[0].status_code == 503 and "timed out in the queue" in results[0].json()["error"]["message"]
            gate.set()
            while httpx.get(url + "/health").json()["pending"]:  # the worker drops the timed-out job
                time.sleep(0.02)
            assert client.post(url + "/v1/chat/completions", json=CHAT).status_code == 200


def test_schemathesis_finds_no_server_error(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    url, app = server
    schema = schemathesis.openapi.from_dict(app.openapi())
    for result in schema.get_all_operations():
        operation = result.ok()
        # Negative cases (bodies that break the schema) exist only for operations that take a body.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method.upper() == "POST" else [])
        for mode in modes:
            @settings(max_examples=15, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(base_url=url, headers=AUTH)
                assert response.status_code < 500, (case.method, case.path, case.body, response.text)

            check()
    assert httpx.get(url + "/health").status_code == 200


def _with_template(src: Path, dest: Path, template: str) -> Path:
    from distill.export import _add_metadata

    dest.write_bytes(src.read_bytes())
    _add_metadata(dest, {"tokenizer.chat_template": template})
    return dest


def test_hostile_chat_template_is_refused_not_run(tiny_gguf, tmp_path):
    from distill.config import DistillError
    from distill.serve import compile_template

    with pytest.raises(DistillError, match="refused the chat template"):
        compile_template(HOSTILE, "model.gguf")
    hostile = _with_template(tiny_gguf, tmp_path / "hostile.gguf", HOSTILE)
    res = run_cli("serve", hostile, "--port", "0")
    assert res.returncode == 2 and "refused the chat template" in res.stderr, res.stderr
    # A template that hides the attack behind one message's content is refused at that request.
    lurking = "{% if messages[0].content == 'x' %}{{ ''.__class__.__mro__ }}{% endif %}{{ messages[0].content }}"
    with running(_with_template(tiny_gguf, tmp_path / "lurking.gguf", lurking)) as (url, _):
        bad = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=bad)
        assert r.status_code == 400 and "sandbox forbids" in r.json()["error"]["message"]
        assert httpx.post(url + "/v1/chat/completions", headers=AUTH, json=CHAT).status_code == 200


def test_hf_directory_is_served_with_stop_strings(tiny_model):
    with running(tiny_model, kind="hf_dir") as (url, _):
        body = {**CHAT, "max_tokens": 6, "temperature": 0}
        plain = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=body, timeout=60).json()
        text = plain["choices"][0]["message"]["content"]
        assert plain["usage"]["completion_tokens"] == 6 and text
        stop = text.split()[1] if len(text.split()) > 1 else text[1:]
        cut = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={**body, "stop": stop}, timeout=60).json()
        assert cut["choices"][0]["finish_reason"] == "stop" and stop not in cut["choices"][0]["message"]["content"]
        assert text.startswith(cut["choices"][0]["message"]["content"])


def test_serve_refuses_open_bind_without_key_and_bad_key_file(tiny_gguf, tmp_path):
    res = run_cli("serve", tiny_gguf, "--host", "0.0.0.0")
    assert res.returncode == 2 and "--host 0.0.0.0 is reachable from other machines" in res.stderr
    empty = tmp_path / "key"
    empty.write_text("\n")
    res = run_cli("serve", tiny_gguf, "--api-key-file", empty)
    assert res.returncode == 2 and "is empty" in res.stderr
    res = run_cli("serve", tmp_path)
    assert res.returncode == 2 and "neither a model nor a run directory" in res.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_a_running_stream(tiny_gguf, tmp_path):
    port = _free_port()
    key = tmp_path / "key"
    key.write_text(KEY)
    args = ["serve", str(tiny_gguf), "--port", str(port), "--api-key-file", str(key), "--max-tokens", "200",
            "--ctx", "1024", "--drain", "300"]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("distill")), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.2)
        body = {"prompt": "Once", "max_tokens": 200, "temperature": 0.0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", headers=AUTH, json=body, timeout=300) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)  # mid-stream
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and len(rest) > 150  # the running request finished
        # uvicorn re-raises the signal once drained, so the exit status is the conventional one for SIGTERM
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_chat_cli_answers_each_line(tiny_gguf):
    exe = Path(sys.executable).with_name("distill")
    res = subprocess.run([str(exe), "chat", str(tiny_gguf), "--max-tokens", "3"], input="What is 1 + 1?\n/reset\n"
                         "Hello\n", capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    answers = [line for line in res.stdout.splitlines() if line.strip()]
    assert len(answers) == 2 and all(a.endswith("[cut at --max-tokens]") for a in answers)
