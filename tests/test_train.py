import json

import pytest

from conftest import run_cli, trace, write_kept
from distill.models import resolve
from distill.teachers import Sampling, load_teacher


def test_train_cli_student_stops_by_itself(tiny_recipe, tmp_path):
    """A student trained on "42" answers "42" and ends the turn with EOS on its own."""
    run_dir = tmp_path / "run"
    write_kept(run_dir, [trace("What is 40 + 2?", "42", f"p{i}") for i in range(8)])
    res = run_cli("train", tiny_recipe, "--out", run_dir, "--set", "train.epochs=40",
                  "--set", "train.learning_rate=1e-2", "--set", "train.batch_size=8")
    assert res.returncode == 0, res.stderr
    out = run_dir / "03_train"
    assert (out / "student" / "model.safetensors").is_file() and (out / "meta.json").is_file()
    assert (out / "metrics.jsonl").read_text().strip()
    student = load_teacher(resolve(str(out / "student")))
    comp = student.complete([{"role": "user", "content": "What is 40 + 2?"}], [0],
                            Sampling(temperature=0, max_tokens=20))[0]
    assert comp.text == "42" and comp.finish_reason == "stop"


def test_loss_covers_only_the_completion(tiny_model):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from distill.models import load_hf
    from distill.train import sft_rows

    model, tok = load_hf(resolve(str(tiny_model)))
    rec = trace("What is 40 + 2?", "42")
    rec["messages"] = [{"role": "system", "content": "few-shot"}, {"role": "user", "content": "What is 1 + 1?"},
                       {"role": "assistant", "content": "2"}, {"role": "user", "content": "What is 40 + 2?"}]
    rows = sft_rows([rec])
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is 40 + 2?"}]  # no demonstrations
    args = SFTConfig(output_dir="/tmp/unused", completion_only_loss=True, report_to="none", use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    learned = batch["input_ids"][0][batch["labels"][0] != -100]
    assert tok.decode(learned).strip() == "42" + tok.eos_token  # the answer and the EOS, nothing else
    assert AutoTokenizer.from_pretrained(tiny_model).eos_token == "<|im_end|>"


def test_student_from_teacher_with_fewer_layers(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    write_kept(run_dir, [trace("What is 1 + 1?", "2")])
    res = run_cli("train", tiny_recipe, "--out", run_dir, "--set", "train.student=teacher",
                  "--set", "train.keep_layers=[1]")
    assert res.returncode == 0, res.stderr
    config = json.loads((run_dir / "03_train" / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    meta = json.loads((run_dir / "03_train" / "meta.json").read_text())
    assert meta["layers"] == 1 and meta["provenance"]["teachers"][0]["model"] == "tiny-llama"


@pytest.mark.parametrize("content, message", [(None, "not found; run `distill verify` first"),
                                               ("", "has no kept traces")])
def test_train_without_kept_traces_fails_clearly(tiny_recipe, tmp_path, content, message):
    run_dir = tmp_path / "run"
    if content is not None:
        write_kept(run_dir, [])
    res = run_cli("train", tiny_recipe, "--out", run_dir)
    assert res.returncode == 2 and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
