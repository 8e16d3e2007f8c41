"""The run directory: where each stage writes, and how a stage knows it can be skipped.

    runs/<name>/01_generate/ 02_verify/ 03_train/ 04_evaluate/ 05_export/

When it finishes, every stage writes `config.yaml` (its resolved config) and, last of all, `meta.json`, the
completion marker: it holds a fingerprint of (stage config, task config, input file hashes), so a stage
whose fingerprint matches a finished `meta.json` is skipped, and one that died before writing it runs
again (the generate stage resumes from its append-only trace file). Outputs are written to a temporary
name and renamed into place, so an interrupted stage never leaves a half file under the final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

STAGES = ("generate", "verify", "train", "evaluate", "export")
_LIBRARIES = ("distill", "torch", "transformers", "trl", "llama_cpp_python", "reasoning_gym", "gguf")


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / f"{STAGES.index(stage) + 1:02d}_{stage}"


_SHA256: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> hex digest, per process


def _sha256_key(path: Path) -> tuple[str, int, int]:
    st = Path(path).stat()
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def sha256_file(path: Path) -> str:
    """Content hash, memoised on (path, size, mtime) so a 100 MB model is hashed once per process."""
    key = _sha256_key(path)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def remember_sha256(path: Path, digest: str) -> None:
    """Tell `sha256_file` the digest of `path` as it is now, known without reading it here (hashed while it
    was written, or from a record checked against its size and mtime), so a 1 GB model is not read again."""
    _SHA256[_sha256_key(path)] = digest


def hash_inputs(paths: list[Path]) -> dict[str, str]:
    """sha256 of each input file, keyed by its name (a directory's files by `dir/relative path`), so a
    run directory that is moved or copied keeps its fingerprints. A directory's README.md is a model card,
    documentation rather than content (evaluate adds results to the student's card), so it is left out."""
    out = {}
    for p in map(Path, paths):
        files = sorted(q for q in p.rglob("*") if q.is_file() and q.name != "README.md") if p.is_dir() else [p]
        for q in files:
            out[str(Path(p.name) / q.relative_to(p)) if p.is_dir() else p.name] = sha256_file(q)
    return out


def fingerprint(configs: dict[str, Any], inputs: dict[str, str]) -> str:
    blob = json.dumps(
        {"configs": {k: _plain(v) for k, v in configs.items()}, "inputs": inputs, "version": _version()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def is_done(out_dir: Path, fp: str) -> bool:
    """True when `out_dir` holds a finished stage with this fingerprint."""
    meta = Path(out_dir) / "meta.json"
    try:
        return json.loads(meta.read_text()).get("fingerprint") == fp
    except (OSError, ValueError):
        return False


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written under a temporary name and renamed into place."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    """Every object of a JSONL file written by a stage (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Write a directory under a temporary name beside `dest` (`.<name>.tmp`, started empty); it replaces
    `dest` only when the block finishes, so a crash or an error never leaves a half-written `dest`."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


@dataclass
class Stage:
    """A stage about to run: where it writes, what it was fingerprinted on, when it started."""

    out: Path
    configs: dict[str, Any]
    fingerprint: str
    inputs: dict[str, str]
    started: float = field(default_factory=time.time)

    def start(self) -> Path:
        """Create the stage directory; call it once validation is over."""
        self.out.mkdir(parents=True, exist_ok=True)
        return self.out

    def finish(self, seed: int | None = None, provenance: dict | None = None, **extra: Any) -> dict:
        """Write `config.yaml`, then `meta.json`, which marks the stage finished. Both are written at the
        end, so they always describe the same finished run, whatever a failed attempt did before."""
        data = {k: _plain(v) for k, v in self.configs.items()}
        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(data, sort_keys=False))
        meta = {
            "fingerprint": self.fingerprint,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_time_s": round(time.time() - self.started, 3),
            "seed": seed,
            "git_revision": _git_revision(),
            "python": platform.python_version(),
            "libraries": {name: _lib_version(name) for name in _LIBRARIES},
            "inputs": self.inputs,
            "provenance": provenance or {},
            **extra,
        }
        atomic_write_json(self.out / "meta.json", meta)
        return meta


def begin(out_dir: Path, configs: dict[str, Any], inputs: list[Path]) -> Stage | None:
    """Fingerprint a stage on its configs and input files. None (after saying so) when `out_dir` already
    holds a finished stage with the same fingerprint; otherwise the `Stage` to run."""
    hashes = hash_inputs(inputs)
    fp = fingerprint(configs, hashes)
    if is_done(out_dir, fp):
        print(f"{out_dir.name.split('_', 1)[-1]}: up to date, skipped ({out_dir})")
        return None
    return Stage(Path(out_dir), configs, fp, hashes)


def read_meta(out_dir: Path) -> dict:
    """A finished stage's `meta.json`, or {} when the stage has not finished."""
    path = Path(out_dir) / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _plain(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def _lib_version(name: str) -> str | None:
    try:
        return metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None


def _version() -> str | None:
    return _lib_version("distill")


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
