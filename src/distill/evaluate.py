"""Stage 4, evaluate: teacher and student on held-out prompts the training never saw, same verifier.

    distill evaluate recipes/demo.yaml --out runs/demo

Each model answers as it would be used: the teacher with its generation prompt (few-shot
demonstrations included), the student with the bare question; greedily, or `samples` times at
`temperature` for pass@k and maj@k. Writes `results.json` (per model: name, accuracy, 95% Wilson
interval over prompts, n, tokens/s, latency p50/p95, prompt and completion tokens per answer, compute
per answer, seconds per 1,000 answers here, truncation rate, parameters, file size; plus the paired
teacher/student comparison), `samples.jsonl` (every prompt, answer and verdict per model) and the
report (`report.html`, `report.md`, `plots/*.png`, see report.py).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import DistillError, TaskConfig
from distill.rundir import (
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    begin,
    read_jsonl,
    read_meta,
    stage_dir,
)


@dataclass
class EvaluateConfig:
    # "teacher" (prompted as in generate, demonstrations included), "student" (03_train/student, bare
    # question), "student-<quant>" (05_export/student-<quant>.gguf), "untrained" (train.student before
    # training: the floor that shows what training bought), or any model reference (bare question).
    models: list[str] = field(default_factory=lambda: ["teacher", "student"])
    max_tokens: int = 32
    limit: int | None = None  # evaluate only the first N held-out prompts
    verifier: str = "auto"  # as in verify: the same verifier filters traces and scores models
    samples: int = 1  # answers per prompt; above 1, results add pass@k and maj@k
    temperature: float = 0.0  # 0 is greedy; samples > 1 needs a temperature above 0
    allow_overlap: bool = False  # evaluate even if held-out prompts were training prompts (a leak)
    # API prices in USD per million tokens, by name in `models` or model id: {"gpt-4o-mini": {"input": 0.15,
    # "output": 0.6}}. A priced model also gets `usd_per_1k_answers`; every model gets its compute time.
    prices: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.models:
            raise DistillError("evaluate.models: empty list")
        if self.samples < 1:
            raise DistillError(f"evaluate.samples: must be >= 1, got {self.samples}")
        from distill.generate import is_price

        for name, price in self.prices.items():
            if not is_price(price):
                raise DistillError(f"evaluate.prices.{name}: expected {{input: USD per 1M tokens, output: …}}")
        if self.samples > 1 and self.temperature <= 0:
            raise DistillError("evaluate.temperature: must be > 0 when evaluate.samples > 1 (greedy answers repeat)")
        if self.max_tokens < 1:
            raise DistillError(f"evaluate.max_tokens: must be >= 1, got {self.max_tokens}")


def wilson_interval(passed: float, n: int, z: float = 1.959964) -> tuple[float, float]:
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
    _check_no_overlap(held_out, run_dir, cfg.allow_overlap)
    from distill.verify import verifier_name

    verifier = verifier_name(cfg.verifier, task)
    stage.start()
    results, samples = [], []
    for name, model in models.items():
        row, rows = _score(name, model, task, held_out, verifier, cfg, generate_cfg)
        results.append(row)
        samples += rows
    atomic_write_jsonl(out / "samples.jsonl", samples)
    report = {"task": task.name, "verifier": verifier, "models": results}
    if {"teacher", "student"} <= set(refs):
        report["paired"] = paired(samples, "teacher", "student")
    if (summary := distillation_summary(results)) is not None:
        report["distillation"] = summary
    atomic_write_json(out / "results.json", report)
    from distill.report import student_card, write_report

    write_report(out, run_dir)
    student = stage_dir(run_dir, "train") / "student"
    if "student" in refs and (student / "README.md").is_file():
        # A directory's README.md is left out of input hashes, so the card invalidates no stage.
        atomic_write_text(student / "README.md", student_card(run_dir, report))
    provenance = read_meta(stage_dir(run_dir, "train")).get("provenance")  # the teachers behind the student
    stage.finish(None, provenance, models={r["name"]: r["accuracy"] for r in results})
    return out


def _check_no_overlap(held_out, run_dir: Path, allow: bool) -> None:
    """Refuse held-out prompts that the teacher answered for training (e.g. after task.seed changed)."""
    traces = stage_dir(run_dir, "generate") / "traces.jsonl"
    if allow or not traces.is_file():
        return
    trained = {rec.get("prompt_id") for rec in read_jsonl(traces)}
    leaked = [ex.id for ex in held_out if ex.id in trained]
    if leaked:
        raise DistillError(f"evaluate: {len(leaked)} of {len(held_out)} held-out prompts are training prompts in "
                           f"{traces} (did the task config change?); set evaluate.allow_overlap=true to score anyway")


def _reference(name: str, run_dir: Path, generate_cfg) -> str:
    """`teacher`, `student`, `student-<quant>` (an exported GGUF, scored by llama.cpp), `untrained`, or a
    reference."""
    if name == "teacher":
        return generate_cfg.teacher
    if name == "untrained":
        return _untrained_reference(run_dir, generate_cfg)
    if name == "student":
        student = stage_dir(run_dir, "train") / "student"
        if not (student / "config.json").is_file():
            raise DistillError(f"evaluate.models: 'student' needs {student}; run `distill train` first")
        return str(student)
    if name.startswith("student-"):
        gguf = stage_dir(run_dir, "export") / f"{name}.gguf"
        if not gguf.is_file():
            raise DistillError(f"evaluate.models: '{name}' needs {gguf}; list {name[len('student-'):]} in "
                               "export.quantize and run `distill export` first")
        return str(gguf)
    return name


def _untrained_reference(run_dir: Path, generate_cfg) -> str:
    """The model the student started from, read from the train stage's resolved config (stages talk
    through files): `train.student`, or the teacher for `student: teacher`. A pruned student existed only
    in memory before training, so it has no such row."""
    import yaml

    path = stage_dir(run_dir, "train") / "config.yaml"
    if not path.is_file():
        raise DistillError(f"evaluate.models: 'untrained' needs {path}; run `distill train` first")
    train = (yaml.safe_load(path.read_text()) or {}).get("train") or {}
    if train.get("keep_layers") or train.get("intermediate_size"):
        raise DistillError("evaluate.models: 'untrained' is the student's starting model, but this student was "
                           "pruned from it in memory (train.keep_layers / train.intermediate_size); remove it")
    student = train.get("student", "teacher")
    return generate_cfg.teacher if student == "teacher" else str(student)


def distillation_summary(results: list[dict]) -> dict | None:
    """What distillation bought, as ratios to the teacher: for each student row (`student`, `student-*`) the
    fraction of the teacher's accuracy it keeps and its parameters, size, compute per answer and p50 latency
    over the teacher's; `shipped` is the smallest exported file; `untrained` the floor before training."""
    rows = {r["name"]: r for r in results}
    teacher = rows.get("teacher")
    students = [r for r in results if r["name"] == "student" or r["name"].startswith("student-")]
    if teacher is None or not students:
        return None

    def ratio(a, b):
        return round(a / b, 4) if a is not None and b else None

    per = {s["name"]: {"accuracy": s["accuracy"], "accuracy_kept": ratio(s["accuracy"], teacher["accuracy"]),
                       "params_ratio": ratio(s["params"], teacher["params"]),
                       "size_ratio": ratio(s["size_bytes"], teacher["size_bytes"]),
                       "compute_ratio": ratio(s["compute_per_answer"], teacher["compute_per_answer"]),
                       "latency_p50_ratio": ratio(s["latency_p50_s"], teacher["latency_p50_s"])}
           for s in students}
    files = [s for s in students if s["name"].startswith("student-") and s["size_bytes"]]
    untrained = rows.get("untrained")
    return {"teacher_accuracy": teacher["accuracy"], "students": per,
            "shipped": min(files, key=lambda s: s["size_bytes"])["name"] if files else None,
            "untrained_accuracy": untrained["accuracy"] if untrained else None}


