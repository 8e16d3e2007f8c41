"""Stage 2, verify: the task's verifier marks every trace; kept and rejected go to separate files.

    distill verify recipes/demo.yaml --out runs/demo

Reads `01_generate/traces.jsonl`, writes `kept.jsonl`, `rejected.jsonl` (each record with its `verdict`)
and `report.json` (counts, pass rate, rejection reasons, prompts with at least one kept trace).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from distill.config import DistillError, TaskConfig
from distill.rundir import atomic_write_json, atomic_write_jsonl, begin, stage_dir


@dataclass
class VerifyConfig:
    verifier: str = "auto"  # auto (the task's own) | exact | number | reasoning_gym
    dedupe: bool = True  # drop a passing completion identical to one already kept for the same prompt

    def __post_init__(self):
        from distill.verifiers import VERIFIERS

        if self.verifier != "auto" and self.verifier not in VERIFIERS:
            raise DistillError(f"verify.verifier: unknown '{self.verifier}' (known: auto, {', '.join(VERIFIERS)})")


def verifier_name(cfg_verifier: str, task) -> str:
    return task.default_verifier if cfg_verifier == "auto" else cfg_verifier


def verify(cfg: VerifyConfig, task_cfg: TaskConfig, run_dir: Path, base_dir: Path | None = None) -> Path:
    """Split the teacher's traces into kept and rejected; return the stage directory."""
    from distill.provenance import summarize
    from distill.tasks import load_task
    from distill.verifiers import check

    out = stage_dir(run_dir, "verify")
    src = stage_dir(run_dir, "generate") / "traces.jsonl"
    if not src.is_file():
        raise DistillError(f"verify: {src} not found; run `distill generate` first")
    stage = begin(out, {"verify": cfg, "task": task_cfg}, [src])
    if stage is None:
        return out

    task = load_task(task_cfg, base_dir)
    examples = task.by_id()
    name = verifier_name(cfg.verifier, task)
    kept, rejected, seen = [], [], set()
    for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise DistillError(f"verify: {src} line {n}: not JSON") from None
        ex = examples.get(rec.get("prompt_id"))
        if ex is None:
            verdict = {"verifier": name, "passed": False, "score": 0.0,
                       "detail": "prompt_id not in this task (traces from another task config?)"}
        else:
            verdict = check(name, ex, rec["completion"], rec["finish_reason"]).as_dict(name)
        key = (rec.get("prompt_id"), " ".join(rec["completion"].split()))
        if verdict["passed"] and cfg.dedupe and key in seen:
            verdict = {**verdict, "passed": False, "detail": "duplicate of a kept completion"}
        if verdict["passed"]:
            seen.add(key)
        (kept if verdict["passed"] else rejected).append({**rec, "verdict": verdict})

    stage.start()
    for fname, rows in (("kept.jsonl", kept), ("rejected.jsonl", rejected)):
        atomic_write_jsonl(out / fname, rows)
    total = len(kept) + len(rejected)
    report = {
        "verifier": name,
        "traces": total,
        "kept": len(kept),
        "rejected": len(rejected),
        "pass_rate": round(len(kept) / total, 4) if total else 0.0,
        "prompts": len({r["prompt_id"] for r in kept + rejected}),
        "prompts_with_kept": len({r["prompt_id"] for r in kept}),
        "rejection_reasons": dict(Counter(_reason(r["verdict"]["detail"]) for r in rejected).most_common()),
    }
    atomic_write_json(out / "report.json", report)
    stage.finish(None, summarize([r.get("teacher") for r in kept]), **report)
    print(f"verify: kept {len(kept)} of {total} traces ({report['prompts_with_kept']} prompts) -> {out}")
    return out


def _reason(detail: str) -> str:
    """Group details into reasons: 'extracted '12', expected '13'' → 'wrong answer'."""
    return "wrong answer" if detail.startswith(("extracted", "no number")) else detail
