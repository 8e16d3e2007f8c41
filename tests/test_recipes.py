"""Meta-tests: shipped recipes load and validate; the README's commands are the ones CI and make run."""

import re
from pathlib import Path

import pytest

from distill.config import load_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipe_loads(recipe):
    r = load_recipe(recipe)
    assert r.generate.teacher and r.train.student


def test_readme_quickstart_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^\s*(make \w+)\s*$", quickstart, re.M)
    assert commands == ["make demo", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:.*\n\t.*distill run recipes/demo.yaml", makefile, re.M)
    assert re.search(r"^test:.*\n\t.*pytest", makefile, re.M)
    assert "torch==2.13.0" in makefile  # the CPU build on disk, installed before anything else
