import dataclasses
import hashlib
import json
import shutil

import yaml

from distill.generate import GenerateConfig
from distill.rundir import atomic_write_json, begin, fingerprint, hash_inputs, stage_dir
from distill.verify import VerifyConfig


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


def test_begin_skips_a_finished_stage_and_runs_a_changed_one(tmp_path, capsys):
    out, kept = tmp_path / "02_verify", tmp_path / "kept.jsonl"
    kept.write_text("x\n")
    configs = {"verify": VerifyConfig()}
    stage = begin(out, configs, [kept])
    assert stage is not None and not out.exists()  # nothing is written before the stage decides to run
    assert stage.start() == out and out.is_dir() and not (out / "config.yaml").exists()
    meta = stage.finish(3, extra=1)
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written == {"verify": dataclasses.asdict(VerifyConfig())} and written["verify"]["verifier"] == "auto"
    assert meta["seed"] == 3 and meta["extra"] == 1 and meta["libraries"]["torch"]
    assert meta["inputs"] == {"kept.jsonl": stage.inputs["kept.jsonl"]}

    assert begin(out, configs, [kept]) is None
    assert "verify: up to date, skipped" in capsys.readouterr().out
    assert begin(out, {"verify": VerifyConfig(dedupe=False)}, [kept]) is not None
    kept.write_text("y\n")
    assert begin(out, configs, [kept]) is not None
    kept.write_text("x\n")
    (out / "meta.json").write_text("{torn")  # a stage that died while finishing runs again
    assert begin(out, configs, [kept]) is not None


def test_atomic_write_leaves_no_temporary(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_model_card_is_not_content(tmp_path):
    student = tmp_path / "student"
    student.mkdir()
    (student / "model.safetensors").write_bytes(b"w")
    before = hash_inputs([student])
    (student / "README.md").write_text("# card with results\n")
    assert hash_inputs([student]) == before == {"student/model.safetensors": before["student/model.safetensors"]}


def test_a_remembered_sha256_holds_until_the_file_changes(tmp_path):
    from distill.rundir import remember_sha256, sha256_file

    path = tmp_path / "model.gguf"
    path.write_bytes(b"weights")
    remember_sha256(path, "f" * 64)  # e.g. hashed while the file was joined
    assert sha256_file(path) == "f" * 64
    path.write_bytes(b"other weights")  # size (and mtime) differ: read again
    assert sha256_file(path) == hashlib.sha256(b"other weights").hexdigest()
