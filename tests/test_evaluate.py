import json
import re
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
    res = run_cli("evaluate", tiny_recipe, "--out", run_dir,
                  "--set", "evaluate.prices={teacher: {input: 1.0, output: 2.0}}")
    assert res.returncode == 0, res.stderr
    results = json.loads((run_dir / "04_evaluate" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["teacher", "student"]
    teacher, student = results["models"]
    expected = 1000 * (teacher["prompt_tokens_per_answer"] + 2 * teacher["completion_tokens_per_answer"]) / 1e6
    assert teacher["usd_per_1k_answers"] == pytest.approx(expected, rel=1e-3)
    assert student["usd_per_1k_answers"] is None and student["seconds_per_1k_answers"] > 0
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


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),  # c/n
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 0, 5, 0.0),
    (3, 3, 2, 1.0),
    (4, 1, 3, 0.75),  # 1 - C(3,3)/C(4,3) = 1 - 1/4
])
def test_pass_at_k_matches_hand_values(n, c, k, expected):
    from distill.evaluate import pass_at_k

    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_paired_comparison_lists_the_flips():
    from distill.evaluate import paired

    def s(model, pid, ok):
        return {"model": model, "prompt_id": pid, "sample_index": 0, "verdict": {"passed": ok}}

    samples = [s("teacher", "a", True), s("student", "a", True), s("teacher", "b", True), s("student", "b", False),
               s("teacher", "c", False), s("student", "c", True), s("teacher", "d", False), s("student", "d", False)]
    assert paired(samples, "teacher", "student") == {"models": ["teacher", "student"], "both_right": 1,
                                                     "both_wrong": 1, "only_teacher": ["b"], "only_student": ["c"]}


def test_report_files_and_plot_axes(tiny_recipe, tiny_model, tmp_path):
    from PIL import Image

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_model, run_dir / "03_train" / "student")
    res = run_cli("evaluate", tiny_recipe, "--out", run_dir, "--set", "evaluate.samples=3",
                  "--set", "evaluate.temperature=0.9")
    assert res.returncode == 0, res.stderr
    out = run_dir / "04_evaluate"
    results = json.loads((out / "results.json").read_text())
    for m in results["models"]:
        assert m["samples_per_prompt"] == 3 and 0 <= m["pass@3"] <= 1 and 0 <= m["maj@3"] <= 1
        assert m["accuracy"] <= m["pass@3"] and m["latency_p50_s"] <= m["latency_p95_s"]
        assert m["compute_per_answer"] > 0 and 0 <= m["truncation_rate"] <= 1
    assert set(results["paired"]) == {"models", "both_right", "both_wrong", "only_teacher", "only_student"}
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2 * 3 * 3  # models x prompts x samples

    axes = {"quality_vs_cost": ("compute per answer (parameters × tokens)", "accuracy on held-out prompts"),
            "accuracy": ("model", "accuracy (95% Wilson interval)"),
            "latency": ("model", "latency per answer (s)")}
    for name, (xlabel, ylabel) in axes.items():
        image = Image.open(out / "plots" / f"{name}.png")
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
        assert (image.text["xlabel"], image.text["ylabel"]) == (xlabel, ylabel)
        assert len(image.convert("L").getcolors(maxcolors=65536)) > 10  # something was drawn
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # images inline
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing to fetch: opens offline
    assert "| teacher |" in (out / "report.md").read_text()


def test_sampling_needs_a_temperature(tiny_recipe, tmp_path):
    res = run_cli("evaluate", tiny_recipe, "--out", tmp_path / "run", "--set", "evaluate.samples=3")
    assert res.returncode == 2 and "evaluate.temperature: must be > 0" in res.stderr


