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
    need = cfg.train_size + cfg.eval_size + cfg.few_shot
    verifier, pool = _pool(cfg, need, base_dir)
    random.Random(cfg.seed).shuffle(pool)
    if len(pool) < need:
        raise DistillError(
            f"task: only {len(pool)} distinct examples for train_size + eval_size + few_shot = {need}"
        )
    held_out = pool[: cfg.eval_size]
    shots = pool[cfg.eval_size : cfg.eval_size + cfg.few_shot]
    train = pool[cfg.eval_size + cfg.few_shot : need]
    name = {"reasoning_gym": cfg.name, "humaneval": "humaneval"}.get(cfg.source) or task_file(cfg, base_dir).name
    return Task(name, verifier, train, held_out, shots)


def _pool(cfg: TaskConfig, need: int, base_dir=None) -> tuple[str, list[Example]]:
    """The task's default verifier and its distinct examples, in source order."""
    if cfg.source == "reasoning_gym":
        from distill.tasks.reasoning_gym import VERIFIER, examples
    elif cfg.source == "humaneval":
        from distill.tasks.humaneval import VERIFIER, examples
    else:
        from distill.tasks.jsonl import default_verifier, examples

        pool = _distinct(examples(cfg, need, base_dir))
        return default_verifier(pool), pool
    return VERIFIER, _distinct(examples(cfg, need, base_dir))


def task_from_spec(spec: str, overrides: dict | None = None) -> Task:
    """A task named on the command line (`distill verify --task NAME`): `humaneval`,
    `reasoning_gym:<dataset>`, or a `.jsonl` / `.parquet` file. Unless `overrides` (TaskConfig fields)
    set sizes, every example is a training example and none is held out."""
    import dataclasses

    from distill.config import check_types

    if spec == "humaneval":
        base = {"source": "humaneval"}
    elif spec.startswith("reasoning_gym:"):
        base = {"source": "reasoning_gym", "name": spec.split(":", 1)[1]}
    elif spec.endswith((".jsonl", ".json", ".parquet")) or Path(spec).is_file():
        base = {"source": "jsonl", "path": str(Path(spec).expanduser().resolve())}
    else:
        raise DistillError(f"--task {spec}: expected humaneval, reasoning_gym:<dataset> or a .jsonl/.parquet file")
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(TaskConfig)}
    for name in overrides:
        if name not in known:
            raise DistillError(f"--set task.{name}: unknown key (fields of task: {', '.join(sorted(known))})")
    check_types(TaskConfig, overrides, "task")
    if "train_size" in overrides:
        return load_task(TaskConfig(**{**base, "eval_size": 0, **overrides}))
    # Every distinct example (reasoning-gym, which has no end: those among its first 4,000), none held out
    # unless eval_size or few_shot say so.
    cfg = TaskConfig(**{**base, **overrides, "train_size": 2000, "eval_size": 0, "few_shot": 0})
    verifier, pool = _pool(cfg, 2000)
    held = overrides.get("eval_size", 0) + overrides.get("few_shot", 0)
    if held:
        return load_task(TaskConfig(**{**base, **overrides, "train_size": len(pool) - held}))
    name = {"reasoning_gym": cfg.name, "humaneval": "humaneval"}.get(cfg.source) or Path(cfg.path).name
    return Task(name, verifier, pool, [], [])


def _distinct(items: list[Example]) -> list[Example]:
    seen, out = set(), []
    for ex in items:
        if ex.id not in seen:
            seen.add(ex.id)
            out.append(ex)
    return out


def teacher_messages(task: Task, ex: Example, system: str | None = None) -> list[dict]:
    """The chat sent to the teacher: optional system turn, few-shot demonstrations as prior turns, then the
    example's own turns (a chat task's prompt messages, its system turn first; else the question)."""
    own = [dict(m) for m in ex.entry.get("prompt_messages") or [{"role": "user", "content": ex.question}]]
    if own[0]["role"] == "system":
        system, own = own[0]["content"], own[1:]
    msgs = [{"role": "system", "content": system}] if system else []
    for shot in task.shots:
        msgs += [{"role": "user", "content": shot.question}, {"role": "assistant", "content": shot.answer}]
    return msgs + own


def student_messages(question: str, system: str | None = None) -> list[dict]:
    """The chat the student sees: the bare question. Demonstrations are the teacher's crutch; the
    student learns to answer without them, which is also what makes it cheaper per answer."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}]
