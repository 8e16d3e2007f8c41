"""Any OpenAI-compatible server (vLLM, SGLang, ollama, llama.cpp server, OpenAI, DeepSeek) as a teacher.

    python -m llama_cpp.server --model SmolLM2.gguf --port 8000 --model_alias smol &
    distill generate recipes/demo.yaml --set 'generate.teacher=http://127.0.0.1:8000/v1#smol'

How a server is pushed, and kept from being pushed too hard:
- `concurrency` requests in flight (httpx on an asyncio loop in a background thread, so that the
  synchronous `stream()` can hand each result to generate as soon as it is done);
- one HTTP request per sample, each with its own seed: servers disagree on `n` (llama.cpp's ignores it,
  OpenAI shares one seed among the n choices), and a per-sample request keeps every sample resumable;
- retries with exponential backoff and full jitter on 408/409/429/5xx, dropped connections, timeouts
  and unparseable bodies, waiting at least what `Retry-After` says;
- requests- and tokens-per-minute budgets (token buckets; tokens are estimated before sending as prompt
  characters / 4 + max_tokens, then corrected with the usage the server reports).

The `openai` client is not used for the requests: its retries are invisible to the rate budgets (a
retried request must pass them again) and cap `Retry-After` at 60 s. httpx does the HTTP.

Bad input fails at start, in one line, rather than as thousands of failed records: an unreachable server,
a model the server does not list, a rejected API key. A request the server refuses for good (4xx, e.g. a
prompt longer than the context) stops the run with the server's reason. A request that still fails after
all retries is yielded as its exception; generate records it as failed and the next run retries it.

Top-k logprobs (`Sampling.logprobs = k`, at most 20, the OpenAI limit): servers name tokens by their
text. They are mapped back to ids by the server's own ids where it sends them (llama.cpp's C++
`llama-server` sends `id`; vLLM with `--return-tokens-as-token-ids` sends `token_id:N`), otherwise with
the teacher's tokenizer (`TeacherOptions.tokenizer`). A text several ids share (e.g. partial UTF-8
bytes) or none has is stored as id -1; a position with fewer than k alternatives is padded with id -1
and logprob -inf. Trainers mask ids < 0.
"""

from __future__ import annotations

import asyncio
import email.utils
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator

import numpy as np

from distill.config import DistillError
from distill.logprobs import TopK
from distill.teachers import Completion, Request, Result, Sampling, TeacherOptions

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for `top_logprobs`; vLLM's default `--max-logprobs` too
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}  # and any other 5xx
BACKOFF_BASE_S = 0.25
BACKOFF_MAX_S = 30.0


