"""Peak memory and time of the chunked KD loss (`distill.losses.chunked_loss`) vs the same loss computed
densely (full student and teacher logits, then backward), at 2,048 tokens, vocabularies of 49k and 152k.

    PYTHONPATH=src python benchmarks/kd_loss_memory.py            # ~1-2 min on 2 cores
    PYTHONPATH=src python benchmarks/kd_loss_memory.py --hidden 576 --tokens 1024

Each (vocabulary, arm) runs in its own subprocess so that peak RSS belongs to that arm alone; memory is
the peak RSS above the RSS once the inputs exist (hidden states and output matrices of both models).
Loss: (1−α)·CE + α·T²·KL(teacher ‖ student), α = 0.5, T = 2, forward and backward. A small hidden size
keeps the run short; the logits, which dominate memory, do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def arm(kind: str, tokens: int, vocab: int, hidden: int, repeats: int) -> dict:
    import psutil
    import torch

    from distill.losses import LossSpec, Teacher, chunked_loss, token_losses

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.05).requires_grad_()
    th, tw = torch.randn(tokens, hidden), torch.randn(vocab, hidden) * 0.05
    labels = torch.randint(0, vocab, (tokens,))
    spec = LossSpec(alpha=0.5, temperature=2.0, kind="forward_kl")
    base = psutil.Process().memory_info().rss
    times = []
    for _ in range(repeats):
        h.grad = w.grad = None
        start = time.perf_counter()
        if kind == "naive":
            loss = token_losses(h @ w.T, labels, spec, teacher_logits=th @ tw.T).sum()  # (N, V) tensors, twice+
        else:
            loss = chunked_loss(h, w, labels, spec, Teacher(hidden=th, weight=tw))
        loss.backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"peak_mb": round((peak - base) / 2**20, 1), "time_s": round(min(times), 3), "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocabs", default="49152,151936")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: "naive:152064"
    args = ap.parse_args()
    if args.arm:
        kind, vocab = args.arm.split(":")
        print(json.dumps(arm(kind, args.tokens, int(vocab), args.hidden, args.repeats)))
        return

    result = {"tokens": args.tokens, "hidden": args.hidden}
    for vocab in map(int, args.vocabs.split(",")):
        row = {}
        for kind in ("naive", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--arm", f"{kind}:{vocab}", "--tokens", str(args.tokens),
                                  "--hidden", str(args.hidden), "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, check=True)
            row[kind] = json.loads(out.stdout.strip().splitlines()[-1])
            r = row[kind]
            print(f"vocab {vocab:>6}  {kind:<8} peak {r['peak_mb']:>8.1f} MB  time {r['time_s']:.3f} s  "
                  f"loss {r['loss']:.4f}")
        mem = row["chunked"]["peak_mb"] / row["naive"]["peak_mb"]
        t = row["chunked"]["time_s"] / row["naive"]["time_s"]
        rel = abs(row["chunked"]["loss"] - row["naive"]["loss"]) / abs(row["naive"]["loss"])
        print(f"vocab {vocab:>6}  chunked/naive: memory {mem:.3f}, time {t:.2f}, loss rel. diff {rel:.1e}")
        result[f"vocab_{vocab}"] = {**row, "memory_ratio": round(mem, 4), "time_ratio": round(t, 3)}
        result["memory_ratio_vs_naive"], result["time_ratio_vs_naive"] = round(mem, 4), round(t, 3)  # last = 152k
    result["goal"] = "memory_ratio_vs_naive <= 0.10 and time_ratio_vs_naive <= 1.2 (152k vocabulary)"
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