def _score(name, model, task, held_out, verifier, cfg, generate_cfg) -> tuple[dict, list[dict]]:
    from rich.progress import track

    from distill.generate import api_key
    from distill.models import count_params, size_bytes
    from distill.tasks import student_messages, teacher_messages
    from distill.teachers import Sampling, load_teacher
    from distill.verifiers import check, extract_answer

    try:
        runner = load_teacher(model, api_key=api_key(generate_cfg) if model.kind == "openai" else None)
    except Exception as e:  # noqa: BLE001 - a file that does not load, whatever the library says
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DistillError(f"evaluate.models[{name}]: cannot load {model.ref}: {reason}") from None
    sampling = Sampling(temperature=cfg.temperature, max_tokens=cfg.max_tokens, stop=list(generate_cfg.stop))
    rows, per_prompt = [], []  # per_prompt: (correct samples, majority answer correct)
    peak = _PeakRSS()
    for ex in track(held_out, description=f"evaluate {name}"):
        messages = teacher_messages(task, ex, generate_cfg.system) if name == "teacher" \
            else student_messages(ex.question)
        comps = runner.complete(messages, list(range(cfg.samples)), sampling)
        verdicts = [check(verifier, ex, c.text, c.finish_reason) for c in comps]
        for i, (comp, verdict) in enumerate(zip(comps, verdicts, strict=True)):
            rows.append({"model": name, "prompt_id": ex.id, "sample_index": i, "question": ex.question,
                         "answer": ex.answer, "completion": comp.text, "reasoning": comp.reasoning,
                         "finish_reason": comp.finish_reason, "prompt_tokens": comp.prompt_tokens,
                         "completion_tokens": comp.completion_tokens, "latency_s": round(comp.seconds, 4),
                         "prefill": [comp.prefill_tokens, comp.prefill_s],
                         "decode": [comp.decode_tokens, comp.decode_s],
                         "verdict": verdict.as_dict(verifier)})
        # maj@k: the most common extracted answer (first seen wins a tie) is right.
        answers = [extract_answer(c.text) for c in comps]
        majority = max(answers, key=answers.count)
        per_prompt.append((sum(v.passed for v in verdicts), verdicts[answers.index(majority)].passed))
    runner.close()
    peak_rss = peak.stop()

    n, k = len(per_prompt), cfg.samples
    accuracy = sum(c for c, _ in per_prompt) / (n * k)  # mean over all answers (pass@1)
    low, high = wilson_interval(accuracy * n, n)  # over prompts: samples of one prompt are not independent
    latencies = sorted(r["latency_s"] for r in rows)
    prompt_tokens = sum(r["prompt_tokens"] for r in rows) / len(rows)
    completion_tokens = sum(r["completion_tokens"] for r in rows) / len(rows)
    params = count_params(model)
    result = {
        "name": name,
        "model": model.name,
        "backend": runner.backend,
        "accuracy": round(accuracy, 4),
        "ci95_low": round(low, 4),
        "ci95_high": round(high, 4),
        "n": n,
        "samples_per_prompt": k,
        "tokens_per_s": round(sum(r["completion_tokens"] for r in rows) / sum(latencies), 2) if sum(latencies) else 0.0,
        "latency_p50_s": round(statistics.median(latencies), 4),
        "latency_p95_s": round(latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)], 4),
        "prompt_tokens_per_answer": round(prompt_tokens, 1),
        "completion_tokens_per_answer": round(completion_tokens, 1),
        # parameters x tokens processed: the hardware-independent cost of one answer (~half its FLOPs)
        "compute_per_answer": round(params * (prompt_tokens + completion_tokens)) if params else None,
        "seconds_per_1k_answers": round(1000 * sum(latencies) / len(latencies), 1),  # on this machine
        "usd_per_1k_answers": _usd_per_1k(cfg.prices.get(name) or cfg.prices.get(model.name),
                                          prompt_tokens, completion_tokens),
        "prefill_tokens_per_s": _rate(rows, "prefill"),
        "decode_tokens_per_s": _rate(rows, "decode"),
        "truncation_rate": round(sum(r["finish_reason"] == "length" for r in rows) / len(rows), 4),
        "thinking_chars_per_answer": round(sum(len(r["reasoning"]) for r in rows if r["reasoning"]) / len(rows), 1)
        if any(r["reasoning"] for r in rows) else None,
        "peak_rss_bytes": peak_rss,
        "params": params,
        "size_bytes": size_bytes(model),
    }
    if k > 1:
        result[f"pass@{k}"] = round(sum(pass_at_k(k, c, k) for c, _ in per_prompt) / n, 4)
        result[f"maj@{k}"] = round(sum(m for _, m in per_prompt) / n, 4)
    return result, rows


