"""Sampling through transformers: the tokenizer's own chat template, all samples of a prompt in one batch."""

from __future__ import annotations

import time

from distill.models import ModelRef, inference_dtype, load_hf
from distill.teachers import Completion, Sampling, sequential_stream


class _Clock:
    """A transformers streamer that only records when each step's tokens arrive."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFTeacher:
    backend = "hf"

    def __init__(self, model: ModelRef, dtype: str | None = None):
        self.model, self.tokenizer = load_hf(model, dtype or inference_dtype())

    def complete(self, messages: list[dict], seeds: list[int], sampling: Sampling) -> list[Completion]:
        import torch

        tok = self.tokenizer
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        n_prompt = enc.input_ids.shape[1]
        # One seed per batch: transformers samples all sequences of a call from one generator.
        torch.manual_seed(seeds[0])
        greedy = sampling.temperature <= 0
        clock = _Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            rows = self.model.generate(streamer=clock,
                **enc, max_new_tokens=sampling.max_tokens, do_sample=not greedy,
                temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
                top_k=None, num_return_sequences=len(seeds), pad_token_id=tok.pad_token_id or tok.eos_token_id,
                eos_token_id=tok.eos_token_id, stop_strings=sampling.stop or None, tokenizer=tok,
            )
        total = time.perf_counter() - start
        seconds = total / len(seeds)
        # The first put() carries the prompt, the second the first new token: prefill ends there.
        prefill_s = clock.times[1] - start if len(clock.times) > 1 else total
        out = []
        for row in rows[:, n_prompt:].tolist():  # (n, new_tokens)
            stopped = tok.eos_token_id in row
            row = row[: row.index(tok.eos_token_id)] if stopped else row
            text = tok.decode(row, skip_special_tokens=True)
            for s in sampling.stop:  # cut at the first stop string, as llama.cpp and OpenAI do
                if s in text:
                    text, stopped = text[: text.index(s)], True
            out.append(Completion(text, "stop" if stopped else "length", n_prompt, len(row), seconds,
                                  prefill_tokens=n_prompt, prefill_s=prefill_s / len(seeds),
                                  decode_tokens=max(len(row) - 1, 0), decode_s=(total - prefill_s) / len(seeds)))
        return out

    def stream(self, requests, sampling: Sampling):
        return sequential_stream(self, requests, sampling)

    def close(self) -> None:
        pass
