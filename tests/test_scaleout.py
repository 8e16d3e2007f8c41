"""Generation fanned out over Ray actors, on a local Ray instance (two HTTP teachers on loopback).

    PYTHONPATH=src pytest -q tests/test_scaleout.py
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import yaml

from conftest import run_cli
from distill.config import DistillError, load_recipe
from distill.scaleout import RayOptions
from openai_helpers import FaultServer

pytest.importorskip("ray")


def test_generate_fans_out_over_two_servers_exactly_once(tmp_path):
    a, b = FaultServer(model="m"), FaultServer(model="m")
    try:
        data = tmp_path / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                                for i in range(12)))
        recipe = tmp_path / "ray.yaml"
        recipe.write_text(yaml.safe_dump({
            "name": "ray", "task": {"source": "jsonl", "path": data.name, "train_size": 12, "eval_size": 0},
            "generate": {"teacher": f"{a.url}#m", "samples_per_prompt": 2, "concurrency": 2,
                         "ray": {"address": "local", "teachers": [f"{a.url}#m", f"{b.url}#m"], "batch": 2}}}))
        res = run_cli("generate", recipe, "--out", tmp_path / "run")
        assert res.returncode == 0, res.stderr
        recs = [json.loads(x) for x in (tmp_path / "run" / "01_generate" / "traces.jsonl").read_text().splitlines()]
        assert len(recs) == 24
        assert set(Counter((r["prompt_id"], r["sample_index"]) for r in recs).values()) == {1}
        for r in recs:  # each answer belongs to its own prompt and seed, whichever server gave it
            i = int(r["messages"][-1]["content"].split()[2])
            assert r["completion"] == f"{i + 1} #{r['sampling']['seed']}"
        assert a.hits and b.hits and len(a.hits) + len(b.hits) == 24  # both servers worked, nothing twice
    finally:
        a.close()
        b.close()


def test_a_worker_that_cannot_start_is_one_line(tmp_path):
    import ray

    from distill.models import resolve
    from distill.scaleout import RayTeacher
    from distill.teachers import TeacherOptions

    good = FaultServer(model="m")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        opts = TeacherOptions(ray={"teachers": [f"{good.url}#m", f"{good.url}#other"]})
        with pytest.raises(DistillError, match="does not serve model 'other'"):
            RayTeacher(resolve(f"{good.url}#m"), "openai", 0, None, opts)
    finally:
        ray.shutdown()
        good.close()


@pytest.mark.parametrize("value, message", [
    ({"adress": "auto"}, "generate.ray.adress: unknown key"),
    ({"address": "tcp://x"}, "generate.ray.address: 'tcp://x' is not local, auto or ray://"),
    ({"workers": 0}, "generate.ray.workers: must be >= 1"),
    ({"teachers": "http://x/v1#m"}, "generate.ray.teachers: expected list"),
    ("auto", "generate.ray: expected dict"),
])
def test_bad_ray_options_name_the_field(tmp_path, value, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"generate": {"ray": value}}))
    with pytest.raises(DistillError, match=re.escape(message)):
        load_recipe(recipe)
    assert RayOptions.parse({"address": "ray://head:10001", "workers": 4}).workers == 4
