"""Stage 5, export: GGUF files with the chat template, EOS and lineage inside, ollama Modelfiles, parity with
the HF student (and a loud failure when f16 disagrees), LoRA merge, and one clear line per bad input with
nothing half-written left behind."""

import json
import shutil

import pytest

from conftest import run_cli


def _one_error_line(res, message):
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr


def test_export_cli_writes_gguf_that_llama_cpp_loads(tiny_recipe, tiny_model, tmp_path):
    from gguf import GGUFReader

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_model, run_dir / "03_train" / "student")
    res = run_cli("export", tiny_recipe, "--out", run_dir)
    assert res.returncode == 0, res.stderr
    out = run_dir / "05_export"
    for name in ("student-f16.gguf", "student-q8_0.gguf"):
        reader = GGUFReader(out / name)
        arch = reader.fields["general.architecture"]
        assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
        assert "tokenizer.chat_template" in reader.fields  # the chat template travels with the file
        eos = reader.fields["tokenizer.ggml.eos_token_id"]
        assert int(eos.parts[eos.data[0]][0]) == 2  # <|im_end|>: the student stops in llama.cpp and ollama
        assert "distill.provenance" in reader.fields
        modelfile = (out / name).with_suffix(".Modelfile").read_text()
        assert f"FROM ./{name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
        assert "TEMPLATE \"\"\"" in modelfile and "<|im_start|>assistant\n{{ end }}" in modelfile
    assert (out / "student-q8_0.gguf").stat().st_size < (out / "student-f16.gguf").stat().st_size
    probe = json.loads((out / "probe.json").read_text())
    assert set(probe) == {"f16", "q8_0"} and probe["f16"][0]["question"] == "What is 1 + 1?"
    parity = json.loads((out / "parity.json").read_text())
    assert parity["f16"]["token_agreement"] >= 0.95 and parity["f16"]["tokenizer_match"]
    assert parity["q8_0"]["mean_kl"] >= 0 and parity["f16"]["positions"] > 0
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["files"]) == {"f16", "q8_0"} and meta["parity"] == parity
    assert not list(out.glob(".*tmp*")) and not list(out.glob("*.tmp"))


def test_modelfile_template_matches_the_jinja_template(tiny_model):
    from transformers import AutoTokenizer

    from distill.export import _assemble, chat_format

    tok = AutoTokenizer.from_pretrained(tiny_model)
    chat = chat_format(tok)
    msgs = [("user", "Hi"), ("assistant", "Hello!"), ("user", "What is 2 + 3?")]
    jinja = tok.apply_chat_template([{"role": r, "content": c} for r, c in msgs], tokenize=False,
                                    add_generation_prompt=True)
    assert _assemble(chat["template"], msgs) == jinja  # SmolLM's default system prompt included
    assert chat["stop"] == ["<|im_end|>", "<|im_start|>user"]
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"  # content-dependent
    assert chat_format(tok)["template"] is None


def test_export_fails_loudly_when_f16_disagrees_and_leaves_no_file(tiny_model, tmp_path, monkeypatch):
    """A conversion bug, simulated: the converter writes a different model than the student."""
    import torch
    from transformers import AutoModelForCausalLM

    import distill.export as export_mod
    from distill.config import DistillError, TaskConfig

    other = tmp_path / "other"
    torch.manual_seed(1)
    net = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    net.save_pretrained(other)
    shutil.copy(tiny_model / "tokenizer.json", other)
    shutil.copy(tiny_model / "tokenizer_config.json", other)
    shutil.copy(tiny_model / "chat_template.jinja", other)
    convert = export_mod._convert
    monkeypatch.setattr(export_mod, "_convert", lambda student, dest, name: convert(other, dest, name))

    run_dir = tmp_path / "run"
    task = TaskConfig(source="jsonl", path=str(tmp_path / "q.jsonl"), train_size=1, eval_size=2)
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)})
                                              + "\n" for i in range(3)))
    cfg = export_mod.ExportConfig(quantize=["f16", "q8_0"], student=str(tiny_model), parity_tokens=8)
    with pytest.raises(DistillError, match="a conversion bug"):
        export_mod.export(cfg, task, run_dir)
    out = run_dir / "05_export"
    assert json.loads((out / "parity.json").read_text())["f16"]["token_agreement"] < 0.95
    assert sorted(p.name for p in out.iterdir()) == ["parity.json"]  # no GGUF, no temp file, no meta.json


