"""Verifiers: plain functions `(example, completion) -> Verdict`, picked by name from `VERIFIERS`.

The same table filters traces (`distill verify`) and scores models (`distill evaluate`), so the filter
and the benchmark can never disagree.

    python -c "from distill.verifiers import VERIFIERS; from distill.tasks import Example; \
print(VERIFIERS['number'](Example('x', 'Calculate 2 + 3.', '5'), 'The answer is 5.'))"
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from distill.tasks import Example


@dataclass
class Verdict:
    passed: bool
    score: float
    detail: str  # why: the extracted answer, or the reason for rejection

    def as_dict(self, verifier: str) -> dict:
        return {"verifier": verifier, **asdict(self)}


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"answer is[:\s]*([^\n]+)", re.I)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(completion: str) -> str:
    """The final answer in a completion: `<answer>…</answer>`, `\\boxed{…}`, "the answer is …", else
    the first non-empty line. Trailing sentence punctuation is dropped ("57." → "57")."""
    text = completion.strip()
    for pattern in (_ANSWER_TAG, _BOXED, _ANSWER_IS):
        found = pattern.findall(text)
        if found:
            text = found[-1]
            break
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    return line.strip().rstrip(".!").strip()


def exact(ex: Example, completion: str) -> Verdict:
    """Case- and whitespace-insensitive equality of the extracted answer with the reference."""
    got = extract_answer(completion)
    ok = " ".join(got.lower().split()) == " ".join(ex.answer.strip().lower().split())
    return Verdict(ok, float(ok), f"extracted {got!r}, expected {ex.answer!r}")


def number(ex: Example, completion: str) -> Verdict:
    """Numeric equality of the last number in the extracted answer with the reference."""
    got = _NUMBER.findall(extract_answer(completion))
    want = _NUMBER.findall(ex.answer)
    if not got:
        return Verdict(False, 0.0, "no number in the answer")
    ok = bool(want) and abs(float(got[-1]) - float(want[-1])) < 1e-9
    return Verdict(ok, float(ok), f"extracted {got[-1]}, expected {ex.answer!r}")


def reasoning_gym(ex: Example, completion: str) -> Verdict:
    """The task's own `score_answer` on the extracted answer; passed only at full score."""
    from reasoning_gym import get_score_answer_fn

    got = extract_answer(completion)
    score = float(get_score_answer_fn(ex.entry["metadata"]["source_dataset"])(got, ex.entry))
    return Verdict(score >= 1.0, score, f"extracted {got!r}, expected {ex.answer!r}")


VERIFIERS = {"exact": exact, "number": number, "reasoning_gym": reasoning_gym}


def check(verifier: str, ex: Example, completion: str, finish_reason: str) -> Verdict:
    """Run a verifier, rejecting truncated or failed generations first (their answers are unreliable)."""
    if finish_reason == "length":
        return Verdict(False, 0.0, "truncated (finish_reason=length)")
    if finish_reason == "error":
        return Verdict(False, 0.0, "generation failed")
    return VERIFIERS[verifier](ex, completion)
