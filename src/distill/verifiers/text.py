"""Answer verifiers on text: exact, normalized, regex, multiple choice, number."""

from __future__ import annotations

import re
import string
from fractions import Fraction

from distill.tasks import Example
from distill.verifiers.answers import NUMBER, Verdict, extract_answer, fail, marked_answer


def _verdict(ok: bool, got: str, want: str) -> Verdict:
    detail = f"extracted {got!r}, expected {want!r}"
    return Verdict(True, 1.0, detail) if ok else fail("wrong answer", detail)


def exact(ex: Example, completion: str) -> Verdict:
    """Case- and whitespace-insensitive equality of the extracted answer with the reference."""
    got = extract_answer(completion)
    return _verdict(" ".join(got.lower().split()) == " ".join(ex.answer.strip().lower().split()), got, ex.answer)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def normalized(ex: Example, completion: str) -> Verdict:
    """Equality after SQuAD normalization: "The Eiffel Tower." matches "eiffel tower"."""
    got = extract_answer(completion)
    return _verdict(normalize(got) == normalize(ex.answer), got, ex.answer)


def regex(ex: Example, completion: str) -> Verdict:
    """The extracted answer matches, as a whole and ignoring case, the example's `pattern` field (else its
    answer read as a regular expression)."""
    pattern = ex.entry.get("pattern") or ex.answer
    got = extract_answer(completion)
    try:
        ok = re.fullmatch(pattern, got, re.I | re.S) is not None
    except re.error as e:
        return fail("bad pattern", f"pattern {pattern!r} is not a regular expression: {e}")
    return _verdict(ok, got, pattern)


_CHOICE = re.compile(r"^\(([A-J])\)|^([A-J])(?:[.):]|$)")  # "(B) …", "B) …", "B. …", "B"; not "I think"
_CHOICE_ANYWHERE = re.compile(r"\(([A-J])\)|\b([A-J])\)|\*\*([A-J])\*\*")


def choice_letter(completion: str) -> str | None:
    """The chosen letter: from a marked answer ("the answer is (B)", `<answer>B</answer>`, `\\boxed{B}`),
    else a line that starts with one ("B) Paris"), else the last "(B)" / "B)" / "**B**" in the text."""
    marked = marked_answer(completion)
    for text in ([marked] if marked else []) + [ln.strip() for ln in completion.splitlines()]:
        m = _CHOICE.match(text.strip().strip("*").strip())
        if m:
            return m.group(1) or m.group(2)
    found = _CHOICE_ANYWHERE.findall(completion)
    return next(g for g in found[-1] if g) if found else None


def multiple_choice(ex: Example, completion: str) -> Verdict:
    """The chosen letter equals the reference: a letter, or the text of one of the example's `choices`."""
    want = ex.answer.strip().strip("()").upper()
    choices = ex.entry.get("choices") or []
    if len(want) != 1 and ex.answer in choices:
        want = "ABCDEFGHIJ"[choices.index(ex.answer)]
    got = choice_letter(completion)
    if got is None:
        return fail("no answer", "no choice letter found")
    return _verdict(got == want, got, want)


def to_number(text: str) -> Fraction | None:
    """"1,000" / "-2.5" / "3/4" as an exact fraction, or None."""
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def number(ex: Example, completion: str) -> Verdict:
    """Numeric equality of the last number in the extracted answer with the reference."""
    got = NUMBER.findall(extract_answer(completion))
    want = NUMBER.findall(ex.answer)
    if not got:
        return fail("no answer", "no number in the answer")
    ok = bool(want) and to_number(got[-1]) == to_number(want[-1])
    return _verdict(ok, got[-1], ex.answer)
