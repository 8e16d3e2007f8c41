"""Any OpenAI-compatible server (vLLM, SGLang, ollama, llama.cpp server, OpenAI, DeepSeek) as a teacher.

The official `openai` client does the HTTP work: retries with exponential backoff and jitter on
408/409/429/5xx and connection errors, honouring `Retry-After`, and a per-request timeout. Requests go
one at a time here; bounded concurrency, rate budgets and spend caps are not built yet.
"""

from __future__ import annotations

import time

from distill.teachers import Completion, Sampling, sequential_stream


class OpenAITeacher:
    backend = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout_s: float = 120.0,
                 max_retries: int = 4):
        from openai import OpenAI

        # Local servers (vLLM, llama.cpp) accept any key; a hosted API answers 401, recorded as a failure.
        self.client = OpenAI(base_url=base_url, api_key=api_key or "no-key", timeout=timeout_s,
                             max_retries=max_retries)
        self.model = model

    def complete(self, messages: list[dict], seeds: list[int], sampling: Sampling) -> list[Completion]:
        out = []
        for seed in seeds:  # one request per sample, so each sample keeps its own seed
            start = time.perf_counter()
            r = self.client.chat.completions.create(
                model=self.model, messages=messages, temperature=sampling.temperature, top_p=sampling.top_p,
                max_tokens=sampling.max_tokens, seed=seed, stop=sampling.stop or None,
            )
            choice = r.choices[0]
            message = choice.message
            # DeepSeek and vLLM send reasoning apart from the answer under one of these names.
            reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None)
            out.append(Completion(
                text=message.content or "",
                finish_reason="length" if choice.finish_reason == "length" else "stop",
                prompt_tokens=r.usage.prompt_tokens if r.usage else 0,
                completion_tokens=r.usage.completion_tokens if r.usage else 0,
                seconds=time.perf_counter() - start,
                reasoning=reasoning,
            ))
        return out

    def stream(self, requests, sampling: Sampling):
        return sequential_stream(self, requests, sampling)

    def close(self) -> None:
        self.client.close()
