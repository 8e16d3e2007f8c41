"""The teacher's top-k logprobs, stored beside traces.jsonl in compact shards, and read back for training.

Layout (in the generate stage directory):

    01_generate/traces.jsonl              each record with logprobs: {"logprobs_ref": {...}}
    01_generate/logprobs/shard-00000.safetensors
        token_ids  int32   (T,)     the token the teacher sampled at each completion position; a sample that
                                    stopped on an end token (llamacpp, hf) ends with that token and its row,
                                    one row more than its usage.completion_tokens
        ids        int32   (T, k)   the teacher's top-k token ids at that position, best first
        logprobs   float16 (T, k)   their log-probabilities (natural log, temperature 1 unless noted)

Shards hold many records, one after another; a record points at its rows with
`{"shard": "logprobs/shard-00000.safetensors", "offset": 120, "length": 16, "k": 20}`.
That is 4 + 6k bytes per completion token (k=20: 124 B/token; 1 M tokens ≈ 124 MB).

Crash safety: a shard is written whole (temporary file, then rename) *before* the records that point
into it are appended to traces.jsonl, so every reference on disk is valid. A crash loses at most the
buffered records, which are not counted as done and are generated again; an orphan shard (written, but
its records never appended) is unreferenced and harmless. Shards are never rewritten: a resumed run
starts a new shard after the highest number present.

Why safetensors and not numpy/pickle: it loads with no code execution and memory-maps, so a trainer
can read one record's rows without reading the shard.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARD_DIR = "logprobs"
_SHARD_RE = re.compile(r"shard-(\d{5,})\.safetensors$")


@dataclass
class TopK:
    """One completion's teacher distribution, as stored: `token_ids` (T,), `ids` (T, k), `logprobs` (T, k)."""

    token_ids: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray

    def __post_init__(self):
        self.token_ids = np.asarray(self.token_ids, dtype=np.int32).reshape(-1)
        self.ids = np.asarray(self.ids, dtype=np.int32)
        self.logprobs = np.asarray(self.logprobs, dtype=np.float16)
        t = len(self.token_ids)
        if self.ids.ndim != 2 or self.ids.shape[0] != t or self.logprobs.shape != self.ids.shape:
            raise ValueError(f"top-k shapes disagree: token_ids {self.token_ids.shape}, ids {self.ids.shape}, "
                             f"logprobs {self.logprobs.shape}")

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return len(self.token_ids)


def bytes_per_token(k: int) -> int:
    """Bytes on disk per completion token: int32 sampled id + k × (int32 id + float16 logprob)."""
    return 4 + 6 * k


class ShardWriter:
    """Buffers TopK rows and writes them as shards. `add()` returns the reference a record will carry;
    the caller appends those records only after `flush()` (which `add()` calls when the buffer is full)
    has returned, and `pending()` tells which references are not yet on disk."""

    def __init__(self, stage_dir: Path, max_tokens: int = 1 << 18):
        self.dir = Path(stage_dir) / SHARD_DIR
        self.max_tokens = max_tokens
        self._rows: list[TopK] = []
        self._tokens = 0
        self._k: int | None = None
        self._next = next_shard_index(self.dir)

    def add(self, topk: TopK) -> dict:
        """Buffer one completion's rows; return its reference (valid once the buffer is flushed)."""
        if self._k is not None and topk.k != self._k:
            # One k per shard keeps the tensors rectangular; a new k starts a new shard.
            self.flush()
        self._k = topk.k
        ref = {"shard": f"{SHARD_DIR}/shard-{self._next:05d}.safetensors", "offset": self._tokens,
               "length": len(topk), "k": topk.k}
        self._rows.append(topk)
        self._tokens += len(topk)
        return ref

    @property
    def full(self) -> bool:
        return self._tokens >= self.max_tokens

    def pending(self) -> int:
        return len(self._rows)

    def flush(self) -> Path | None:
        """Write the buffered rows as one shard (atomically); return its path, or None if empty."""
        if not self._rows:
            return None
        from safetensors.numpy import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"shard-{self._next:05d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file({"token_ids": np.concatenate([r.token_ids for r in self._rows]),
                   "ids": np.concatenate([r.ids for r in self._rows]),
                   "logprobs": np.concatenate([r.logprobs for r in self._rows])}, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._rows, self._tokens, self._k = [], 0, None
        self._next += 1
        return path


def next_shard_index(shard_dir: Path) -> int:
    """One past the highest shard number in `shard_dir` (0 when there is none). Leftover .tmp files
    of a crashed write are ignored and overwritten."""
    numbers = [int(m.group(1)) for p in Path(shard_dir).glob("shard-*.safetensors")
               if (m := _SHARD_RE.search(p.name))]
    return max(numbers, default=-1) + 1


class ShardReader:
    """Reads records' rows back, keeping shards open (memory-mapped) between calls.

        reader = ShardReader(run_dir / "01_generate")
        topk = reader.read(record["logprobs_ref"])   # TopK with (T,), (T, k), (T, k)
    """

    def __init__(self, stage_dir: Path):
        self.dir = Path(stage_dir)
        self._open: dict[str, object] = {}

    def read(self, ref: dict) -> TopK:
        from safetensors import safe_open

        name = ref["shard"]
        if "/" in name.replace(f"{SHARD_DIR}/", "", 1) or ".." in name:
            raise ValueError(f"logprobs_ref.shard: '{name}' is not a shard of this directory")
        if name not in self._open:
            path = self.dir / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: logprobs shard missing (referenced by a trace)")
            self._open[name] = safe_open(str(path), framework="np")
        f = self._open[name]
        a, b = int(ref["offset"]), int(ref["offset"]) + int(ref["length"])
        topk = TopK(f.get_slice("token_ids")[a:b], f.get_slice("ids")[a:b], f.get_slice("logprobs")[a:b])
        if topk.k != int(ref["k"]):
            raise ValueError(f"{self.dir / name}: k={topk.k}, but the trace says k={ref['k']}")
        return topk
