"""Verifiers: hand-checked math equivalences, text and multiple-choice answers, the format checks, code
assembly, and HumanEval's canonical solutions (pass) against the same solutions with a bug (fail)."""

import ast
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from distill.tasks import Example
from distill.verifiers import VERIFIERS, check
from distill.verifiers.code import assemble
from distill.verifiers.math import equivalent, math_answer


@pytest.mark.parametrize("gold, answer, same", [
    ("1/2", "0.5", True), (r"\frac{1}{2}", "0.5", True), (r"\frac12", "1/2", True), (r"\dfrac{3}{4}", "0.75", True),
    (r"\frac{1}{3}", "0.33", False), ("2/4", "1/2", True), ("1,000", "1000", True), ("-3", "-3.0", True),
    (r"\{1, 2, 3\}", r"\{3, 2, 1\}", True), (r"\{1, 2\}", r"\{1, 3\}", False),
    ("10", r"10\text{ cm}", True), ("5", r"5\text{ meters}", True), ("7", r"8\text{ cm}", False),
    (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}", True), (r"\frac{\pi}{2}", r"\pi/2", True), ("x = 5", "5", True),
    ("50\\%", "0.5", True), ("3", "4", False), ("(1, 2)", "(2, 1)", False),
])
def test_math_verify_agrees_with_hand_checked_cases(gold, answer, same):
    assert equivalent(gold, answer) is same


@pytest.mark.parametrize("completion, answer", [
    (r"so the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"), ("<answer>0.5</answer>", "0.5"),
    ("The answer is $42$.", "42"), ("3 apples and 4 pears make 7", "7"), ("no digits", None),
])
def test_math_answer_extraction(completion, answer):
    assert math_answer(completion) == answer


def test_math_verifier_from_another_thread_matches_the_main_thread():
    ex = Example("x", "Half of one?", r"\frac{1}{2}")
    texts = [r"\boxed{0.5}", r"\boxed{\frac{2}{4}}", r"\boxed{\frac{1}{3}}", "The answer is 1/2"]
    main = [VERIFIERS["math"](ex, t).passed for t in texts]
    assert main == [True, True, False, True]
    out = []
    thread = threading.Thread(target=lambda: out.extend(VERIFIERS["math"](ex, t).passed for t in texts))
    thread.start()
    thread.join()
    assert out == main


def test_text_verifiers():
    ex = Example("x", "q", "The Eiffel Tower")
    assert VERIFIERS["normalized"](ex, "eiffel tower!").passed and not VERIFIERS["exact"](ex, "eiffel tower!").passed
    assert VERIFIERS["regex"](Example("x", "q", r"\d{4}-\d{2}"), "The answer is 2024-05.").passed
    assert not VERIFIERS["regex"](Example("x", "q", r"\d{4}"), "2024-05").passed
    assert VERIFIERS["regex"](Example("x", "q", "", {"pattern": "(?:paris|lyon)"}), "Paris").passed
    assert VERIFIERS["regex"](Example("x", "q", "("), "x").reason == "bad pattern"
    assert VERIFIERS["number"](Example("x", "q", "1000"), "It is 1,000.").passed


@pytest.mark.parametrize("completion, passed", [
    ("The answer is (B).", True), ("B) Paris", True), ("<answer>B</answer>", True), (r"\boxed{B}", True),
    ("I think **B** is right", True), ("The answer is (C).", False), ("Paris", False),
])
def test_multiple_choice(completion, passed):
    ex = Example("x", "Capital of France? A) Lyon B) Paris C) Nice", "B")
    assert VERIFIERS["multiple_choice"](ex, completion).passed is passed
    by_text = Example("x", "q", "Paris", {"choices": ["Lyon", "Paris", "Nice"]})
    assert VERIFIERS["multiple_choice"](by_text, completion).passed is passed


