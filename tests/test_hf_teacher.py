"""The transformers teacher: rows of several requests in one left-padded batch, a seed per row, top-k."""

import numpy as np
import pytest

from distill.teachers import Request, Sampling


@pytest.fixture(scope="module")
def teacher(tiny_model):
    from distill.models import resolve
    from distill.teachers.hf import HFTeacher

    return HFTeacher(resolve(str(tiny_model)), concurrency=3)


def _chat(text):
    return [{"role": "user", "content": text}]


def test_requests_spanning_batches_come_back_whole_and_once(teacher):
    reqs = [Request(str(i), _chat("hi " * (i + 1)), [i, i + 10]) for i in range(4)]  # 8 rows, batches of 3
    out = [(r.key, comps) for r, comps in teacher.stream(reqs, Sampling(temperature=1.0, max_tokens=5))]
    assert sorted(k for k, _ in out) == ["0", "1", "2", "3"]
    assert all(len(comps) == 2 and all(c.completion_tokens <= 5 for c in comps) for _, comps in out)


def test_a_sample_follows_its_own_seed(teacher):
    warm = Sampling(temperature=1.0, max_tokens=6)
    a = [c.text for c in teacher.complete(_chat("hello"), [1, 2, 3], warm)]
    b = [c.text for c in teacher.complete(_chat("hello"), [1, 2, 3], warm)]
    assert a == b and len(set(a)) > 1  # a random tiny model: three seeds, not one text


def test_top_k_logprobs_per_completion_token(teacher):
    c = teacher.complete(_chat("hello"), [0], Sampling(temperature=0.0, max_tokens=6, logprobs=4))[0]
    tk = c.topk
    rows = c.completion_tokens + (c.finish_reason == "stop")  # a stop on EOS keeps the EOS row
    assert tk.ids.shape == (rows, 4) and (tk.token_ids == tk.ids[:, 0]).all()  # greedy = top 1
    lp = tk.logprobs.astype(np.float64)
    assert (lp[:, :-1] >= lp[:, 1:]).all() and (np.logaddexp.reduce(lp, axis=1) <= 1e-3).all()


def test_a_sample_stopped_by_eos_keeps_the_eos_row(teacher, monkeypatch):
    """Make the greedy answer's first new token (j) the EOS: j tokens of text, j + 1 rows of top-k."""
    greedy = Sampling(temperature=0.0, max_tokens=6, logprobs=4)
    free = teacher.complete(_chat("hello"), [0], greedy)[0].topk.token_ids.tolist()
    j = max((i for i, t in enumerate(free) if t not in free[:i]), default=0)  # the last first occurrence
    monkeypatch.setattr(teacher, "eos", {free[j]})
    c = teacher.complete(_chat("hello"), [0], greedy)[0]
    assert c.finish_reason == "stop" and c.completion_tokens == j
    assert c.topk.token_ids.tolist() == free[:j + 1] and c.topk.ids.shape == (j + 1, 4)
