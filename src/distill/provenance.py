"""Provenance: which teacher made a trace, and what its licence or terms say about training on it.

Every trace carries `teacher: {model, backend, revision, licence, terms}` (a named reference from
`data/models.yaml` adds `upstream` and `source`: where its weights come from); every stage's `meta.json`
carries a summary of the teachers behind its inputs. `distill train` refuses traces whose terms restrict
training on outputs unless the recipe accepts those terms by id, and warns when the terms are unknown;
`distill export` checks naming obligations and writes notices into the model card and GGUF metadata.

    distill provenance runs/demo

The table of known terms is `data/terms.yaml` (information, not legal advice); a recipe can add or
override entries under `provenance.terms`.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

from distill.config import DistillError
from distill.models import ModelRef, gguf_metadata
from distill.rundir import STAGES, read_meta, sha256_file, stage_dir

STATUSES = ("allowed", "restricted", "unknown")
ENTRY_KEYS = {"id", "name", "licence", "link", "training_on_outputs", "how", "models", "api_base", "licences",
              "name_prefix", "notice", "reviewed"}


@dataclass
class ProvenanceConfig:
    accept_terms: list[str] = field(default_factory=list)  # ids of restricted terms accepted knowingly
    terms: list[dict] = field(default_factory=list)  # extra entries, shaped as data/terms.yaml; tried first

    def __post_init__(self):
        for i, entry in enumerate(self.terms):
            _check_entry(entry, f"provenance.terms[{i}]")


@cache
def builtin_terms() -> tuple[dict, ...]:
    data = yaml.safe_load((Path(__file__).parent / "data" / "terms.yaml").read_text())
    for entry in data["entries"]:
        entry.setdefault("reviewed", data.get("reviewed"))
    return tuple(data["entries"])


def terms_table(extra: list[dict] = ()) -> list[dict]:
    """User entries first, then the built-in ones whose id the user did not override."""
    ids = {e["id"] for e in extra}
    return [_complete(e) for e in extra] + [e for e in builtin_terms() if e["id"] not in ids]


def match_terms(model_id: str = "", api_base: str = "", licence: str = "", extra: list[dict] = ()) -> dict | None:
    """The first entry whose model, API base or licence patterns match (see data/terms.yaml)."""
    for entry in terms_table(extra):
        for key, value in (("models", model_id), ("api_base", api_base), ("licences", licence)):
            if value and any(re.search(p, value, re.I) for p in entry.get(key) or []):
                return entry
    return None


def teacher_record(model: ModelRef, backend: str, extra: list[dict] = ()) -> dict:
    """The `teacher` field of a trace: enough to find the exact weights again, and their terms."""
    licence = revision = None
    if model.kind == "gguf":
        licence = gguf_metadata(model.path).get("general.license")
        revision = f"sha256:{sha256_file(model.path)[:16]}"
    elif model.kind == "hf_dir":
        weights = sorted(model.path.glob("*.safetensors"))
        revision = f"sha256:{sha256_file(weights[0])[:16]}" if weights else None
        licence = _card_licence(model.path / "README.md")
    if model.package:
        revision = f"{model.package} {revision}"
    if model.named and model.named.licence:
        # A named reference's licence was read upstream (data/models.yaml); repackaged parts may declare none.
        licence = model.named.licence
    terms = match_terms(model.name, model.url or "", licence or "", extra)
    record = {
        "model": model.name,
        "backend": backend,
        "revision": revision,
        "licence": licence or (terms["licence"] if terms else None),
        "terms": _terms_field(terms),
    }
    if model.named:  # where the weights come from and how they reached this machine
        record.update(upstream=model.named.hub_id, source=model.named.note)
    return record


def _terms_field(entry: dict | None) -> dict:
    if entry is None:
        return {"id": None, "training_on_outputs": "unknown"}
    keep = ("id", "name", "licence", "link", "training_on_outputs", "how", "name_prefix", "notice", "reviewed")
    return {k: entry.get(k) for k in keep}


def check_training(teachers: list[dict], accept: list[str], source: str) -> list[str]:
    """Gate training on `teachers` (trace `teacher` fields): raise for restricted terms not in `accept`,
    warn on stderr for unknown terms, and return the ids of the restricted terms being accepted."""
    teachers = [_normal(t) for t in teachers]
    by_terms: dict[str | None, Counter] = {}
    for t in teachers:
        by_terms.setdefault(t["terms"].get("id"), Counter())[t["model"]] += 1
    firsts = {t["terms"].get("id"): t["terms"] for t in teachers}
    accepted = []
    for terms_id, models in by_terms.items():
        terms, who = firsts[terms_id], ", ".join(f"{m} ({n} traces)" for m, n in models.items())
        status = terms.get("training_on_outputs", "unknown")
        if status == "restricted" and terms_id not in accept:
            raise DistillError(
                f"train: {source} holds outputs of {who} under {terms.get('licence')} (terms '{terms_id}'), which "
                f"restricts training on outputs: {terms.get('how') or 'see ' + str(terms.get('link'))} "
                f"To train on them knowingly, add `provenance: {{accept_terms: [{terms_id}]}}` to the recipe."
            )
        if status == "restricted":
            print(f"train: accepting terms '{terms_id}' ({terms.get('licence')}, {terms.get('link')}) for {who}: "
                  f"{terms.get('how')}", file=sys.stderr)
            accepted.append(terms_id)
        elif status == "unknown":
            print(f"warning: train: the terms of {who} are unknown; check that its licence allows training on "
                  "its outputs (or describe it under provenance.terms in the recipe)", file=sys.stderr)
    return accepted


def summarize(teachers: list[dict], accepted: list[str] = ()) -> dict:
    """Provenance summary for `meta.json`: each distinct teacher with its record count and terms status."""
    teachers = [_normal(t) for t in teachers]
    counts = Counter((t["model"], t["revision"]) for t in teachers)
    firsts = {(t["model"], t["revision"]): t for t in teachers}
    return {
        "teachers": [{**firsts[k], "records": n} for k, n in counts.items()],
        "terms": sorted({f"{t['terms'].get('id')}: {t['terms'].get('training_on_outputs')}" for t in teachers}),
        "accepted_terms": list(accepted),
    }


def obligations(summary: dict) -> tuple[list[str], list[str]]:
    """(name prefixes a derived model must carry, notices it must ship with) from a provenance summary."""
    prefixes, notices = [], []
    for t in summary.get("teachers", []):
        terms = t.get("terms") or {}
        if terms.get("name_prefix") and terms["name_prefix"] not in prefixes:
            prefixes.append(terms["name_prefix"])
        if terms.get("notice") and terms["notice"] not in notices:
            notices.append(terms["notice"])
    return prefixes, notices


def lineage_text(summary: dict) -> str:
    """The provenance of a model as Markdown lines, for model cards."""
    lines = []
    for t in summary.get("teachers", []):
        terms = t.get("terms") or {}
        lines.append(f"- Teacher **{t['model']}** ({t.get('backend')}, revision `{t.get('revision')}`): "
                     f"{t.get('records')} traces; licence {t.get('licence') or 'unknown'}; terms "
                     f"`{terms.get('id')}`, training on outputs {terms.get('training_on_outputs')}"
                     + (f" ({terms['link']})" if terms.get("link") else "") + "."
                     + (f" Upstream: {t['upstream']}." if t.get("upstream") else "")
                     + (f" Source: {t['source']}." if t.get("source") else ""))
    if summary.get("accepted_terms"):
        lines.append(f"- Restricted terms accepted by the user: {', '.join(summary['accepted_terms'])}.")
    _, notices = obligations(summary)
    lines += [f"- Notice: {n}" for n in notices]
    return "\n".join(lines) or "- No teacher recorded."


def model_card(name: str, summary: dict, base_model: str | None = None, extra: str = "") -> str:
    """A Hugging Face model card (README.md) whose front matter and body carry the lineage."""
    licences = sorted({t.get("licence") for t in summary.get("teachers", []) if t.get("licence")})
    front = {"library_name": "transformers", "tags": ["distill", "distillation"],
             "base_model": base_model, "license": licences[0].lower() if len(licences) == 1 else "other"}
    front = {k: v for k, v in front.items() if v}
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {name}\n\n"
            f"A student model distilled with `distill`.\n\n## Provenance\n\n{lineage_text(summary)}\n\n"
            "The licence and terms shown are what `distill` recorded at generation time; they are information, "
            "not legal advice.\n" + extra)


def _normal(teacher: dict | None) -> dict:
    """A trace's `teacher` field, filled in for traces made elsewhere (no teacher or no terms recorded)."""
    teacher = dict(teacher or {})
    teacher.setdefault("model", "unrecorded teacher")
    teacher.setdefault("revision", None)
    teacher["terms"] = teacher.get("terms") or {"id": None, "training_on_outputs": "unknown"}
    return teacher


