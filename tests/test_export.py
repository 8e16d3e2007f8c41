import json
import shutil

from conftest import run_cli


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
    assert (out / "student-q8_0.gguf").stat().st_size < (out / "student-f16.gguf").stat().st_size
    probe = json.loads((out / "probe.json").read_text())
    assert set(probe) == {"f16", "q8_0"} and probe["f16"][0]["question"] == "What is 1 + 1?"
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["files"]) == {"f16", "q8_0"}


def test_export_without_student_fails_clearly(tiny_recipe, tmp_path):
    res = run_cli("export", tiny_recipe, "--out", tmp_path / "run")
    assert res.returncode == 2 and "run `distill train` first" in res.stderr
