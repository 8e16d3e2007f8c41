"""In-process GGUF sampling through llama-cpp-python.

llama.cpp keeps the KV cache of the previous prompt and reuses its longest common prefix, so repeated
samples of one prompt, and prompts sharing a few-shot prefix, pay for their prompt tokens once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from distill.teachers import Completion, Sampling, sequential_stream


class LlamaCppTeacher:
    backend = "llamacpp"

    def __init__(self, path: Path, n_ctx: int = 2048, seed: int = 0):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=os.cpu_count() or 1, seed=seed,
                         verbose=False)

    def complete(self, messages: list[dict], seeds: list[int], sampling: Sampling) -> list[Completion]:
        import llama_cpp

        out = []
        ctx = self.llm._ctx.ctx  # llama.cpp's own timers split prefill from decode exactly
        for seed in seeds:
            llama_cpp.llama_perf_context_reset(ctx)
            start = time.perf_counter()
            r = self.llm.create_chat_completion(
                messages=messages, temperature=sampling.temperature, top_p=sampling.top_p,
                max_tokens=sampling.max_tokens, stop=sampling.stop or None, seed=seed,
            )
            choice = r["choices"][0]
            perf = llama_cpp.llama_perf_context(ctx)
            out.append(Completion(
                text=choice["message"]["content"] or "",
                finish_reason="length" if choice["finish_reason"] == "length" else "stop",
                prompt_tokens=r["usage"]["prompt_tokens"],
                completion_tokens=r["usage"]["completion_tokens"],
                seconds=time.perf_counter() - start,
                prefill_tokens=perf.n_p_eval, prefill_s=perf.t_p_eval_ms / 1000,
                decode_tokens=perf.n_eval, decode_s=perf.t_eval_ms / 1000,
            ))
        return out

    def stream(self, requests, sampling: Sampling):
        return sequential_stream(self, requests, sampling)

    def close(self) -> None:
        self.llm.close()
