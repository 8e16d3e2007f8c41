"""The format verifier: reasoning tags closed, required tags present, an answer after the reasoning."""

from __future__ import annotations

import re

from distill.tasks import Example
from distill.verifiers.answers import Verdict, fail

_THINK = re.compile(r"<think>.*?</think>", re.I | re.S)


def format_problem(completion: str, reasoning: str | None = None, require_tags: tuple[str, ...] = ()) -> str | None:
    """What is wrong with the completion's form, or None. `reasoning` is the trace's separate reasoning
    (generate moves a closed `<think>…</think>` there), which counts as a closed `think` tag."""
    text = completion
    opened = len(re.findall(r"<think>", text, re.I))
    if opened > len(re.findall(r"</think>", text, re.I)):
        return "unclosed <think>"
    for tag in require_tags:
        if tag == "think" and reasoning:
            continue
        if not re.search(rf"<{tag}>.*?</{tag}>", text, re.I | re.S):
            return f"missing <{tag}>…</{tag}>"
    if not without_thinking(text).strip():
        return "no answer"
    return None


def without_thinking(completion: str) -> str:
    """The completion after its closed `<think>…</think>` blocks: the answer part."""
    return _THINK.sub("", completion).lstrip()


def format_(ex: Example, completion: str) -> Verdict:
    """Passes any completion whose form is right (for tasks without reference answers)."""
    problem = format_problem(completion)
    return fail(problem) if problem else Verdict(True, 1.0, "well formed")
