"""Stage 4, evaluate: teacher and student on held-out prompts the training never saw, same verifier.

    distill evaluate recipes/demo.yaml --out runs/demo

Each model answers greedily, as it would be used: the teacher with its generation prompt (few-shot
demonstrations included), the student with the bare question. Writes `results.json` (one entry per
model: name, accuracy, 95% Wilson interval, n, tokens/s, median latency, prompt and completion tokens
per answer, parameters, file size) and
`samples.jsonl` (every prompt, answer and verdict per model).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import DistillError, TaskConfig
from distill.rundir import atomic_write_json, atomic_write_text, begin, read_meta, stage_dir


@dataclass
class EvaluateConfig:
    # "teacher" (prompted as in generate, demonstrations included), "student" (03_train/student, bare
    # question), or any model reference (bare question), e.g. a baseline student before training.
    models: list[str] = field(default_factory=lambda: ["teacher", "student"])
    max_tokens: int = 32
    limit: int | None = None  # evaluate only the first N held-out prompts
    verifier: str = "auto"  # as in verify: the same verifier filters traces and scores models

    def __post_init__(self):
        if not self.models:
            raise DistillError("evaluate.models: empty list")
        if self.max_tokens < 1:
            raise DistillError(f"evaluate.max_tokens: must be >= 1, got {self.max_tokens}")


def wilson_interval(passed: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (Wilson 1927): better than the normal
    approximation at small n and near 0 or 1, and never outside [0, 1]."""
    if n == 0:
        return 0.0, 1.0
    p = passed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(cfg: EvaluateConfig, task_cfg: TaskConfig, run_dir: Path, generate_cfg,
             base_dir: Path | None = None) -> Path:
    """Score every model in `cfg.models` on the held-out split; return the stage directory."""
    from distill.models import resolve
    from distill.tasks import load_task

    out = stage_dir(run_dir, "evaluate")
    refs = {name: _reference(name, run_dir, generate_cfg) for name in cfg.models}
    models = {name: resolve(ref, f"evaluate.models[{name}]") for name, ref in refs.items()}
    stage = begin(out, {"evaluate": cfg, "task": task_cfg, "generate": generate_cfg},
                  [f for m in models.values() for f in m.files])
    if stage is None:
        return out

    task = load_task(task_cfg, base_dir)
    held_out = task.eval[: cfg.limit] if cfg.limit is not None else task.eval
    if not held_out:
        raise DistillError("task.eval_size: 0 held-out prompts, nothing to evaluate")
    from distill.verify import verifier_name

    verifier = verifier_name(cfg.verifier, task)
    stage.start()
    results, samples = [], []
    for name, model in models.items():
        row, rows = _score(name, model, task, held_out, verifier, cfg, generate_cfg)
        results.append(row)
        samples += rows
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    atomic_write_json(out / "results.json", {"task": task.name, "verifier": verifier, "models": results})
    provenance = read_meta(stage_dir(run_dir, "train")).get("provenance")  # the teachers behind the student
    stage.finish(None, provenance, models={r["name"]: r["accuracy"] for r in results})
    return out


def _reference(name: str, run_dir: Path, generate_cfg) -> str:
    if name == "teacher":
        return generate_cfg.teacher
    if name == "student":
        student = stage_dir(run_dir, "train") / "student"
        if not (student / "config.json").is_file():
            raise DistillError(f"evaluate.models: 'student' needs {student}; run `distill train` first")
        return str(student)
    return name


def _score(name, model, task, held_out, verifier, cfg, generate_cfg) -> tuple[dict, list[dict]]:
    from rich.progress import track

    from distill.generate import api_key
    from distill.models import count_params, size_bytes
    from distill.tasks import student_messages, teacher_messages
    from distill.teachers import Sampling, load_teacher
    from distill.verifiers import check

    runner = load_teacher(model, api_key=api_key(generate_cfg) if model.kind == "openai" else None)
    greedy = Sampling(temperature=0.0, max_tokens=cfg.max_tokens, stop=list(generate_cfg.stop))
    rows, latencies, tokens, prompt_tokens = [], [], 0, 0
    for ex in track(held_out, description=f"evaluate {name}"):
        messages = teacher_messages(task, ex, generate_cfg.system) if name == "teacher" \
            else student_messages(ex.question)
        comp = runner.complete(messages, [0], greedy)[0]
        verdict = check(verifier, ex, comp.text, comp.finish_reason)
        latencies.append(comp.seconds)
        tokens += comp.completion_tokens
        prompt_tokens += comp.prompt_tokens
        rows.append({"model": name, "prompt_id": ex.id, "question": ex.question, "answer": ex.answer,
                     "completion": comp.text, "finish_reason": comp.finish_reason,
                     "completion_tokens": comp.completion_tokens, "latency_s": round(comp.seconds, 4),
                     "verdict": verdict.as_dict(verifier)})
    runner.close()
    passed = sum(r["verdict"]["passed"] for r in rows)
    low, high = wilson_interval(passed, len(rows))
    return {
        "name": name,
        "model": model.name,
        "backend": runner.backend,
        "accuracy": round(passed / len(rows), 4),
        "ci95_low": round(low, 4),
        "ci95_high": round(high, 4),
        "n": len(rows),
        "tokens_per_s": round(tokens / sum(latencies), 2) if sum(latencies) else 0.0,
        "latency_p50_s": round(statistics.median(latencies), 4),
        "prompt_tokens_per_answer": round(prompt_tokens / len(rows), 1),
        "completion_tokens_per_answer": round(tokens / len(rows), 1),
        "params": count_params(model),
        "size_bytes": size_bytes(model),
    }, rows


def results_table(results_path: Path):
    """The teacher-vs-student comparison as a rich table."""
    from rich.table import Table

    data = json.loads(Path(results_path).read_text())
    table = Table(title=f"{data['task']}: held-out prompts, verifier {data['verifier']}")
    for col in ("model", "accuracy", "95% CI", "n", "prompt tok", "tok/s", "p50", "params", "size"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in data["models"]:
        table.add_row(r["name"], f"{r['accuracy']:.0%}", f"{r['ci95_low']:.0%}–{r['ci95_high']:.0%}", str(r["n"]),
                      f"{r['prompt_tokens_per_answer']:.0f}", f"{r['tokens_per_s']:.0f}",
                      f"{r['latency_p50_s'] * 1000:.0f} ms",
                      f"{r['params'] / 1e6:.1f}M" if r["params"] else "–",
                      f"{r['size_bytes'] / 1e6:.0f} MB" if r["size_bytes"] else "–")
    table.caption = "; ".join(f"{r['name']}: {r['model']} via {r['backend']}" for r in data["models"])
    return table
