"""reasoning-gym tasks: procedural generators that ship answers and their own `score_answer`."""

from __future__ import annotations

from distill.config import DistillError, TaskConfig
from distill.tasks import Example, make_id

VERIFIER = "reasoning_gym"


def examples(cfg: TaskConfig, need: int, base_dir=None) -> list[Example]:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if cfg.name not in DATASETS:
        close = sorted(n for n in DATASETS if cfg.name.split("_")[0] in n)[:5] or sorted(DATASETS)[:5]
        raise DistillError(f"task.name: unknown reasoning-gym task '{cfg.name}' (e.g. {', '.join(close)})")
    # Generators may repeat a question; draw a larger pool so that the distinct ones suffice.
    size = max(2 * need, need + 50)
    try:
        dataset = reasoning_gym.create_dataset(cfg.name, size=size, seed=cfg.seed, **cfg.params)
    except (TypeError, AssertionError, ValueError) as e:
        raise DistillError(f"task.params: rejected by reasoning-gym '{cfg.name}': {e}") from None
    return [Example(make_id(cfg.name, e["question"]), e["question"], str(e["answer"]), dict(e)) for e in dataset]
