import json

import pytest

from conftest import run_cli
from distill.tasks import Example
from distill.verifiers import VERIFIERS, check, extract_answer


@pytest.mark.parametrize("completion, answer", [
    ("57", "57"), ("57.", "57"), ("The answer is 57.", "57"), (r"so \boxed{57}", "57"),
    ("<answer>57</answer>", "57"), ("  57\nbecause 50 + 7", "57"),
])
def test_extract_answer(completion, answer):
    assert extract_answer(completion) == answer


def test_number_and_exact():
    ex = Example("x", "What is 2 + 3?", "5")
    assert VERIFIERS["number"](ex, "The answer is 5.").passed
    assert not VERIFIERS["number"](ex, "6").passed
    assert not VERIFIERS["number"](ex, "five").passed
    assert VERIFIERS["exact"](Example("x", "q", "Paris"), " paris ").passed
    assert not VERIFIERS["exact"](Example("x", "q", "Paris"), "Paris, France").passed


def test_reasoning_gym_uses_the_task_scorer():
    from distill.config import TaskConfig
    from distill.tasks import load_task

    task = load_task(TaskConfig(train_size=0, eval_size=3))
    ex = task.eval[0]
    assert VERIFIERS["reasoning_gym"](ex, ex.answer).passed
    assert not VERIFIERS["reasoning_gym"](ex, ex.answer + "1").passed


def test_truncated_and_failed_are_rejected_with_their_reason():
    ex = Example("x", "q", "5")
    assert check("number", ex, "5", "length").detail == "truncated (finish_reason=length)"
    assert not check("number", ex, "5", "error").passed
    assert check("number", ex, "5", "stop").passed


def test_verify_cli_splits_kept_and_rejected(tiny_recipe, tmp_path):
    from distill.config import load_recipe
    from distill.tasks import load_task

    r = load_recipe(tiny_recipe)
    task = load_task(r.task, r.path.parent)
    traces = tmp_path / "run" / "01_generate" / "traces.jsonl"
    traces.parent.mkdir(parents=True)
    rows = []
    for ex in task.train:
        for text, fin in ((ex.answer, "stop"), (ex.answer, "stop"), ("0", "stop"), (ex.answer, "length")):
            rows.append({"id": f"{ex.id}{len(rows)}", "prompt_id": ex.id, "completion": text, "finish_reason": fin,
                         "messages": [], "teacher": {"model": "t", "revision": "r"}})
    traces.write_text("".join(json.dumps(x) + "\n" for x in rows))

    res = run_cli("verify", tiny_recipe, "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "run" / "02_verify"
    kept = [json.loads(x) for x in (out / "kept.jsonl").read_text().splitlines()]
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(kept) == len(task.train)  # one per prompt: the second right answer is a duplicate
    assert all(k["verdict"]["passed"] and k["verdict"]["verifier"] == "number" for k in kept)
    report = json.loads((out / "report.json").read_text())
    assert report["rejection_reasons"] == {"duplicate of a kept completion": 4, "wrong answer": 4,
                                           "truncated (finish_reason=length)": 4}
    assert len(rejected) == 12 and (out / "config.yaml").is_file() and (out / "meta.json").is_file()
