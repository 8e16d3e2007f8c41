import json

from conftest import run_cli

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
