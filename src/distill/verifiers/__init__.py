"""Verifiers: plain functions `(example, completion) -> Verdict`, picked by name from `VERIFIERS`.

The same table filters traces (`distill verify`) and scores models (`distill evaluate`), so the filter
and the benchmark can never disagree.

    python -c "from distill.verifiers import VERIFIERS; from distill.tasks import Example; \
print(VERIFIERS['math'](Example('x', 'Half of 1?', r'\\frac{1}{2}'), 'So the answer is 0.5.'))"

| name | passes when |
|---|---|
| exact | the extracted answer equals the reference, ignoring case and spaces |
| normalized | equal after SQuAD normalization (punctuation, articles) |
| regex | the extracted answer fully matches the row's `pattern` (else the answer as a pattern) |
| multiple_choice | the chosen letter is the reference letter (or the reference among `choices`) |
| number | the last number in the extracted answer equals the reference |
| math | math-verify finds the extracted answer equal to the reference (fractions, LaTeX, sets, units) |
| code | the completion's code passes the row's tests in the sandbox (`sandbox.py`) |
| reasoning_gym | the reasoning-gym task's own `score_answer` gives full marks |
| format | the completion is well formed (see `check`) |
"""

from __future__ import annotations

from distill.tasks import Example
from distill.verifiers.answers import Verdict, extract_answer, fail
from distill.verifiers.code import code
from distill.verifiers.format import format_, format_problem, without_thinking
from distill.verifiers.math import math
from distill.verifiers.text import exact, multiple_choice, normalized, number, regex

__all__ = ["VERIFIERS", "Verdict", "check", "extract_answer"]


def reasoning_gym(ex: Example, completion: str) -> Verdict:
    """The task's own `score_answer` on the extracted answer; passed only at full score."""
    from reasoning_gym import get_score_answer_fn

    if "source_dataset" not in (ex.entry.get("metadata") or {}):
        return fail("not a reasoning-gym example", "the reasoning_gym verifier needs a reasoning-gym task")
    got = extract_answer(completion)
    score = float(get_score_answer_fn(ex.entry["metadata"]["source_dataset"])(got, ex.entry))
    detail = f"extracted {got!r}, expected {ex.answer!r}"
    return Verdict(True, score, detail) if score >= 1.0 else Verdict(False, score, detail, "wrong answer")


VERIFIERS = {"exact": exact, "normalized": normalized, "regex": regex, "multiple_choice": multiple_choice,
             "number": number, "math": math, "code": code, "reasoning_gym": reasoning_gym, "format": format_}
# Verifiers that wait on a subprocess rather than compute: `distill verify` runs several at once.
CONCURRENT = {"code"}


def check(verifier: str, ex: Example, completion: str, finish_reason: str = "stop", reasoning: str | None = None,
          require_tags: tuple[str, ...] = ()) -> Verdict:
    """Run a verifier after the format checks: truncated (`finish_reason == "length"`) or failed generations
    are rejected first (their answers are unreliable), then an unclosed `<think>`, a missing required tag
    or an empty answer. The verifier sees the completion without its `<think>…</think>` reasoning."""
    if finish_reason == "length":
        return fail("truncated", "truncated (finish_reason=length)")
    if finish_reason == "error":
        return fail("generation failed")
    problem = format_problem(completion or "", reasoning, tuple(require_tags))
    if problem:
        return fail(problem)
    return VERIFIERS[verifier](ex, without_thinking(completion))
