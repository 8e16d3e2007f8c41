"""The code verifier: run the completion's code against the example's tests in the sandbox.

    python -c "from distill.tasks import Example; from distill.verifiers.code import code; \
print(code(Example('x', 'q', '', {'tests': ['assert add(1, 2) == 3'], 'entry_point': 'add'}), \
'def add(a, b):\\n    return a + b'))"

Tests come from the example's row: HumanEval's `test` (a script defining `check(candidate)`) with its
`entry_point`, or a `tests` column: a list of assertions (the score is the fraction that pass) or one
script. Code is taken from the first fenced block that defines the entry point (else the first block,
else the whole completion), and may be a whole function or only its body: HumanEval completions come
both ways. When the row's `prompt` is code (HumanEval's signature and docstring), it goes first, so its
imports and helper functions are there; a body is appended under its signature. Each sample is judged
on its own, so the verdicts feed pass@k directly.
"""

from __future__ import annotations

import re
import textwrap

from distill.sandbox import Limits, run_tests
from distill.tasks import Example
from distill.verifiers.answers import Verdict, fail

LIMITS = Limits()
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)
_REASONS = {"failed": "tests failed", "error": "code error", "timeout": "timeout", "crashed": "crashed"}


def code(ex: Example, completion: str) -> Verdict:
    """Passed when every test passes; score = the fraction of tests passed."""
    tests = ex.entry.get("test") or ex.entry.get("tests")
    if not tests:
        return fail("no tests", "the example has no `tests` (or HumanEval `test`) to run")
    entry = ex.entry.get("entry_point")
    program = assemble(code_prompt(ex), completion, entry)
    if not program.strip():
        return fail("no code", "no code in the completion")
    r = run_tests(program, tests, entry, LIMITS)
    if r.ok:
        return Verdict(True, 1.0, f"passed {r.passed}/{r.total} tests")
    return Verdict(False, r.passed / r.total if r.total else 0.0,
                   f"{r.status}: {r.detail} ({r.passed}/{r.total} tests passed)", _REASONS[r.status])


def code_prompt(ex: Example) -> str:
    """The row's prompt when it is Python (a signature to complete), else ''."""
    prompt = ex.entry.get("prompt")
    if not isinstance(prompt, str) or "def " not in prompt:
        return ""
    try:
        compile(prompt, "<prompt>", "exec")
    except SyntaxError:
        return ""
    return prompt


def extract_code(completion: str, entry: str | None = None) -> str:
    blocks = _FENCE.findall(completion)
    if not blocks:
        return completion
    defining = [b for b in blocks if entry and _defines(b, entry)]
    return (defining or blocks)[0]


def assemble(prompt: str, completion: str, entry: str | None) -> str:
    """One program from the prompt and the completion's code, whole function or body alone."""
    body = extract_code(completion, entry).rstrip()
    if not prompt or (entry and _defines(body, entry)) or (not entry and re.search(r"^def ", body, re.M)):
        return f"{prompt}\n\n{body}\n" if prompt else body + "\n"
    # A body: as given, re-indented as a block, or with only its first line indented (a completion that
    # continues the prompt often loses the indentation of its first line alone).
    lines = body.splitlines()
    candidates = [prompt + body, prompt + textwrap.indent(textwrap.dedent(body), "    "),
                  prompt + "\n".join(["    " + lines[0].lstrip()] + lines[1:]) if lines else prompt]
    for program in candidates:
        try:
            compile(program, "<completion>", "exec")
            return program + "\n"
        except SyntaxError:
            continue
    return candidates[0] + "\n"  # does not compile: the sandbox reports the error


def _defines(code: str, entry: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(entry)}\s*\(", code, re.M) is not None
