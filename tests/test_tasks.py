import pytest

from distill.config import DistillError, TaskConfig
from distill.tasks import load_task, student_messages, teacher_messages

ADDITION = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+"],
            "allow_parentheses": False, "allow_negation": False}


def test_splits_are_disjoint_and_deterministic():
    cfg = TaskConfig(params=ADDITION, train_size=300, eval_size=100, few_shot=5, seed=0)
    task = load_task(cfg)
    questions = [{e.question for e in split} for split in (task.train, task.eval, task.shots)]
    assert [len(q) for q in questions] == [300, 100, 5]
    assert not (questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2])
    assert [e.id for e in load_task(cfg).eval] == [e.id for e in task.eval]
    assert [e.id for e in load_task(TaskConfig(params=ADDITION, seed=1)).eval] != [e.id for e in task.eval]


def test_too_few_distinct_examples_is_an_error():
    one_digit = {**ADDITION, "max_digits": 1}  # at most 100 distinct questions
    with pytest.raises(DistillError, match="distinct examples"):
        load_task(TaskConfig(params=one_digit, train_size=200, eval_size=100))


def test_bad_params_name_the_field():
    with pytest.raises(DistillError, match="task.params"):
        load_task(TaskConfig(params={"no_such_param": 1}))


def test_prompts_teacher_gets_demonstrations_student_does_not(prompts_file):
    task = load_task(TaskConfig(source="jsonl", path=str(prompts_file), train_size=2, eval_size=2, few_shot=2))
    ex = task.eval[0]
    msgs = teacher_messages(task, ex, system="Be brief.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"] == task.shots[0].answer and msgs[-1]["content"] == ex.question
    assert student_messages(ex.question) == [{"role": "user", "content": ex.question}]


def test_jsonl_relative_path_and_errors(prompts_file):
    task = load_task(TaskConfig(source="jsonl", path=prompts_file.name, train_size=3, eval_size=2),
                     base_dir=prompts_file.parent)
    assert task.name == "sums.jsonl" and task.default_verifier == "exact"
    prompts_file.write_text("not json\n")
    with pytest.raises(DistillError, match="sums.jsonl line 1: not JSON"):
        load_task(TaskConfig(source="jsonl", path=str(prompts_file)))
