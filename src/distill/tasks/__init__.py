"""Tasks: examples with answers, split into disjoint held-out / few-shot / train sets.

A task is rebuilt deterministically from its `TaskConfig` by every stage that needs it (stages talk
through files; an example is found again by its `prompt_id`), so nothing but ids crosses stage borders.

    python -c "from distill.config import TaskConfig; from distill.tasks import load_task; \
print(load_task(TaskConfig(train_size=3, eval_size=2)).eval)"
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import DistillError, TaskConfig


@dataclass
class Example:
    id: str  # stable prompt id: a hash of the task name and the question
    question: str
    answer: str
    entry: dict = field(default_factory=dict, repr=False)  # the source row, for verifiers that need it


@dataclass
class Task:
    name: str
    default_verifier: str
    train: list[Example]
    eval: list[Example]
    shots: list[Example]  # few-shot demonstrations, in neither split

    def by_id(self) -> dict[str, Example]:
        return {ex.id: ex for ex in self.train + self.eval + self.shots}


def task_file(cfg: TaskConfig, base_dir=None) -> Path | None:
    """The task's data file (source=jsonl), relative paths resolved against the recipe's folder."""
    if cfg.source != "jsonl":
        return None
    path = Path(cfg.path).expanduser()
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path


def make_id(task_name: str, question: str) -> str:
    return hashlib.sha256(f"{task_name}\n{question}".encode()).hexdigest()[:16]


def load_task(cfg: TaskConfig, base_dir=None) -> Task:
    """Build the task's examples and split them; duplicates of a question never cross splits."""
    if cfg.source == "reasoning_gym":
        from distill.tasks.reasoning_gym import VERIFIER, examples
    else:
        from distill.tasks.jsonl import VERIFIER, examples
    need = cfg.train_size + cfg.eval_size + cfg.few_shot
    pool = _distinct(examples(cfg, need, base_dir))
    random.Random(cfg.seed).shuffle(pool)
    if len(pool) < need:
        raise DistillError(
            f"task: only {len(pool)} distinct examples for train_size + eval_size + few_shot = {need}"
        )
    held_out = pool[: cfg.eval_size]
    shots = pool[cfg.eval_size : cfg.eval_size + cfg.few_shot]
    train = pool[cfg.eval_size + cfg.few_shot : need]
    name = cfg.name if cfg.source == "reasoning_gym" else task_file(cfg, base_dir).name
    return Task(name, VERIFIER, train, held_out, shots)


def _distinct(items: list[Example]) -> list[Example]:
    seen, out = set(), []
    for ex in items:
        if ex.id not in seen:
            seen.add(ex.id)
            out.append(ex)
    return out


def teacher_messages(task: Task, ex: Example, system: str | None = None) -> list[dict]:
    """The chat sent to the teacher: optional system turn, few-shot demonstrations as prior turns."""
    msgs = [{"role": "system", "content": system}] if system else []
    for shot in task.shots:
        msgs += [{"role": "user", "content": shot.question}, {"role": "assistant", "content": shot.answer}]
    return msgs + [{"role": "user", "content": ex.question}]


def student_messages(question: str, system: str | None = None) -> list[dict]:
    """The chat the student sees: the bare question. Demonstrations are the teacher's crutch; the
    student learns to answer without them, which is also what makes it cheaper per answer."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}]
