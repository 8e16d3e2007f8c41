"""Recipes: one YAML file with a section per stage, checked against the stages' config dataclasses.

Precedence: dataclass defaults < recipe YAML < `--set stage.field=value`. Every error names the file,
the field or the flag, in one line (`DistillError`), before anything is written.

    distill run recipes/demo.yaml --set generate.samples_per_prompt=2
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class DistillError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""

    exit_code = 2  # a subclass for a deliberate stop (generate's spend cap) says 3


@dataclass
class TaskConfig:
    """Where prompts and answers come from, and how they split into train / held-out / few-shot."""

    source: str = "reasoning_gym"  # reasoning_gym | jsonl (a .jsonl or .parquet file) | humaneval
    name: str = "basic_arithmetic"  # reasoning-gym dataset name (source=reasoning_gym)
    params: dict = field(default_factory=dict)  # passed to reasoning_gym.create_dataset
    # source=jsonl: a .jsonl or .parquet file of {prompt, answer, tests?} rows or OpenAI {messages} rows,
    # relative to the recipe (see src/distill/tasks/jsonl.py)
    path: str | None = None
    train_size: int = 400
    eval_size: int = 100
    few_shot: int = 0  # demonstrations shown to the teacher (taken from neither split)
    seed: int = 0

    def __post_init__(self):
        if self.source not in ("reasoning_gym", "jsonl", "humaneval"):
            raise DistillError(f"task.source: '{self.source}' is not one of reasoning_gym, jsonl, humaneval")
        if self.source == "jsonl" and not self.path:
            raise DistillError("task.path: required when task.source is jsonl")
        for name in ("train_size", "eval_size", "few_shot"):
            if getattr(self, name) < 0:
                raise DistillError(f"task.{name}: must be >= 0, got {getattr(self, name)}")
        if self.train_size + self.eval_size == 0:
            raise DistillError("task.train_size: train_size and eval_size are both 0")


def check_types(cls: type, data: dict, section: str) -> None:
    """Check values meant for dataclass `cls` against its annotations, naming `section.field` on error.

    Done before construction so that `__post_init__` only ever sees well-typed values. Written by hand
    (30 lines) rather than pulling in pydantic: stage configs stay plain dataclasses whose signatures a
    newcomer reads at a glance.
    """
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if isinstance(value, str) and _matches(1.5, hints[name]) and not _matches(value, hints[name]):
            # PyYAML follows YAML 1.1, where `3e-3` (no dot) is a string; read it as the float it means.
            try:
                data[name] = value = float(value)
            except ValueError:
                pass
        if not _matches(value, hints[name]):
            raise DistillError(f"{section}.{name}: expected {_type_name(hints[name])}, got {value!r}")


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if tp is typing.Any:
        return True
    return isinstance(value, origin or tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, data: dict, section: str, source: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DistillError(
            f"{source}: unknown field '{section}.{unknown[0]}' (known: {', '.join(sorted(names))})"
        )
    check_types(cls, data, section)
    return cls(**data)


def _sections() -> dict[str, type]:
    # Imported here so that `import distill.config` stays light (the stage modules import torch lazily
    # too, but keeping the table in one function makes the recipe's shape obvious).
    from distill.evaluate import EvaluateConfig
    from distill.export import ExportConfig
    from distill.generate import GenerateConfig
    from distill.provenance import ProvenanceConfig
    from distill.train import TrainConfig
    from distill.verify import VerifyConfig

    return {
        "task": TaskConfig,
        "generate": GenerateConfig,
        "verify": VerifyConfig,
        "train": TrainConfig,
        "evaluate": EvaluateConfig,
        "export": ExportConfig,
        "provenance": ProvenanceConfig,
    }


@dataclass
class Recipe:
    name: str
    path: Path  # the recipe file; relative paths inside it are resolved against its folder
    task: TaskConfig
    generate: Any
    verify: Any
    train: Any
    evaluate: Any
    export: Any
    provenance: Any



def parse_overrides(items: list[str]) -> list[tuple[str, str, Any]]:
    """`["generate.samples_per_prompt=2"]` → `[("generate", "samples_per_prompt", 2)]` (values are YAML)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise DistillError(f"--set {item}: expected stage.field=value, e.g. generate.temperature=0.5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise DistillError(f"--set {item}: value is not valid YAML ({e.problem})") from None
        out.append((section, name, value))
    return out


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, merge and validate a recipe; raise `DistillError` naming the file/field/flag on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"recipe {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DistillError(f"recipe {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DistillError(f"recipe {path}: expected a mapping of sections, got {type(data).__name__}")

    sections = _sections()
    unknown = sorted(set(data) - set(sections) - {"name"})
    if unknown:
        raise DistillError(
            f"recipe {path}: unknown section '{unknown[0]}' (known: name, {', '.join(sections)})"
        )
    merged = {s: dict(data.get(s) or {}) for s in sections}
    for s in sections:
        if not isinstance(data.get(s) or {}, dict):
            raise DistillError(f"recipe {path}: section '{s}' must be a mapping")
    name = data.get("name") or path.stem

    for section, field_name, value in parse_overrides(list(overrides)):
        if section == "name" or (section not in sections):
            raise DistillError(
                f"--set {section}.{field_name}: unknown section '{section}' (known: {', '.join(sections)})"
            )
        known = {f.name for f in dataclasses.fields(sections[section])}
        if field_name not in known:
            raise DistillError(
                f"--set {section}.{field_name}: unknown key (fields of {section}: {', '.join(sorted(known))})"
            )
        merged[section][field_name] = value

    built = {}
    for s, cls in sections.items():
        built[s] = _build(cls, merged[s], s, f"recipe {path}")
    return Recipe(name=str(name), path=path.resolve(), **built)
