import json
import shutil

import pytest

from conftest import run_cli
from distill.evaluate import wilson_interval


@pytest.mark.parametrize("passed, n, low, high", [
    # hand-computed: centre = (p + z²/2n)/(1 + z²/n), half = z·sqrt(p(1-p)/n + z²/4n²)/(1 + z²/n)
    (5, 10, 0.2366, 0.7634),
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (39, 100, 0.3002, 0.4880),  # centre 0.394070, half 0.093902
])
def test_wilson_interval_matches_hand_values(passed, n, low, high):
    got = wilson_interval(passed, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_evaluate_cli_scores_teacher_and_student(tiny_recipe, tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_model, run_dir / "03_train" / "student")
    res = run_cli("evaluate", tiny_recipe, "--out", run_dir)
    assert res.returncode == 0, res.stderr
    results = json.loads((run_dir / "04_evaluate" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["teacher", "student"]
    for m in results["models"]:
        assert {"name", "accuracy", "ci95_low", "ci95_high", "n", "tokens_per_s", "latency_p50_s", "params",
                "size_bytes", "prompt_tokens_per_answer", "completion_tokens_per_answer"} <= set(m)
        assert m["n"] == 3 and 0 <= m["ci95_low"] <= m["accuracy"] <= m["ci95_high"] <= 1
        assert m["params"] > 0 and m["size_bytes"] > 0 and m["tokens_per_s"] > 0
    samples = (run_dir / "04_evaluate" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 6 and "verdict" in json.loads(samples[0])
    assert "accuracy" in res.stdout  # the comparison table


def test_evaluate_without_student_fails_clearly(tiny_recipe, tmp_path):
    res = run_cli("evaluate", tiny_recipe, "--out", tmp_path / "run")
    assert res.returncode == 2 and "run `distill train` first" in res.stderr
