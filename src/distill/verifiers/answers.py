"""The verdict record and final-answer extraction, shared by every answer verifier."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass


@dataclass
class Verdict:
    passed: bool
    score: float  # 1.0 right, 0.0 wrong; in between for partial credit (tests passed, a task's own score)
    detail: str  # why: the extracted answer, or the reason for rejection
    reason: str = ""  # for a failure, a short category that reports count: "wrong answer", "tests failed", …

    def as_dict(self, verifier: str) -> dict:
        return {"verifier": verifier, **asdict(self)}


def fail(reason: str, detail: str = "") -> Verdict:
    return Verdict(False, 0.0, detail or reason, reason)


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_ANSWER_IS = re.compile(r"answer is[:\s]*([^\n]+)", re.I)
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def boxed(text: str) -> str | None:
    """The content of the last `\\boxed{…}` (or `\\fbox{…}`), braces balanced: `\\boxed{\\frac{1}{2}}` →
    `\\frac{1}{2}`. Written by hand because a regular expression cannot match nested braces."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unclosed: truncated


def marked_answer(completion: str) -> str | None:
    """An answer the completion marks as final: `<answer>…</answer>`, `\\boxed{…}`, "the answer is …"."""
    found = _ANSWER_TAG.findall(completion)
    if found:
        return found[-1].strip()
    box = boxed(completion)
    if box is not None:
        return box.strip()
    found = _ANSWER_IS.findall(completion)
    return found[-1].strip() if found else None


def extract_answer(completion: str) -> str:
    """The final answer in a completion: `<answer>…</answer>`, `\\boxed{…}`, "the answer is …", else
    the first non-empty line. Trailing sentence punctuation is dropped ("57." → "57")."""
    text = marked_answer(completion)
    text = completion if text is None else text
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    return line.strip().rstrip(".!").strip()