def test_format_checks_come_before_the_answer():
    ex = Example("x", "q", "5")
    assert check("number", ex, "5", "length").reason == "truncated"
    assert check("number", ex, "<think>so 2 + 3", "stop").detail == "unclosed <think>"
    assert check("number", ex, "<think>2 + 3</think>", "stop").detail == "no answer"
    assert check("number", ex, "<think>2 + 3</think> 5", "stop").passed
    assert check("number", ex, "5", "stop", require_tags=("answer",)).detail == "missing <answer>…</answer>"
    assert check("number", ex, "<answer>5</answer>", "stop", require_tags=("answer",)).passed
    assert check("number", ex, "5", "stop", reasoning="2 + 3", require_tags=("think",)).passed
    assert not check("number", ex, "5", "stop", require_tags=("think",)).passed
    assert VERIFIERS["format"](ex, "anything").passed and not VERIFIERS["format"](ex, "<think>x").passed


PROMPT = 'def add(a, b):\n    """Add two numbers."""\n'


@pytest.mark.parametrize("completion", [
    "    return a + b\n",  # a body that continues the prompt
    "return a + b",  # a body that lost its first indentation
    "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nThat adds them.",  # a whole function, fenced
    "```py\ndef helper():\n    pass\n```\n```python\ndef add(a, b):\n    return a + b\n```",  # the block with it
    "```python\ndef add(a, b):\n    return a + b\n",  # an unclosed fence
])
def test_code_from_body_or_whole_function(completion):
    ex = Example("x", "q", "", {"prompt": PROMPT, "entry_point": "add", "tests": ["assert add(1, 2) == 3"]})
    program = assemble(PROMPT, completion, "add")
    compile(program, "<p>", "exec")
    assert VERIFIERS["code"](ex, completion).passed


def test_code_partial_credit_and_failures():
    ex = Example("x", "Write add.", "", {"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 5"],
                                          "entry_point": "add"})
    v = VERIFIERS["code"](ex, "def add(a, b):\n    return a + b")
    assert not v.passed and v.score == 0.5 and v.reason == "tests failed"
    assert VERIFIERS["code"](ex, "def add(a, b) return").reason == "code error"
    assert VERIFIERS["code"](Example("x", "q", ""), "def f(): pass").reason == "no tests"


def _with_bug(program: str, entry: str) -> str:
    """The same solution with a bug: every value the function returns is off (a number by one, a string
    by a character, a list by an element, a truth value flipped)."""

    class Perturb(ast.NodeTransformer):
        def visit_Return(self, node):  # noqa: N802 - ast's naming
            if node.value is not None:
                node.value = ast.Call(ast.Name("_off", ast.Load()), [node.value], [])
            return node

    tree = ast.parse(program)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == entry:
            Perturb().visit(node)
    off = ("def _off(v):\n    if isinstance(v, bool):\n        return not v\n    if isinstance(v, (int, float)):\n"
           "        return v + 1\n    if isinstance(v, (str, list, tuple)):\n        return v + v[:1] if v else "
           "v + type(v)('x' if isinstance(v, str) else [0])\n    return None\n")
    return off + ast.unparse(ast.fix_missing_locations(tree))


@pytest.mark.slow  # 3 x 164 sandboxed runs: about 15 s on 2 cores
def test_humaneval_canonical_solutions_pass_and_bugged_ones_fail():
    from distill.tasks import task_from_spec

    problems = task_from_spec("humaneval").train
    assert len(problems) == 164
    code = VERIFIERS["code"]

    def whole(ex):
        return f"```python\n{ex.entry['prompt']}{ex.entry['canonical_solution']}```"

    def bugged(ex):
        solution = ex.entry["prompt"] + ex.entry["canonical_solution"]
        return f"```python\n{_with_bug(solution, ex.entry['entry_point'])}```"

    with ThreadPoolExecutor(4) as pool:  # each run waits on its sandbox process
        as_function = list(pool.map(lambda ex: code(ex, whole(ex)), problems))
        as_body = list(pool.map(lambda ex: code(ex, ex.entry["canonical_solution"]), problems))
        with_bug = list(pool.map(lambda ex: code(ex, bugged(ex)), problems))
    assert [ex.id for ex, v in zip(problems, as_function, strict=True) if not v.passed] == []
    assert [ex.id for ex, v in zip(problems, as_body, strict=True) if not v.passed] == []
    assert [ex.id for ex, v in zip(problems, with_bug, strict=True) if v.passed] == []
    assert {v.reason for v in with_bug} <= {"tests failed", "code error", "timeout"}
