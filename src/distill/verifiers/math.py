"""The math verifier: extract the final answer, then decide equivalence with math-verify.

    python -c "from distill.verifiers.math import equivalent; print(equivalent(r'\\frac{1}{2}', '0.5'))"

Extraction: `<answer>…</answer>`, the last `\\boxed{…}`, "the answer is …", else the last number in the
text. Equivalence: plain numbers ("0.5", "1/2", "1,000", "\\frac{3}{4}") are compared exactly as fractions
without sympy (most answers, and ~1000x faster; unequal decimals still go to math-verify, which accepts
0.333333 for 1/3 by rounding to 6 digits); anything else goes to math-verify, which parses LaTeX and plain
expressions into sympy and compares values, sets, intervals, equations and units.

math-verify bounds its parsing and comparison with `signal.alarm`, which only works in a process's main
thread (elsewhere it raises). So the main thread calls it directly, with its timeouts; any other
thread (a server, a thread pool) sends the work to a one-process pool whose worker runs it in its own
main thread, and gives up after `_POOL_TIMEOUT_S` (killing that worker) if even that hangs.
"""

from __future__ import annotations

import functools
import multiprocessing
import re
import threading
from fractions import Fraction

from distill.tasks import Example
from distill.verifiers.answers import NUMBER, Verdict, fail, marked_answer
from distill.verifiers.text import to_number

_TIMEOUT_S = 5  # math-verify's own limit, per parse and per comparison
_POOL_TIMEOUT_S = 30
_pool = None
_pool_lock = threading.Lock()


def math_answer(completion: str) -> str | None:
    """The final answer: a marked one, else the last number in the text."""
    marked = marked_answer(completion)
    if marked:
        return marked.strip().rstrip(".").strip().strip("$").strip()
    numbers = NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def math(ex: Example, completion: str) -> Verdict:
    """The extracted answer is mathematically equal to the reference (`0.5` = `\\frac{1}{2}` = `1/2`)."""
    got = math_answer(completion)
    if not got:
        return fail("no answer", "no final answer found")
    detail = f"extracted {got!r}, expected {ex.answer!r}"
    return Verdict(True, 1.0, detail) if equivalent(ex.answer, got) else fail("wrong answer", detail)


_FRAC = re.compile(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}")


def rational(text: str) -> Fraction | None:
    """A plain number or a LaTeX fraction of integers ("\\frac{3}{4}", "-\\dfrac{1}{2}") as an exact fraction."""
    text = text.strip().strip("$").strip()
    m = _FRAC.fullmatch(text)
    if m:
        sign, num, den = m.groups()
        return None if int(den) == 0 else Fraction(int(num), int(den)) * (-1 if sign else 1)
    return to_number(text)


def equivalent(gold: str, answer: str) -> bool:
    """True when `answer` equals `gold`; safe to call from any thread."""
    a, b = rational(gold), rational(answer)
    if a is not None and b is not None and (a == b or "." not in gold + answer):
        return a == b  # exact; a decimal that differs may still be a rounding math-verify accepts
    if _clean(gold) == _clean(answer):
        return True
    if threading.current_thread() is threading.main_thread():
        return _math_verify(gold, answer)
    return _in_worker(gold, answer)


def _clean(text: str) -> str:
    return "".join(text.split()).strip("$").rstrip(".")


@functools.lru_cache(maxsize=8192)
def _parse(text: str):
    from math_verify import parse

    # Boxed, so that math-verify reads the whole string as the answer rather than searching it for one.
    return parse(f"\\boxed{{{text}}}", parsing_timeout=_TIMEOUT_S)


def _math_verify(gold: str, answer: str) -> bool:
    """Main thread only (signal-based timeouts)."""
    from math_verify import verify

    g, a = _parse(gold), _parse(answer)
    return bool(g and a and verify(g, a, timeout_seconds=_TIMEOUT_S))


def _in_worker(gold: str, answer: str) -> bool:
    global _pool
    with _pool_lock:
        if _pool is None:
            # spawn, not fork: forking a process that has threads can copy a held lock into the child.
            _pool = multiprocessing.get_context("spawn").Pool(1)
        pending = _pool.apply_async(_math_verify, (gold, answer))
        try:
            return pending.get(_POOL_TIMEOUT_S)
        except multiprocessing.TimeoutError:
            _pool.terminate()
            _pool = None
            return False
