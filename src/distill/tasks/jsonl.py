"""File tasks: a `.jsonl` or `.parquet` file, one example per row, in either of two shapes:

- `{"prompt": "...", "answer": "...", "tests": [...]?, "entry_point": "..."?, "choices": [...]?}`: tests are
  a list of assertions or one test script, run by the code verifier;
- OpenAI chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`: the turns up
  to the last user turn are the prompt, a final assistant turn the answer (or an `answer` field).

The default verifier is `code` when rows carry tests, else `exact`.
"""

from __future__ import annotations

import json

from distill.config import DistillError, TaskConfig
from distill.tasks import Example, make_id, task_file

VERIFIER = "exact"


def examples(cfg: TaskConfig, need: int, base_dir=None) -> list[Example]:
    path = task_file(cfg, base_dir)
    if not path.is_file():
        raise DistillError(f"task.path: {path}: no such file")
    out = [_example(path, n, row) for n, row in _rows(path)]
    if not out:
        raise DistillError(f"task.path: {path} has no examples")
    return out


def default_verifier(examples: list[Example]) -> str:
    return "code" if any(ex.entry.get("tests") for ex in examples) else VERIFIER


def _rows(path):
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            yield from enumerate(pq.read_table(path).to_pylist(), 1)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DistillError(f"task.path: {path}: not a readable Parquet file ({e})") from None
        return
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DistillError(f"task.path: {path} line {n}: not JSON ({e.msg})") from None


def _example(path, n: int, row) -> Example:
    where = f"task.path: {path} {'row' if path.suffix == '.parquet' else 'line'} {n}"
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        return _chat_example(where, path, row)
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "answer" not in row:
        raise DistillError(f"{where}: expected an object with 'prompt' and 'answer' (or OpenAI 'messages')")
    tests = row.get("tests")
    if tests is not None and not (isinstance(tests, str) or (isinstance(tests, list)
                                                             and all(isinstance(t, str) for t in tests))):
        raise DistillError(f"{where}: 'tests' must be a string or a list of strings")
    return Example(make_id(path.name, row["prompt"]), row["prompt"], str(row["answer"] or ""), row)


def _chat_example(where: str, path, row: dict) -> Example:
    msgs = row["messages"]
    if not msgs or not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                           and isinstance(m.get("content"), str) for m in msgs):
        raise DistillError(f"{where}: 'messages' must be a list of {{role: system|user|assistant, content}}")
    prompt, answer = (msgs[:-1], msgs[-1]["content"]) if msgs[-1]["role"] == "assistant" else (msgs, None)
    answer = answer if answer is not None else row.get("answer")
    if not prompt or prompt[-1]["role"] != "user" or answer is None:
        raise DistillError(f"{where}: expected messages ending in a user turn and an assistant answer "
                           "(or an 'answer' field)")
    question = prompt[-1]["content"]
    key = question if len(prompt) == 1 else json.dumps(prompt, sort_keys=True)
    return Example(make_id(path.name, key), question, str(answer), {**row, "prompt_messages": prompt})
