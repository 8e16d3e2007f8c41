"""Stage 3, train: supervised fine-tuning (SFT) of the student on the verified traces.

    distill train recipes/demo.yaml --out runs/demo --set train.epochs=1

The student sees the bare question (no few-shot demonstrations) and learns the teacher's verified
answer; the loss covers only the completion. Conversations are rendered with the student's own chat
template, whose assistant turn ends with the tokenizer's EOS (`<|im_end|>` for SmolLM2), so the trained
student stops by itself in transformers, llama.cpp and ollama alike.

Student: `student: teacher` copies the teacher, optionally keeping only `keep_layers` (depth pruning, as
in Minitron/ShortGPT), or `student: <model reference>` starts from another model. SFT is done by TRL's
`SFTTrainer` (prompt-completion data, completion-only loss).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from distill.config import DistillError
from distill.rundir import begin, read_jsonl, stage_dir


@dataclass
class TrainConfig:
    student: str = "teacher"  # "teacher" (a copy of generate.teacher) or a model reference
    keep_layers: list[int] | None = None  # decoder layers of the student's source to keep (None: all)
    method: str = "sft"
    epochs: float = 3.0
    learning_rate: float = 5e-5
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256  # tokens per example, prompt + completion
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    bf16: bool | None = None  # None: use bf16 autocast where the hardware runs it natively
    seed: int = 0

    def __post_init__(self):
        if self.method != "sft":
            raise DistillError(f"train.method: '{self.method}' is not supported yet (supported: sft)")
        for name in ("epochs", "learning_rate", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) <= 0:
                raise DistillError(f"train.{name}: must be > 0, got {getattr(self, name)}")


def train(cfg: TrainConfig, run_dir: Path, teacher: str, accept_terms: list[str] = ()) -> Path:
    """Fine-tune the student on `02_verify/kept.jsonl`; return the stage directory (student in `student/`).

    Traces whose teacher's terms restrict training on outputs are refused unless their terms id is in
    `accept_terms` (the recipe's `provenance.accept_terms`)."""
    out = stage_dir(run_dir, "train")
    src = stage_dir(run_dir, "verify") / "kept.jsonl"
    if not src.is_file():
        raise DistillError(f"train: {src} not found; run `distill verify` first")
    records = read_jsonl(src)
    if not records:
        raise DistillError(f"train: {src} has no kept traces, nothing to train on (see rejected.jsonl)")

    from distill.models import resolve
    from distill.provenance import check_training, model_card, summarize

    accepted = check_training([r.get("teacher") for r in records], list(accept_terms), str(src))
    field = "generate.teacher" if cfg.student == "teacher" else "train.student"
    source = resolve(teacher if cfg.student == "teacher" else cfg.student, field)
    if source.kind == "openai":
        raise DistillError(f"{field}: '{source.ref}' is a server; a student needs local weights "
                           "(set train.student to a model directory, .gguf file or pkg:<package>)")
    stage = begin(out, {"train": cfg, "teacher": teacher, "accept_terms": sorted(accept_terms)},
                  [src] + source.files)
    if stage is None:
        return out
    stage.start()

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from distill.models import bf16_supported, load_hf, prune_layers

    model, tokenizer = load_hf(source, "float32")  # master weights fp32; bf16 only as autocast
    n_layers = model.config.num_hidden_layers
    if cfg.keep_layers is not None:
        model = prune_layers(model, cfg.keep_layers)
    print(f"train: student from {source.name}: {model.config.num_hidden_layers} of {n_layers} layers, "
          f"{model.num_parameters() / 1e6:.1f}M parameters; {len(records)} traces")

    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)

    class _Metrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **(logs or {})}) + "\n")

    use_bf16 = bf16_supported() if cfg.bf16 is None else cfg.bf16
    steps_per_epoch = max(1, len(records) // (cfg.batch_size * cfg.grad_accum))
    args = SFTConfig(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=int(cfg.warmup_ratio * steps_per_epoch * cfg.epochs),
        weight_decay=cfg.weight_decay,
        bf16=use_bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        max_length=cfg.max_length,
        completion_only_loss=True,
        logging_steps=max(1, steps_per_epoch // 5),
        save_strategy="no",
        report_to="none",
        disable_tqdm=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sft_rows(records)),
                         processing_class=tokenizer, callbacks=[_Metrics()])
    result = trainer.train()

    # Write the student under a temporary name, then rename: a crash never leaves a half student.
    tmp, final = out / ".student.tmp", out / "student"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.generation_config.eos_token_id = tokenizer.eos_token_id
    trainer.model.generation_config.pad_token_id = tokenizer.pad_token_id
    trainer.save_model(str(tmp))
    tokenizer.save_pretrained(tmp)
    provenance = summarize([r.get("teacher") for r in records], accepted)
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    (tmp / "README.md").write_text(model_card(f"{Path(run_dir).resolve().name}-student", provenance,
                                              base_model=source.name))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)

    stage.finish(cfg.seed, provenance, traces=len(records), base_model=source.name,
                 params=model.num_parameters(), layers=model.config.num_hidden_layers, bf16=use_bf16,
                 train_loss=result.training_loss, steps=result.global_step,
                 train_runtime_s=result.metrics.get("train_runtime"))
    print(f"train: {result.global_step} steps, loss {result.training_loss:.4f} -> {final}")
    return out


def sft_rows(records: list[dict]) -> list[dict]:
    """Trace records → TRL prompt-completion rows in chat form; the student's prompt is the bare question
    (the last user turn the teacher saw, without the teacher's few-shot demonstrations or system turn)."""
    from distill.tasks import student_messages

    rows = []
    for rec in records:
        question = next(m["content"] for m in reversed(rec["messages"]) if m["role"] == "user")
        rows.append({"prompt": student_messages(question),
                     "completion": [{"role": "assistant", "content": rec["completion"]}]})
    return rows
