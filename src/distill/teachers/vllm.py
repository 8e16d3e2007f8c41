"""vLLM's offline engine (`vllm.LLM`) as a teacher, on a GPU; chosen with `generate.backend: vllm`.

    distill generate recipes/demo.yaml --set generate.teacher=Qwen/Qwen2.5-7B-Instruct \
        --set generate.backend=vllm --set generate.concurrency=256

vLLM is an optional dependency (`pip install vllm`, CUDA); it is imported here only, and without it the
backend stops with one clear line. Every sample is its own prompt with `SamplingParams(n=1, seed=…)`,
so each sample keeps its own seed; vLLM's automatic prefix caching computes the shared prompt once.
`stream` hands vLLM `concurrency` samples per `LLM.chat` call (vLLM batches within a call, so give it
hundreds on a GPU) and yields each request as its call returns. Top-k logprobs are vLLM's raw logprobs
(before temperature), the teacher's own distribution, as the other backends store.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np

from distill.config import DistillError
from distill.logprobs import TopK
from distill.models import ModelRef
from distill.teachers import Completion, Request, Result, Sampling, complete_via_stream


class VLLMTeacher:
    backend = "vllm"

    def __init__(self, model: ModelRef, seed: int = 0, concurrency: int = 256):
        try:
            from vllm import LLM
        except ImportError:
            raise DistillError("generate.backend: vllm is not installed (pip install vllm; it needs a CUDA GPU)") \
                from None
        self.llm = LLM(model=str(model.path), seed=seed, trust_remote_code=False)
        self.concurrency = concurrency

    def complete(self, messages: list[dict], seeds: list[int], sampling: Sampling) -> list[Completion]:
        return complete_via_stream(self, messages, seeds, sampling)

    def stream(self, requests: Iterable[Request], sampling: Sampling) -> Iterator[Result]:
        chunk: list[Request] = []
        for req in requests:
            chunk.append(req)
            if sum(len(r.seeds) for r in chunk) >= self.concurrency:
                yield from self._run(chunk, sampling)
                chunk = []
        if chunk:
            yield from self._run(chunk, sampling)

    def close(self) -> None:
        del self.llm  # vLLM frees the GPU memory when the engine is collected

    def _run(self, requests: list[Request], sampling: Sampling) -> Iterator[Result]:
        from vllm import SamplingParams

        chats, params = [], []
        for req in requests:
            for seed in req.seeds:
                chats.append(req.messages)
                params.append(SamplingParams(
                    n=1, seed=seed, temperature=sampling.temperature, top_p=sampling.top_p,
                    max_tokens=sampling.max_tokens, stop=sampling.stop or None,
                    logprobs=sampling.logprobs or None))
        start = time.perf_counter()
        try:
            outputs = self.llm.chat(chats, sampling_params=params, use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - the chunk's requests fail, later ones go on
            for req in requests:
                yield req, e
            return
        share = (time.perf_counter() - start) / max(len(outputs), 1)
        it = iter(outputs)
        for req in requests:
            comps = []
            for _ in req.seeds:
                out = next(it)
                o = out.outputs[0]
                comps.append(Completion(
                    text=o.text, finish_reason="length" if o.finish_reason == "length" else "stop",
                    prompt_tokens=len(out.prompt_token_ids or []), completion_tokens=len(o.token_ids),
                    seconds=share, topk=_topk(o, sampling.logprobs)))
            yield req, comps


def _topk(output, k: int) -> TopK | None:
    """vLLM gives, per position, {token id: Logprob} with the top k plus the sampled token; keep the top k."""
    if not k or not output.logprobs:
        return None
    ids = np.zeros((len(output.token_ids), k), dtype=np.int32)
    lps = np.full((len(output.token_ids), k), -np.inf, dtype=np.float32)
    for t, position in enumerate(output.logprobs):
        best = sorted(position.items(), key=lambda kv: -kv[1].logprob)[:k]
        for j, (tid, lp) in enumerate(best):
            ids[t, j], lps[t, j] = tid, lp.logprob
    return TopK(list(output.token_ids), ids, lps)