def test_held_out_prompts_that_were_trained_on_are_refused(tiny_recipe, tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli("generate", tiny_recipe, "--out", run_dir).returncode == 0
    shutil.copytree(tiny_model, run_dir / "03_train" / "student")
    # A larger eval split now reaches into the prompts the teacher answered for training.
    res = run_cli("evaluate", tiny_recipe, "--out", run_dir, "--set", "task.eval_size=7")
    assert res.returncode == 2 and "held-out prompts are training prompts" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    forced = run_cli("evaluate", tiny_recipe, "--out", run_dir, "--set", "task.eval_size=7",
                     "--set", "evaluate.allow_overlap=true", "--set", "evaluate.models=[student]")
    assert forced.returncode == 0, forced.stderr


@pytest.mark.parametrize("models, message", [
    ("[student-q4_k_m]", "'student-q4_k_m' needs"),
    ("[BAD]", "evaluate.models[BAD]: cannot load"),
])
def test_models_that_cannot_be_scored(tiny_recipe, tmp_path, models, message):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    res = run_cli("evaluate", tiny_recipe, "--out", tmp_path / "run",
                  "--set", f"evaluate.models={models.replace('BAD', str(bad))}")
    assert res.returncode == 2 and message.replace("BAD", str(bad)) in res.stderr, res.stderr


def test_zero_held_out_prompts(tiny_recipe, tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_model, run_dir / "03_train" / "student")
    res = run_cli("evaluate", tiny_recipe, "--out", run_dir, "--set", "task.eval_size=0")
    assert res.returncode == 2 and "task.eval_size: 0 held-out prompts" in res.stderr


def _row(name, accuracy, params, size, compute, p50):
    return {"name": name, "accuracy": accuracy, "params": params, "size_bytes": size, "compute_per_answer": compute,
            "latency_p50_s": p50, "n": 200}


def test_distillation_summary_gives_ratios_to_the_teacher_and_the_floor():
    from distill.evaluate import distillation_summary
    from distill.report import headline

    rows = [_row("teacher", 1.0, 1_543_714_304, 1_117_320_768, 2.1e11, 0.114),
            _row("untrained", 0.03, 134_515_008, 98_000_000, 5.2e9, 0.030),
            _row("student", 0.95, 134_515_008, 538_000_000, 5.2e9, 0.105),
            _row("student-f16", 0.95, 134_515_008, 271_000_000, 5.2e9, 0.040),
            _row("student-q4_k_m", 0.94, 134_515_008, 105_000_000, 5.2e9, 0.024)]
    d = distillation_summary(rows)
    assert d["shipped"] == "student-q4_k_m" and d["untrained_accuracy"] == 0.03 and d["teacher_accuracy"] == 1.0
    q4 = d["students"]["student-q4_k_m"]
    assert q4["accuracy_kept"] == 0.94 and q4["size_ratio"] == pytest.approx(105 / 1117.3, abs=1e-4)
    assert q4["latency_p50_ratio"] == pytest.approx(0.024 / 0.114, abs=1e-4)
    assert d["students"]["student"]["compute_ratio"] == pytest.approx(1 / 40.4, abs=1e-3)
    line = headline({"models": rows, "distillation": d})
    assert line.startswith("The student keeps 95% of the teacher's accuracy (95% against 100%, n=200)")
    assert "1/11 of its parameters" in line and "1/40 of its compute" in line
    assert "student-q4_k_m (105 MB" in line and "24 ms" in line and "scored 3%" in line
    assert distillation_summary([r for r in rows if r["name"] != "teacher"]) is None


def test_untrained_row_scores_the_student_before_training(tiny_recipe, tiny_model, tmp_path):
    """`untrained` is train.student as it was before training, read from 03_train/config.yaml, scored with the
    bare question like the student; its accuracy is the floor in the distillation summary."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_model, run_dir / "03_train" / "student")
    (run_dir / "03_train" / "config.yaml").write_text(f"train:\n  student: {tiny_model}\n")
    res = run_cli("evaluate", tiny_recipe, "--out", run_dir, "--set", "evaluate.models=[teacher, untrained, student]")
    assert res.returncode == 0, res.stderr
    results = json.loads((run_dir / "04_evaluate" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["teacher", "untrained", "student"]
    assert results["distillation"]["untrained_accuracy"] == results["models"][1]["accuracy"]
    assert "The student keeps" in res.stdout
    (run_dir / "03_train" / "config.yaml").write_text(f"train:\n  student: {tiny_model}\n  keep_layers: [0]\n")
    bad = run_cli("evaluate", tiny_recipe, "--out", tmp_path / "other", "--set", "evaluate.models=[untrained]")
    assert bad.returncode == 2 and "'untrained' needs" in bad.stderr
