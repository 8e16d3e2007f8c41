"""The train stage on a tiny random Llama: methods, EOS, resume, LoRA, pruning, processes, bad input.

    PYTHONPATH=src python -m pytest -q tests/test_train.py
"""

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import distill.train as tr
from conftest import REPO, run_cli, trace, write_kept
from distill.config import DistillError
from distill.logprobs import ShardWriter, TopK
from distill.models import resolve
from distill.teachers import Sampling, load_teacher
from distill.train import TrainConfig, encode, train


def _answer(student_dir: Path, question: str):
    student = load_teacher(resolve(str(student_dir)))
    return student.complete([{"role": "user", "content": question}], [0], Sampling(temperature=0, max_tokens=20))[0]


def _meta(run_dir: Path) -> dict:
    return json.loads((run_dir / "03_train" / "meta.json").read_text())


def test_train_cli_student_stops_by_itself(tiny_recipe, tmp_path):
    """A student trained on "42" answers "42" and ends the turn with EOS on its own."""
    run_dir = tmp_path / "run"
    write_kept(run_dir, [trace("What is 40 + 2?", "42", f"p{i}") for i in range(8)])
    res = run_cli("train", tiny_recipe, "--out", run_dir, "--set", "train.epochs=40",
                  "--set", "train.learning_rate=1e-2", "--set", "train.batch_size=8")
    assert res.returncode == 0, res.stderr
    out = run_dir / "03_train"
    assert (out / "student" / "model.safetensors").is_file() and (out / "meta.json").is_file()
    losses = [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert losses[-1] < losses[0] / 10
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))
    comp = _answer(out / "student", "What is 40 + 2?")
    assert comp.text == "42" and comp.finish_reason == "stop"


