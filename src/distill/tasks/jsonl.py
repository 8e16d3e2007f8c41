"""JSONL tasks: one `{"prompt": ..., "answer": ...}` object per line."""

from __future__ import annotations

import json

from distill.config import DistillError, TaskConfig
from distill.tasks import Example, make_id, task_file

VERIFIER = "exact"


def examples(cfg: TaskConfig, need: int, base_dir=None) -> list[Example]:
    path = task_file(cfg, base_dir)
    if not path.is_file():
        raise DistillError(f"task.path: {path}: no such file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DistillError(f"task.path: {path} line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "answer" not in row:
            raise DistillError(f"task.path: {path} line {n}: expected an object with 'prompt' and 'answer'")
        out.append(Example(make_id(str(path.name), row["prompt"]), row["prompt"], str(row["answer"]), row))
    if not out:
        raise DistillError(f"task.path: {path} has no examples")
    return out
