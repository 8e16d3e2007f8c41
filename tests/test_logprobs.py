"""Top-k logprob shards: round trip, atomic flush, resume numbering, bad references."""

import numpy as np
import pytest

from distill.logprobs import ShardReader, ShardWriter, TopK, bytes_per_token, next_shard_index


def _topk(t: int, k: int, seed: int) -> TopK:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(t, 100))
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-lp, axis=-1)[:, :k]
    return TopK(ids[:, 0], ids, np.take_along_axis(lp, ids, -1))


def test_round_trip_across_shards(tmp_path):
    w = ShardWriter(tmp_path, max_tokens=10)
    items = [_topk(t, 5, s) for s, t in enumerate([3, 8, 1, 6])]
    refs = []
    for item in items:
        refs.append(w.add(item))
        if w.full:
            w.flush()
    w.flush()
    assert next_shard_index(tmp_path / "logprobs") == 2
    reader = ShardReader(tmp_path)
    for item, ref in zip(items, refs, strict=True):
        got = reader.read(ref)
        np.testing.assert_array_equal(got.token_ids, item.token_ids)
        np.testing.assert_array_equal(got.ids, item.ids)
        np.testing.assert_allclose(got.logprobs.astype(np.float32), item.logprobs.astype(np.float32))
    assert bytes_per_token(20) == 124


def test_resume_starts_a_new_shard_and_ignores_tmp(tmp_path):
    w = ShardWriter(tmp_path)
    w.add(_topk(4, 3, 0))
    w.flush()
    (tmp_path / "logprobs" / "shard-00001.safetensors.tmp").write_bytes(b"torn")
    w2 = ShardWriter(tmp_path)
    ref = w2.add(_topk(2, 3, 1))
    assert ref["shard"] == "logprobs/shard-00001.safetensors"
    w2.flush()
    assert ShardReader(tmp_path).read(ref).ids.shape == (2, 3)


def test_bad_references(tmp_path):
    w = ShardWriter(tmp_path)
    ref = w.add(_topk(2, 3, 0))
    w.flush()
    r = ShardReader(tmp_path)
    with pytest.raises(ValueError, match="not a shard"):
        r.read({**ref, "shard": "../etc/passwd"})
    with pytest.raises(FileNotFoundError, match="missing"):
        r.read({**ref, "shard": "logprobs/shard-00009.safetensors"})
    with pytest.raises(ValueError, match="k=3"):
        r.read({**ref, "k": 4})
    with pytest.raises(ValueError, match="shapes disagree"):
        TopK(np.zeros(3), np.zeros((2, 3)), np.zeros((2, 3)))
