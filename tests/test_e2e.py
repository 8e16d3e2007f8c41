"""The shipped self-distillation recipe (SmolLM2 as teacher and student), end to end through `distill run`,
with the real SmolLM2 at a reduced size."""

import json

import pytest

from conftest import REPO, run_cli


@pytest.mark.slow
def test_self_distill_recipe_end_to_end(tmp_path):
    run_dir = tmp_path / "demo"
    res = run_cli("run", REPO / "recipes" / "self_distill.yaml", "--out", run_dir,
                  "--set", "task.train_size=80", "--set", "task.eval_size=20",
                  "--set", "generate.samples_per_prompt=8", "--set", "train.epochs=1", timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    for stage, files in {
        "01_generate": ["traces.jsonl"],
        "02_verify": ["kept.jsonl", "rejected.jsonl", "report.json"],
        "03_train": ["student/model.safetensors", "student/tokenizer.json", "metrics.jsonl"],
        "04_evaluate": ["results.json", "samples.jsonl", "report.html", "report.md", "plots/accuracy.png",
                        "plots/quality_vs_cost.png", "plots/training.png"],
        "05_export": ["student-f16.gguf", "student-q4_k_m.gguf", "probe.json", "README.md"],
    }.items():
        for f in files + ["config.yaml", "meta.json"]:
            assert (run_dir / stage / f).is_file(), f"{stage}/{f}"
    traces = (run_dir / "01_generate" / "traces.jsonl").read_text().splitlines()
    assert len(traces) == 80 * 8
    first = json.loads(traces[0])
    assert first["teacher"]["licence"] == "apache-2.0"
    assert first["teacher"]["terms"]["training_on_outputs"] == "allowed"
    results = json.loads((run_dir / "04_evaluate" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["teacher", "student", "student-f16", "student-q4_k_m"]
    assert [m["backend"] for m in results["models"]] == ["llamacpp", "hf", "llamacpp", "llamacpp"]
    assert all(m["n"] == 20 and m["decode_tokens_per_s"] and m["peak_rss_bytes"] > 0 for m in results["models"])
    assert "accuracy" in res.stdout and "teacher" in res.stdout  # the printed comparison table
    probe = json.loads((run_dir / "05_export" / "probe.json").read_text())
    held_out = [json.loads(s)["question"] for s in (run_dir / "04_evaluate" / "samples.jsonl").read_text().splitlines()]
    assert [p["question"] for p in probe["f16"]] == held_out[:3]  # the GGUF answers held-out questions

    # The student's model card and GGUF metadata carry its lineage; the card also its results.
    card = (run_dir / "03_train" / "student" / "README.md").read_text()
    assert "SmolLM2-135M-Instruct" in card and "apache-2.0" in card
    assert "## Results" in card and "| student-q4_k_m |" in card and "Kept by the verifier" in card
    from PIL import Image

    plot = Image.open(run_dir / "04_evaluate" / "plots" / "quality_vs_cost.png")
    assert plot.text["ylabel"] == "accuracy on held-out prompts" and plot.size[0] > 300
    from distill.models import gguf_metadata

    lineage = json.loads(gguf_metadata(run_dir / "05_export" / "student-f16.gguf")["distill.provenance"])
    assert lineage["teachers"][0]["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert lineage["teachers"][0]["licence"] == "apache-2.0" and lineage["teachers"][0]["records"] > 0

    # Held-out prompts never reach training.
    samples = (run_dir / "04_evaluate" / "samples.jsonl").read_text().splitlines()
    evaluated = {json.loads(s)["prompt_id"] for s in samples}
    assert evaluated.isdisjoint(json.loads(t)["prompt_id"] for t in traces)

    again = run_cli("run", REPO / "recipes" / "self_distill.yaml", "--out", run_dir,
                    "--set", "task.train_size=80", "--set", "task.eval_size=20",
                    "--set", "generate.samples_per_prompt=8", "--set", "train.epochs=1")
    assert again.returncode == 0
    assert again.stdout.count("up to date, skipped") == 5