def _check_entry(entry: dict, where: str) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
        raise DistillError(f"{where}: an entry needs at least an 'id' (see src/distill/data/terms.yaml)")
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise DistillError(f"{where}: unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(ENTRY_KEYS))})")
    if entry.get("training_on_outputs", "unknown") not in STATUSES:
        raise DistillError(f"{where}.training_on_outputs: must be one of {', '.join(STATUSES)}")
    for key in ("models", "api_base", "licences"):
        for pattern in entry.get(key) or []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise DistillError(f"{where}.{key}: bad regular expression {pattern!r} ({e})") from None


def _complete(entry: dict) -> dict:
    return {**{k: None for k in ENTRY_KEYS}, "training_on_outputs": "unknown", "models": [], "api_base": [],
            "licences": [], **entry}


def _card_licence(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    m = re.search(r"^license:\s*(\S+)", readme.read_text(errors="replace"), re.M)
    return m.group(1) if m else None


def lineage(target: Path) -> dict:
    """Everything recorded about a run directory, a GGUF file or a student directory."""
    target = Path(target)
    if target.is_file() and target.suffix == ".gguf":
        raw = gguf_metadata(target).get("distill.provenance")
        if raw is None:
            raise DistillError(f"provenance: {target} carries no distill.provenance metadata")
        return {"file": str(target), "sha256": sha256_file(target), **json.loads(raw)}
    if (target / "provenance.json").is_file():
        return json.loads((target / "provenance.json").read_text())
    stages = {s: read_meta(stage_dir(target, s)) for s in STAGES}
    if not any(stages.values()):
        raise DistillError(f"provenance: {target} is not a run directory, a student directory or a .gguf file")
    out: dict = {"run": str(target), "stages": {}}
    for s, meta in stages.items():
        if not meta:
            continue
        d = stage_dir(target, s)
        entry = {"finished_at": meta.get("finished_at"), "git_revision": meta.get("git_revision"),
                 "provenance": meta.get("provenance")}
        entry["files"] = {f.name: sha256_file(f) for f in sorted(d.iterdir())
                          if f.is_file() and f.suffix in (".jsonl", ".gguf")}
        if (d / "config.yaml").is_file():
            entry["config"] = yaml.safe_load((d / "config.yaml").read_text())
        out["stages"][s] = entry
    return out


def print_lineage(data: dict, console) -> None:
    """Render `lineage()` for a person: teachers and terms first, then each stage with its files."""
    from rich.markdown import Markdown

    stages = data.get("stages") or {}
    # The most downstream stage that records teachers: its counts are what the student learned from.
    summary = next((s["provenance"] for s in reversed(stages.values()) if (s.get("provenance") or {}).get("teachers")),
                   {}) if stages else data
    console.print(Markdown(lineage_text(summary)))
    if "file" in data:
        console.print(f"{data['file']}  sha256 {data['sha256']}  name {data.get('name')}")
    for name, stage in stages.items():
        console.print(f"[bold]{name}[/bold]  finished {stage['finished_at']}  git {stage.get('git_revision')}")
        for fname, digest in stage.get("files", {}).items():
            console.print(f"  {fname}  sha256 {digest}")
        if name == "train" and stage.get("config"):
            console.print("  config: " + json.dumps(stage["config"].get("train"), default=str))