def _usd_per_1k(price: dict | None, prompt_tokens: float, completion_tokens: float) -> float | None:
    if price is None:
        return None
    from distill.generate import usd

    return round(1000 * usd(price, prompt_tokens, completion_tokens), 6)


def _rate(rows: list[dict], phase: str) -> float | None:
    """Tokens per second of one phase (prefill or decode) over all answers, when the backend measured it."""
    pairs = [r[phase] for r in rows if r[phase][1] is not None]
    seconds = sum(s for _, s in pairs)
    return round(sum(t for t, _ in pairs) / seconds, 1) if pairs and seconds > 0 else None


class _PeakRSS:
    """The process's peak resident memory while one model is evaluated, sampled every 20 ms in a thread
    (`ru_maxrss` only ever grows over the whole process, so it cannot tell one model from the last)."""

    def __init__(self):
        import threading

        import psutil

        self._proc, self._peak, self._done = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.02):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self._peak, self._proc.memory_info().rss)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021, "Evaluating Large Language
    Models Trained on Code", eq. 1): 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def paired(samples: list[dict], a: str, b: str) -> dict:
    """Which held-out prompts model `a` and model `b` get right (first sample of each): the flips between
    them, prompt by prompt, rather than two independent accuracies."""
    right = {}
    for s in samples:
        if s["sample_index"] == 0 and s["model"] in (a, b):
            right.setdefault(s["prompt_id"], {})[s["model"]] = s["verdict"]["passed"]
    both = [p for p, r in right.items() if len(r) == 2]
    return {
        "models": [a, b],
        "both_right": sum(right[p][a] and right[p][b] for p in both),
        "both_wrong": sum(not right[p][a] and not right[p][b] for p in both),
        f"only_{a}": sorted(p for p in both if right[p][a] and not right[p][b]),
        f"only_{b}": sorted(p for p in both if right[p][b] and not right[p][a]),
    }


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
