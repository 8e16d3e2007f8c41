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


@pytest.mark.slow
def test_demo_kd_prunes_layers_the_teacher_can_spare(smollm_dir):
    """The kd demo's depth-pruned student starts close to the teacher on the demo's answers.

    Which layers go matters more than how many: dropping SmolLM2-135M's layers 23-28 (the recipe's first
    choice) took the answer tokens' cross-entropy from 2.9 to 18.9 nats before training, and 24 steps on
    ~60 traces could not repair that; the 6 layers with the least block influence (ShortGPT) cost 0.4."""
    import torch

    from conftest import trace
    from distill.models import load_hf, prune_layers, resolve
    from distill.train import collate, encode

    keep = load_recipe(REPO / "recipes" / "demo_kd.yaml").train.keep_layers
    net, tok = load_hf(resolve(str(smollm_dir)))
    pairs = [(a, b) for a in (4, 17, 27, 46, 83) for b in (7, 21, 51, 92)]
    samples = encode([trace(f"Calculate {a} + {b}.", str(a + b), f"p{a}-{b}") for a, b in pairs], tok, 256)
    batch = collate(samples, tok.pad_token_id, len(tok))

    def answer_ce(model) -> float:
        with torch.no_grad():
            hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).last_hidden_state
            logits = model.get_output_embeddings()(hidden[batch["rows"], batch["cols"]])
            return float(torch.nn.functional.cross_entropy(logits.float(), batch["labels"]))

    full, pruned = answer_ce(net), answer_ce(prune_layers(net, keep))
    assert len(keep) == 24 and pruned < full + 1.0, (full, pruned)
