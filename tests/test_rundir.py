import json
import shutil

from distill.generate import GenerateConfig
from distill.rundir import atomic_write_json, fingerprint, hash_inputs, is_done, stage_dir, write_meta


def test_stage_dirs_are_numbered_in_pipeline_order(tmp_path):
    assert stage_dir(tmp_path, "generate").name == "01_generate"
    assert stage_dir(tmp_path, "export").name == "05_export"


def test_fingerprint_follows_config_and_content_not_location(tmp_path):
    a = tmp_path / "a" / "kept.jsonl"
    a.parent.mkdir()
    a.write_text("x\n")
    b = tmp_path / "b" / "kept.jsonl"
    shutil.copytree(a.parent, b.parent)
    cfg = GenerateConfig()
    assert fingerprint({"g": cfg}, hash_inputs([a])) == fingerprint({"g": cfg}, hash_inputs([b]))
    b.write_text("y\n")
    assert fingerprint({"g": cfg}, hash_inputs([a])) != fingerprint({"g": cfg}, hash_inputs([b]))
    assert fingerprint({"g": cfg}, {}) != fingerprint({"g": GenerateConfig(temperature=0.1)}, {})


def test_meta_marks_a_stage_done(tmp_path):
    assert not is_done(tmp_path, "fp")
    meta = write_meta(tmp_path, "fp", {"x": "h"}, started=0.0, seed=3)
    assert is_done(tmp_path, "fp") and not is_done(tmp_path, "other")
    assert meta["seed"] == 3 and meta["libraries"]["torch"] and meta["inputs"] == {"x": "h"}
    (tmp_path / "meta.json").write_text("{torn")
    assert not is_done(tmp_path, "fp")


def test_atomic_write_leaves_no_temporary(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