def test_loss_covers_only_the_completion_and_its_eos(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rec = trace("What is 40 + 2?", "42")
    rec["messages"] = [{"role": "system", "content": "few-shot"}, {"role": "user", "content": "What is 1 + 1?"},
                       {"role": "assistant", "content": "2"}, {"role": "user", "content": "What is 40 + 2?"}]
    (s,) = encode([rec], tok, 256)
    assert "few-shot" not in tok.decode(s.prompt) and "What is 40 + 2?" in tok.decode(s.prompt)
    assert tok.decode(s.completion).strip() == "42" + tok.eos_token  # the answer and the EOS, nothing else
    batch = tr.collate([s], tok.pad_token_id, len(tok))
    assert batch["labels"].tolist() == s.completion  # only completion tokens are learned
    assert batch["cols"].tolist() == list(range(len(s.prompt) - 1, len(s) - 1))


def test_cached_topk_rows_line_up_with_the_completion(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from distill.logprobs import ShardReader

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rec = _with_logprobs(tmp_path, tok, [trace("What is 40 + 2?", "42")])[0]
    (s,) = encode([rec], tok, 256, reader=ShardReader(tmp_path / "01_generate"))
    content = tok("42", add_special_tokens=False).input_ids
    assert s.completion[:len(content)] == content and s.completion[len(content)] == tok.eos_token_id
    assert len(s.topk[0]) == len(content) and s.topk[0][0][0] == content[0]
    batch = tr.collate([s], tok.pad_token_id, len(tok))
    assert batch["has_teacher"].tolist() == [True] * len(content) + [False] * (len(s.completion) - len(content))


def test_the_teachers_end_token_row_teaches_the_stop_only_when_it_is_the_templates_end(tiny_model, tmp_path):
    """A teacher that stopped keeps its end token's top-k row (llama.cpp teacher): it covers the EOS the
    student's template ends the turn with, and no position when the teacher ended with another token."""
    from transformers import AutoTokenizer

    from distill.logprobs import ShardReader

    tok = AutoTokenizer.from_pretrained(tiny_model)
    content = tok("42", add_special_tokens=False).input_ids
    other_end = next(t for t in tok.all_special_ids if t != tok.eos_token_id)
    for end, covered in ((tok.eos_token_id, True), (other_end, False)):
        run_dir = tmp_path / str(end)
        rec = _with_logprobs(run_dir, tok, [trace("What is 40 + 2?", "42")], end=end)[0]
        (s,) = encode([rec], tok, 256, reader=ShardReader(run_dir / "01_generate"))
        assert s.completion[len(content)] == tok.eos_token_id
        assert len(s.topk[0]) == len(content) + covered
        has = tr.collate([s], tok.pad_token_id, len(tok))["has_teacher"].tolist()
        assert has == [True] * (len(content) + covered) + [False] * (len(s.completion) - len(content) - covered)


def _with_logprobs(run_dir: Path, tok, records: list[dict], k: int = 4, end: int | None = None) -> list[dict]:
    """Give each record cached top-k rows (as generate writes them): 0.9 on the answer's own tokens, and on
    the `end` token after them when given (a teacher that stopped)."""
    writer = ShardWriter(run_dir / "01_generate")
    for rec in records:
        ids = tok(rec["completion"], add_special_tokens=False).input_ids + ([end] if end is not None else [])
        top = np.array([[t] + [(t + j * 17) % len(tok) for j in range(1, k)] for t in ids])
        lp = np.log(np.array([[0.9] + [0.1 / k] * (k - 1)] * len(ids)))
        rec["logprobs_ref"] = writer.add(TopK(ids, top, lp))
    writer.flush()
    return records


def test_kd_from_cached_logprobs_learns_the_answer(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    run_dir = tmp_path / "run"
    write_kept(run_dir, _with_logprobs(run_dir, tok, [trace("What is 40 + 2?", "42", f"p{i}") for i in range(8)]))
    cfg = TrainConfig(student=str(tiny_model), method="kd", alpha=1.0, loss="forward_kl", epochs=40,
                      learning_rate=1e-2, batch_size=8)
    train(cfg, run_dir, str(tiny_model))
    assert _meta(run_dir)["teacher_logits"] == "cached"
    comp = _answer(run_dir / "03_train" / "student", "What is 40 + 2?")
    assert comp.text == "42" and comp.finish_reason == "stop"


def test_live_teacher_kd_and_on_policy_run_with_a_padded_teacher_vocabulary(tiny_model, tmp_path):
    """A teacher whose embedding has extra padding rows (same tokens) is aligned, not refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model)
    teacher.resize_token_embeddings(len(tok) + 64)
    teacher_dir = tmp_path / "padded-teacher"
    teacher.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    for method in ("kd", "on_policy"):
        run_dir = tmp_path / method
        write_kept(run_dir, [trace(f"What is {i} + 1?", str(i + 1), f"p{i}") for i in range(4)])
        cfg = TrainConfig(student=str(tiny_model), teacher=str(teacher_dir), method=method, loss="jsd", epochs=2,
                          batch_size=2, max_new_tokens=4, on_policy_fraction=0.5)
        train(cfg, run_dir, "unused-generate-teacher")
        meta = _meta(run_dir)
        assert meta["method"] == method and meta["teacher_logits"] == "live" and np.isfinite(meta["train_loss"])


class _Crash(Exception):
    pass


def test_resume_continues_the_same_batch_order(tiny_model, tmp_path, monkeypatch):
    """2N steps straight vs N, a crash, and a rerun that resumes: same weights, same losses."""
    records = [trace(f"What is {i} + 1?", str(i + 1), f"p{i}") for i in range(12)]
    cfg = TrainConfig(student=str(tiny_model), epochs=1, batch_size=2, learning_rate=1e-3, save_steps=3,
                      logging_steps=1, eval_fraction=0.0)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run_dir in (straight, resumed):
        write_kept(run_dir, records)
    train(cfg, straight, str(tiny_model))

    real = tr.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real(*args, **kwargs)
        raise _Crash

    monkeypatch.setattr(tr, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        train(cfg, resumed, str(tiny_model))
    monkeypatch.undo()
    assert (resumed / "03_train" / "checkpoints" / "step-0000003" / "state.json").is_file()
    train(cfg, resumed, str(tiny_model))
    assert _meta(resumed)["resumed_from_step"] == 3 and _meta(straight)["steps"] == 6

    a = load_file(straight / "03_train" / "student" / "model.safetensors")
    b = load_file(resumed / "03_train" / "student" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    loss = {p: [m["loss"] for m in map(json.loads, (p / "03_train" / "metrics.jsonl").read_text().splitlines())]
            for p in (straight, resumed)}
    assert len(loss[straight]) == 6 and loss[straight] == pytest.approx(loss[resumed], rel=1e-5)


def test_lora_saves_the_adapter_and_a_merged_student(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    write_kept(run_dir, [trace("What is 40 + 2?", "42", f"p{i}") for i in range(4)])
    train(TrainConfig(student=str(tiny_model), lora_r=4, lora_target_modules=["q_proj", "v_proj"], epochs=1,
                      batch_size=2, learning_rate=1e-2), run_dir, str(tiny_model))
    out = run_dir / "03_train"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged = load_file(out / "student" / "model.safetensors")
    base = load_file(Path(tiny_model) / "model.safetensors")
    assert not any("lora" in k for k in merged) and set(merged) == set(base)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])  # the adapter was merged in


def test_width_and_depth_pruned_student(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    write_kept(run_dir, [trace("What is 1 + 1?", "2")])
    res = run_cli("train", tiny_recipe, "--out", run_dir, "--set", "train.student=teacher",
                  "--set", "train.keep_layers=[1]", "--set", "train.intermediate_size=48")
    assert res.returncode == 0, res.stderr
    config = json.loads((run_dir / "03_train" / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["intermediate_size"] == 48
    meta = _meta(run_dir)
    assert meta["layers"] == 1 and meta["provenance"]["teachers"][0]["model"] == "tiny-llama"


def test_eval_loss_on_held_out_prompts(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    write_kept(run_dir, [trace(f"What is {i} + 2?", str(i + 2), f"p{i}") for i in range(20)])
    train(TrainConfig(student=str(tiny_model), epochs=1, batch_size=4, eval_fraction=0.1, eval_steps=2),
          run_dir, str(tiny_model))
    rows = [json.loads(line) for line in (run_dir / "03_train" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 5] and all(np.isfinite(r["eval_loss"]) for r in evals)
    assert _meta(run_dir)["eval_traces"] == 2


def _other_tokenizer_model(folder: Path, chat_template: str) -> Path:
    """A tiny model whose tokenizer shares nothing with SmolLM2's (word-level, trained here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["What is 40 + 2 ? 42 user assistant"],
                            trainers.WordLevelTrainer(special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<unk>", eos_token="<|im_end|>")
    tok.chat_template = chat_template
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _one_line_error(res, text: str):
    """Exit 2 with one `error:` line holding `text`, no traceback (a provenance warning or a progress bar
    of the model loading that came before may precede it)."""
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0] and "Traceback" not in res.stderr, res.stderr


def test_kd_with_another_tokenizer_fails_clearly(tiny_recipe, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    other = _other_tokenizer_model(tmp_path / "other", AutoTokenizer.from_pretrained(tiny_model).chat_template)
    run_dir = tmp_path / "run"
    write_kept(run_dir, [trace("What is 40 + 2?", "42")])
    res = run_cli("train", tiny_recipe, "--out", run_dir, "--set", "train.method=kd", "--set", f"train.teacher={other}")
    _one_line_error(res, "tokenizers differ")
    assert "method: sft" in res.stderr


def test_lora_target_that_does_not_exist_fails_clearly(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    write_kept(run_dir, [trace("What is 40 + 2?", "42")])
    res = run_cli("train", tiny_recipe, "--out", run_dir, "--set", "train.lora_r=4",
                  "--set", "train.lora_target_modules=[q_proj, query_key_value]")
    _one_line_error(res, "train.lora_target_modules: ['query_key_value'] not in the student")


def test_resume_from_another_models_checkpoint_fails_clearly(tiny_recipe, tiny_model, tmp_path):
    from distill.models import load_hf, prune_layers

    other, _ = load_hf(resolve(str(tiny_model)))
    other = prune_layers(other, [0])
    opt = torch.optim.AdamW(other.parameters())
    ckpt = tr.save_checkpoint(tmp_path / "ckpts", 5, other, opt, tr.model_signature(other), "x", "tiny-1-layer")
    run_dir = tmp_path / "run"
    write_kept(run_dir, [trace("What is 40 + 2?", "42")])
    res = run_cli("train", tiny_recipe, "--out", run_dir, "--set", f"train.resume_from={ckpt}")
    _one_line_error(res, "is a checkpoint of another model (tiny-1-layer")


@pytest.mark.parametrize("content, message", [(None, "not found; run `distill verify` first"),
                                               ("", "has no kept traces")])
def test_train_without_kept_traces_fails_clearly(tiny_recipe, tmp_path, content, message):
    run_dir = tmp_path / "run"
    if content is not None:
        write_kept(run_dir, [])
    _one_line_error(run_cli("train", tiny_recipe, "--out", run_dir), message)


def test_config_errors_name_the_field():
    with pytest.raises(DistillError, match="train.loss: 'kl' is not one of"):
        TrainConfig(loss="kl")
    with pytest.raises(DistillError, match=r"train.beta: must be in \(0, 1\)"):
        TrainConfig(beta=1.0)


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(tiny_recipe, tmp_path):
    """DDP over gloo with 2 CPU processes, started the way docs/train.md says."""
    import subprocess

    run_dir = tmp_path / "run"
    write_kept(run_dir, [trace(f"What is {i} + 1?", str(i + 1), f"p{i}") for i in range(8)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = Path(sys.executable).parent
    res = subprocess.run([str(bin_dir / "accelerate"), "launch", "--config_file",
                          str(REPO / "configs" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", str(port),
                          str(bin_dir / "distill"), "train", str(tiny_recipe), "--out", str(run_dir),
                          "--set", "train.batch_size=2"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = _meta(run_dir)
    assert meta["world_size"] == 2 and meta["steps"] == 2  # 8 traces / (2 per batch × 2 processes)
    assert (run_dir / "03_train" / "student" / "model.safetensors").is_file()


def test_importing_distill_caps_onednn_primitive_cache_unless_the_user_set_it():
    """oneDNN's per-shape primitive cache grew RSS every step of training (see distill/__init__.py)."""
    import os
    import subprocess
    import sys

    code = "import os, distill; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "16"
    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "256"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "256"


def test_an_attention_kernel_that_cannot_load_through_the_real_cli(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    write_kept(run_dir, [trace("What is 40 + 2?", "42")])
    res = run_cli("train", tiny_recipe, "--out", run_dir, "--set", "train.attn_implementation=no_such_kernel")
    _one_line_error(res, "train.attn_implementation: 'no_such_kernel' cannot be used here")
    assert not (run_dir / "03_train" / "student").exists()