def test_lora_adapter_is_merged_before_conversion(tiny_recipe, tiny_model, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # lora_B starts at zero (a no-op); a trained adapter is not
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)

    run_dir = tmp_path / "run"
    res = run_cli("export", tiny_recipe, "--out", run_dir, "--set", f"export.student={adapter}",
                  "--set", "export.quantize=[f16]")
    assert res.returncode == 0, res.stderr
    merged = run_dir / "05_export" / "student-merged"
    key = "model.layers.0.self_attn.q_proj.weight"
    base = load_file(tiny_model / "model.safetensors")[key]
    assert not torch.equal(load_file(merged / "model.safetensors")[key], base)
    parity = json.loads((run_dir / "05_export" / "parity.json").read_text())
    assert parity["f16"]["token_agreement"] >= 0.95  # the GGUF is the merged model, not the bare base
    assert (run_dir / "05_export" / "student-f16.gguf").is_file()


def test_export_bad_inputs_are_one_line_and_write_nothing(tiny_recipe, tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    _one_error_line(run_cli("export", tiny_recipe, "--out", run_dir, "--set", f"export.student={empty}"),
                    "is not a model directory (no config.json or adapter_config.json)")
    alien = tmp_path / "alien"
    shutil.copytree(tiny_model, alien)
    config = json.loads((alien / "config.json").read_text())
    (alien / "config.json").write_text(json.dumps({**config, "architectures": ["FluxCapacitorForCausalLM"]}))
    _one_error_line(run_cli("export", tiny_recipe, "--out", run_dir, "--set", f"export.student={alien}"),
                    "architecture 'FluxCapacitorForCausalLM'")
    _one_error_line(run_cli("export", tiny_recipe, "--out", run_dir, "--set", f"export.student={tiny_model}",
                            "--set", "export.quantize=[f16,q3_zz]"), "export.quantize: unknown type 'q3_zz'")
    assert not run_dir.exists()


def test_export_without_student_fails_clearly(tiny_recipe, tmp_path):
    res = run_cli("export", tiny_recipe, "--out", tmp_path / "run")
    assert res.returncode == 2 and "run `distill train` first" in res.stderr


PROBES = ["What is 2 + 3?", "What is 17 + 25?", "Name a colour.", "What is the capital of France?",
          "Write one sentence about the sea.", "What is 9 + 10?", "Say hello in Spanish.", "What is 40 + 2?"]


@pytest.mark.slow
def test_smollm2_f16_agrees_with_hf_and_quantized_losses_are_reported(tiny_recipe, smollm_dir, tmp_path):
    """SmolLM2-135M-Instruct (the demo student's architecture and size) exported for real."""
    run_dir = tmp_path / "run"
    res = run_cli("export", tiny_recipe, "--out", run_dir, "--set", f"export.student={smollm_dir}",
                  "--set", "export.quantize=[f16,q8_0,q4_k_m]", "--set", f"export.probes={json.dumps(PROBES)}")
    assert res.returncode == 0, res.stderr
    parity = json.loads((run_dir / "05_export" / "parity.json").read_text())
    print(json.dumps(parity))  # the numbers the docs quote: pytest -s shows them
    assert parity["f16"]["positions"] >= 8 * 8 and parity["f16"]["tokenizer_match"]
    assert parity["f16"]["token_agreement"] >= 0.95
    assert set(parity) == {"f16", "q8_0", "q4_k_m"}
    assert parity["q4_k_m"]["mean_kl"] >= parity["q8_0"]["mean_kl"] >= 0