class RetryableError(Exception):
    """A response worth trying again (429, 5xx, a malformed body), with the server's `Retry-After`."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class OpenAITeacher:
    backend = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None, options: TeacherOptions | None = None):
        import httpx

        self.options = options = options or TeacherOptions()
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._vocab: dict[str, int] | None = None
        self._check_server(httpx)
        # The loop lives in its own thread for the teacher's lifetime; close() cancels what runs there.
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="openai-teacher", daemon=True)
        self.thread.start()
        self._closed = False
        self.http = self._call(self._make_client(httpx))
        self.slots = asyncio.Semaphore(options.concurrency)
        self.rpm = _Budget(options.rpm) if options.rpm else None
        self.tpm = _Budget(options.tpm) if options.tpm else None

    # --- the Teacher protocol -------------------------------------------------------------------------

    def complete(self, messages: list[dict], seeds: list[int], sampling: Sampling) -> list[Completion]:
        self._check_sampling(sampling)
        return self._call(self._answer(Request("", messages, seeds), sampling))

    def stream(self, requests: Iterable[Request], sampling: Sampling) -> Iterator[Result]:
        self._check_sampling(sampling)
        done: queue.Queue = queue.Queue()  # (request, future), filled from the loop thread
        pending = set()
        todo = iter(requests)
        # Twice the concurrency in requests keeps every slot busy while finished ones are handed over.
        window = 2 * self.options.concurrency

        def refill():
            while len(pending) < window:
                req = next(todo, None)
                if req is None:
                    return
                fut = asyncio.run_coroutine_threadsafe(self._answer(req, sampling), self.loop)
                pending.add(fut)
                fut.add_done_callback(lambda f, r=req: done.put((r, f)))

        try:
            refill()
            while pending:
                req, fut = done.get()
                pending.discard(fut)
                refill()
                error = fut.exception()
                if isinstance(error, DistillError):
                    raise error  # bad input: one line for the user, not one failed record per request
                yield req, (error if error is not None else fut.result())
        finally:
            for fut in pending:  # early stop (a spend cap, an error, Ctrl-C): nothing more is sent
                fut.cancel()

    def close(self) -> None:
        """Cancel every request still in flight and stop the loop; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._shutdown(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            if not self.thread.is_alive():
                self.loop.close()

    # --- one request, retried -------------------------------------------------------------------------

    async def _answer(self, req: Request, sampling: Sampling) -> list[Completion]:
        """All of one request's samples; if one fails for good, the others are cancelled (the request is
        recorded as failed as a whole and retried whole)."""
        tasks = [asyncio.ensure_future(self._sample(req, seed, sampling)) for seed in req.seeds]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()

    async def _sample(self, req: Request, seed: int, sampling: Sampling) -> Completion:
        import httpx

        body = {"model": self.model, "messages": req.messages, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "max_tokens": sampling.max_tokens, "seed": seed}
        if sampling.stop:
            body["stop"] = sampling.stop
        if sampling.logprobs:
            body["logprobs"], body["top_logprobs"] = True, sampling.logprobs
        estimate = _estimate_tokens(req.messages) + sampling.max_tokens
        for attempt in range(self.options.max_retries + 1):
            retry_after = None
            async with self.slots:  # a slot first, then the budgets: sends never bunch up behind a wait
                if self.rpm:
                    await self.rpm.take(1)
                if self.tpm:
                    await self.tpm.take(estimate)
                start = time.perf_counter()
                try:
                    async with asyncio.timeout(self.options.timeout_s):  # the whole request, not per read
                        r = await self.http.post(f"{self.base_url}/chat/completions", json=body)
                    comp = self._parse(r, req, sampling, time.perf_counter() - start)
                    used = comp.prompt_tokens + comp.completion_tokens
                    if self.tpm and used:  # a server that reports no usage keeps the estimate
                        self.tpm.give_back(estimate - used)
                    return comp
                except RetryableError as e:
                    error, retry_after = e, e.retry_after
                except TimeoutError:
                    error = TimeoutError(f"no answer within {self.options.timeout_s:g} s (generate.timeout_s)")
                except httpx.RequestError as e:  # refused, reset, dropped mid-response, undecodable
                    error = e
            if attempt == self.options.max_retries:
                break
            # Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"), never below Retry-After.
            wait = random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** attempt))
            await asyncio.sleep(max(wait, retry_after or 0.0))
        raise error

    def _parse(self, r, req: Request, sampling: Sampling, seconds: float) -> Completion:
        if r.status_code != 200:
            self._refuse(r, req)
        try:
            data = r.json()
            choice = data["choices"][0]
            message = choice["message"]
            text = message.get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RetryableError(f"malformed response body: {r.text[:120]!r}") from None
        usage = data.get("usage") or {}
        return Completion(
            text=text,
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            seconds=seconds,
            # DeepSeek and vLLM send reasoning apart from the answer under one of these names.
            reasoning=message.get("reasoning_content") or message.get("reasoning"),
            topk=self._topk(choice.get("logprobs"), sampling.logprobs) if sampling.logprobs else None,
        )

    def _refuse(self, r, req: Request):
        """Raise for a non-200 answer: RetryableError if it may pass later, DistillError if never."""
        reason = _server_message(r)
        if r.status_code in RETRY_STATUS or r.status_code >= 500:
            raise RetryableError(f"HTTP {r.status_code}: {reason}", _retry_after(r.headers))
        if r.status_code in (401, 403):
            raise DistillError(self._key_message(r.status_code, reason))
        if r.status_code == 400 and _is_context_error(reason):
            raise DistillError(f"generate.teacher: prompt '{req.key}' is longer than the teacher's context "
                               f"(the server said: {reason}); shorten the prompts, use fewer task.few_shot "
                               "demonstrations or a smaller generate.max_tokens")
        raise DistillError(f"generate.teacher: {self.base_url} refused the request for prompt '{req.key}' "
                           f"with HTTP {r.status_code}: {reason}")

    # --- logprobs ---------------------------------------------------------------------------------------

    def _topk(self, logprobs: dict | None, k: int) -> TopK:
        content = (logprobs or {}).get("content")
        if content is None:
            raise DistillError(f"generate.logprobs: {self.base_url} sent no logprobs (this server or model "
                               "does not support them); set generate.logprobs: 0")
        token_ids = np.full(len(content), -1, dtype=np.int32)
        ids = np.full((len(content), k), -1, dtype=np.int32)
        lps = np.full((len(content), k), -np.inf, dtype=np.float32)
        for t, entry in enumerate(content):
            token_ids[t] = self._token_id(entry)
            # Best first; llama.cpp's server adds the sampled token when it is not in the top k.
            top = sorted(entry.get("top_logprobs") or [], key=lambda e: -e["logprob"])[:k]
            for j, alt in enumerate(top):
                ids[t, j], lps[t, j] = self._token_id(alt), alt["logprob"]
        return TopK(token_ids, ids, lps)

    def _token_id(self, entry: dict) -> int:
        if isinstance(entry.get("id"), int):  # llama.cpp's C++ server
            return entry["id"]
        token = entry.get("token", "")
        if token.startswith("token_id:"):  # vLLM --return-tokens-as-token-ids
            return int(token[len("token_id:"):])
        if self._vocab is None:
            if not self.options.tokenizer:
                raise DistillError(f"generate.logprobs: {self.base_url} names tokens by text, not id; set "
                                   "generate.teacher_tokenizer to the teacher's tokenizer (a Hugging Face "
                                   "directory, a .gguf file or pkg:<package>) to map them")
            self._vocab = token_pieces(self.options.tokenizer)
        return self._vocab.get(token, -1)

    # --- start, checks and plumbing ---------------------------------------------------------------------

    def _check_server(self, httpx) -> None:
        """Ask `/models` once, so a wrong URL, key or model name fails now, in one line."""
        try:
            r = httpx.get(f"{self.base_url}/models", headers=self.headers, timeout=min(self.options.timeout_s, 30))
        except httpx.HTTPError as e:
            raise DistillError(f"generate.teacher: cannot reach {self.base_url} ({type(e).__name__}: {e}); "
                               "is the server running and the URL right?") from None
        if r.status_code in (401, 403):
            raise DistillError(self._key_message(r.status_code, _server_message(r)))
        if r.status_code != 200:
            return  # some servers and proxies do without /models; the first request will tell
        try:
            served = [m["id"] for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError):
            return
        if self.model not in served and f"{self.model}:latest" not in served:  # ollama lists "name:latest"
            shown = ", ".join(served[:20]) + (" …" if len(served) > 20 else "")
            raise DistillError(f"generate.teacher: {self.base_url} does not serve model '{self.model}' "
                               f"(it serves: {shown or 'nothing'}); put one of these after '#'")

    def _key_message(self, status: int, reason: str) -> str:
        what = "no API key was given" if not self.api_key else "the API key was refused"
        return (f"generate.api_key_env: {self.base_url} answered {status} ({reason}): {what}; put the key in "
                "the environment variable named by generate.api_key_env or in the file generate.api_key_file")

    def _check_sampling(self, sampling: Sampling) -> None:
        if sampling.logprobs > MAX_TOP_LOGPROBS:
            raise DistillError(f"generate.logprobs: OpenAI-compatible servers return at most {MAX_TOP_LOGPROBS} "
                               f"top logprobs per token, got {sampling.logprobs}")

    async def _make_client(self, httpx):
        n = self.options.concurrency
        return httpx.AsyncClient(headers=self.headers, timeout=self.options.timeout_s,
                                 limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.http.aclose()

    def _call(self, coro, timeout: float | None = None):
        """Run `coro` on the teacher's loop and wait for its result here."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


class _Budget:
    """A token bucket: refilled at `per_minute / 60` a second, holding at most one second's worth (at least
    one unit), so the budget holds over every window rather than per calendar minute; hosted APIs enforce
    their limits over such short windows. A request bigger than the bucket waits for a full bucket and
    leaves it negative, so it still passes, and what follows pays for it."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()  # waiters are served in order

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, amount: float) -> None:
        async with self.lock:
            while True:
                self._refill()
                need = min(amount, self.capacity)
                if self.level >= need:
                    break
                await asyncio.sleep((need - self.level) / self.rate)
            self.level -= amount

    def give_back(self, amount: float) -> None:
        """Correct an estimate: positive when less was used than taken, negative when more."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)


def token_pieces(ref: str) -> dict[str, int]:
    """Token text -> id for the tokenizer of model reference `ref`; texts several ids share map to -1.

    A GGUF is read with llama.cpp (`vocab_only`), whose `detokenize` is what llama.cpp's server uses for
    the token texts it returns; a Hugging Face directory with its tokenizer's `decode`, as vLLM does."""
    from distill.models import resolve

    model = resolve(ref, "generate.teacher_tokenizer")
    if model.kind == "gguf":
        from distill.llama_load import load_llama

        llm = load_llama(model.path, vocab_only=True)
        pieces = [llm.detokenize([i]).decode("utf-8", errors="ignore") for i in range(llm.n_vocab())]
        llm.close()
    elif model.kind == "hf_dir":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model.path, trust_remote_code=False)
        pieces = [tok.decode([i]) for i in range(len(tok))]
    else:
        raise DistillError(f"generate.teacher_tokenizer: '{ref}' is a server; name a local tokenizer "
                           "(a Hugging Face directory, a .gguf file or pkg:<package>)")
    ids: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        ids[piece] = -1 if piece in ids else i
    return ids


def _estimate_tokens(messages: list[dict]) -> int:
    """Prompt tokens before the server counts them: ~4 characters a token (OpenAI's rule of thumb for
    English) plus a few per message for the template's role markers."""
    return sum(len(str(m.get("content", ""))) // 4 + 4 for m in messages)


def _retry_after(headers) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP date)."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _server_message(r) -> str:
    """The server's own reason, in one line: OpenAI's `{"error": {"message": …}}`, FastAPI's `detail`."""
    try:
        data = r.json()
        err = data.get("error") if isinstance(data, dict) else None
        msg = (err.get("message") if isinstance(err, dict) else err) or data.get("detail") or data.get("message")
    except (ValueError, AttributeError):
        msg = None
    msg = str(msg or r.text or r.reason_phrase).strip()
    return " ".join(msg.split())[:300]


def _is_context_error(reason: str) -> bool:
    text = reason.lower()
    return "context" in text and any(w in text for w in ("length", "window", "exceed", "too long", "maximum"))

