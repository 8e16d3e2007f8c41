"""Serve a student over an OpenAI-compatible HTTP API, safely by default.

    distill serve runs/demo/05_export/student-f16.gguf --port 8000
    DISTILL_API_KEY=secret distill serve runs/demo --host 0.0.0.0

MODEL is a `.gguf` file (llama.cpp), a Hugging Face directory (transformers), a run directory (its
exported GGUF, else its trained student) or `pkg:<package>`. Routes: `/v1/chat/completions` and
`/v1/completions` (both with `stream: true` as server-sent events), `/v1/models`, `/health`.

Defaults are the safe ones: the server binds 127.0.0.1; with an API key (`--api-key-file` or
`DISTILL_API_KEY`) every route but `/health` needs `Authorization: Bearer KEY`, and binding beyond
loopback without a key is refused. Bodies over `max_body_bytes` get 413 (Content-Length and the bytes
actually received are both counted); `max_tokens` and `n` are capped (400); one request runs at a time
(llama.cpp holds one context) and at most `queue` more wait, beyond that 503 with Retry-After; each
request has a deadline; SIGTERM stops accepting, finishes what is running (uvicorn's graceful
shutdown) and exits. Chat templates come from model files, which anyone can write, so they are
rendered in Jinja's immutable sandbox and a template that reaches for Python internals is refused.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill.config import DistillError
from distill.models import llama_threads

log = logging.getLogger("distill.serve")


@dataclass
class ServeConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: no key; then only a loopback host is allowed
    model_name: str | None = None  # the id clients see (default: from the file or run)
    max_tokens: int = 1024  # cap on a request's max_tokens (and its default)
    max_n: int = 4  # cap on choices per request
    queue: int = 16  # requests that may wait while one runs; more get 503
    timeout_s: float = 120.0  # per request, waiting included
    max_body_bytes: int = 1 << 20
    n_ctx: int = 4096  # llama.cpp context (prompt + completion tokens)
    drain_s: float = 30.0  # on SIGTERM, how long running requests may take to finish

    def __post_init__(self):
        for name in ("max_tokens", "max_n", "max_body_bytes", "n_ctx"):
            if getattr(self, name) < 1:
                raise DistillError(f"serve: --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.queue < 0 or self.timeout_s <= 0 or not 0 <= self.port <= 65535:
            raise DistillError("serve: --queue must be >= 0, --timeout > 0 and --port in 0..65535")
        if self.api_key is not None and not self.api_key.strip():
            raise DistillError("serve: the API key is empty")
        if self.api_key is None and not is_loopback(self.host):
            raise DistillError(f"serve: --host {self.host} is reachable from other machines; set an API key "
                               "(--api-key-file F or DISTILL_API_KEY) or bind 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def read_api_key(path: Path | None) -> str | None:
    """The key from `--api-key-file` (first line), else `DISTILL_API_KEY`, else None."""
    if path is not None:
        try:
            key = Path(path).read_text().strip().splitlines()
        except OSError as e:
            raise DistillError(f"serve: --api-key-file {path}: {e.strerror}") from None
        if not key or not key[0].strip():
            raise DistillError(f"serve: --api-key-file {path} is empty")
        return key[0].strip()
    return os.environ.get("DISTILL_API_KEY") or None


# --- Chat templates, sandboxed ---------------------------------------------------------------------

class TemplateRefused(Exception):
    """A chat template that raised (its own `raise_exception`) or touched what the sandbox forbids."""


def compile_template(source: str, where: str, bos: str = "", eos: str = ""):
    """A render function for a Jinja chat template, in `ImmutableSandboxedEnvironment` (no attribute access
    to Python internals, no mutation of lists or dicts), with the globals HF templates expect. The template
    is rendered once on a plain chat here, so a hostile one is refused at start, not at the first request."""
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    def raise_exception(message):
        raise TemplateRefused(str(message))

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                 ensure_ascii=ensure_ascii)
    try:
        template = env.from_string(source)
    except jinja2.TemplateError as e:
        raise DistillError(f"serve: the chat template in {where} does not parse ({e})") from None

    def render(messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=bos, eos_token=eos)
        except SecurityError as e:
            raise TemplateRefused(f"the chat template tried something the sandbox forbids ({e})") from None
        except TemplateRefused:
            raise
        except Exception as e:  # any other failure of a template is the template's, not the server's
            raise TemplateRefused(f"the chat template failed on these messages ({type(e).__name__}: {e})") from None

    try:
        render([{"role": "user", "content": "Hello"}])
    except TemplateRefused as e:
        if "sandbox" in str(e):
            raise DistillError(f"serve: refused the chat template in {where}: {e}") from None
    return render


# --- Backends: llama.cpp for GGUF, transformers for HF directories ------------------------------------

@dataclass
class Params:
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None


class LlamaBackend:
    """A GGUF in llama.cpp, through llama-cpp-python. Not thread-safe: only the server's worker calls it."""

    def __init__(self, path: Path, n_ctx: int):
        from distill.llama_load import load_llama
        from distill.models import gguf_metadata

        meta = gguf_metadata(path)  # a context past the trained length only degrades answers
        n_ctx = min(n_ctx, meta.get(f"{meta.get('general.architecture')}.context_length") or n_ctx)
        self.llm = load_llama(path, n_ctx=n_ctx, n_threads=llama_threads())
        self.n_ctx = n_ctx
        meta = self.llm.metadata
        bos = self._text(self.llm.token_bos())
        self.add_bos = self.llm._model.add_bos_token()
        source = meta.get("tokenizer.chat_template")
        self.render = compile_template(source, str(path), bos, self._text(self.llm.token_eos())) if source else None
        self.bos_text = bos

    def _text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

    def encode(self, text: str) -> list[int]:
        if self.add_bos and self.bos_text and text.startswith(self.bos_text):
            text = text[len(self.bos_text):]  # the template wrote BOS and llama.cpp adds it: keep one
        return self.llm.tokenize(text.encode(), add_bos=self.add_bos, special=True)

    def generate(self, ids: list[int], p: Params, on_text: Callable[[str], None],
                 should_stop: Callable[[], bool]) -> tuple[str, int]:
        """Stream the completion of `ids` to `on_text`; return (finish_reason, completion tokens).

        A token loop over `Llama.generate` rather than `create_completion(stream=True)`: that one
        re-detokenizes the whole completion at every token (quadratic) and was seen to stall on a random
        model's byte tokens; here each token's bytes go through an incremental UTF-8 decoder once."""
        import codecs
        import random

        import llama_cpp

        self.llm.set_seed(p.seed if p.seed is not None else random.getrandbits(31))
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        cut = _StopText(p.stop, on_text)
        vocab, n, finish = self.llm._model.vocab, 0, "length"
        # OpenAI semantics: temperature and top_p only; llama.cpp's extra samplers (top-k 40, min-p 0.05)
        # are turned off, so a request means the same here as on any other OpenAI-compatible server.
        for token in self.llm.generate(ids, top_k=0, top_p=p.top_p, min_p=0.0, temp=p.temperature,
                                       repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            n += 1
            cut.feed(utf8.decode(self._piece(token)))
            if cut.hit:
                finish = "stop"
                break
            if n >= p.max_tokens or should_stop():
                break
        cut.feed(utf8.decode(b"", final=True))
        cut.flush()
        return finish, n

    def _piece(self, token: int) -> bytes:
        """The bytes of one token (llama.cpp returns minus the size needed when the buffer is short)."""
        import ctypes

        import llama_cpp

        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            got = llama_cpp.llama_token_to_piece(self.llm._model.vocab, token, buf, size, 0, False)
            if got >= 0:
                return buf.raw[:got]
            size = -got

    def close(self) -> None:
        self.llm.close()


class HFBackend:
    """An HF directory through transformers (safetensors only, no remote code)."""

    def __init__(self, path: Path, n_ctx: int):
        from distill.models import inference_dtype, load_hf, resolve

        self.model, self.tok = load_hf(resolve(str(path), "serve"), inference_dtype())
        self.n_ctx = min(n_ctx, getattr(self.model.config, "max_position_embeddings", n_ctx) or n_ctx)
        source = self.tok.chat_template if isinstance(self.tok.chat_template, str) else None
        self.render = compile_template(source, str(path), self.tok.bos_token or "",
                                       self.tok.eos_token or "") if source else None

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def generate(self, ids: list[int], p: Params, on_text: Callable[[str], None],
                 should_stop: Callable[[], bool]) -> tuple[str, int]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

        cut = _StopText(p.stop, on_text)

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                cut.feed(text)

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cut.hit or should_stop(), dtype=torch.bool)

        if p.seed is not None:
            torch.manual_seed(p.seed)
        greedy = p.temperature <= 0
        with torch.inference_mode():
            row = self.model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=p.max_tokens, do_sample=not greedy, temperature=None if greedy else p.temperature,
                top_p=None if greedy else p.top_p, top_k=None, eos_token_id=self.tok.eos_token_id,
                pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id,
                streamer=Streamer(self.tok, skip_prompt=True, skip_special_tokens=True),
                stopping_criteria=StoppingCriteriaList([Stop()]))
        cut.flush()
        new = row[0, len(ids):].tolist()
        return ("stop" if cut.hit or self.tok.eos_token_id in new else "length"), len(new)

    def close(self) -> None:
        pass


class _StopText:
    """Cut streamed text at the first stop string, holding back a tail that may be the start of one
    (transformers' `stop_strings` stops generation but keeps the string; both backends use this)."""

    def __init__(self, stops: list[str], emit: Callable[[str], None]):
        self.stops, self.emit, self.buf, self.hit = [s for s in stops if s], emit, "", False

    def feed(self, text: str) -> None:
        if self.hit:
            return
        self.buf += text
        found = [self.buf.find(s) for s in self.stops if s in self.buf]
        if found:
            self.emit(self.buf[: min(found)])
            self.buf, self.hit = "", True
            return
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])), default=0)
        if len(self.buf) > keep:
            self.emit(self.buf[: len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]

    def flush(self) -> None:
        if not self.hit and self.buf:
            self.emit(self.buf)
        self.buf = ""


def resolve_model(model: str) -> tuple[str, Path, str]:
    """(kind, path, default model id) for a .gguf, HF dir, run dir or pkg: reference."""
    from distill.models import resolve
    from distill.rundir import read_meta, stage_dir

    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():  # a run directory
        exported = read_meta(stage_dir(path, "export"))
        name = exported.get("model_name") or f"{path.resolve().name}-student"
        for entry in (exported.get("files") or {}).values():  # in the order export.quantize listed them
            gguf = stage_dir(path, "export") / entry["path"]
            if gguf.is_file():
                return "gguf", gguf, name
        student = stage_dir(path, "train") / "student"
        if (student / "config.json").is_file():
            return "hf_dir", student, name
        raise DistillError(f"serve: {model} is neither a model nor a run directory with an exported or trained "
                           "student (no config.json, 05_export/*.gguf or 03_train/student)")
    ref = resolve(model, "serve")
    if ref.kind == "openai":
        raise DistillError(f"serve: {model} is a server already; give a .gguf file or a model directory")
    return ref.kind, ref.path, ref.name


def load_backend(kind: str, path: Path, n_ctx: int):
    return LlamaBackend(path, n_ctx) if kind == "gguf" else HFBackend(path, n_ctx)


# --- The HTTP API -----------------------------------------------------------------------------------

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields we do not implement (logit_bias, …) are ignored

    model: Optional[str] = None
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1)] = 1
    stop: Union[str, Annotated[list[str], Field(max_length=4)], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Optional[Annotated[int, Field(ge=1)]] = None  # the newer name for max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, Annotated[list[str], Field(min_length=1)]]


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


_ERRORS = {400: {"description": "Invalid request"}, 401: {"description": "Missing or wrong API key"},
           413: {"description": "Body too large"}, 503: {"description": "Queue full"}}


class _Guard:
    """ASGI middleware, outermost: the API key (before any body is read), then the body size limit. The
    body is read here in full (it is small by construction) and replayed to the app, so a body that lies
    about its Content-Length, or sends none, is still cut off at the limit."""

    def __init__(self, app, api_key: str | None = None, max_body: int = 1 << 20):
        self.app, self.key, self.max_body = app, api_key.encode() if api_key else None, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            if not (given.startswith(b"Bearer ") and hmac.compare_digest(given[7:].strip(), self.key)):
                return await _error(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                    headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_body:
                return await self._too_large(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices, for streams

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        await _error(413, f"request body over {self.max_body} bytes", headers={"Connection": "close"})(
            scope, receive, send)


class _Job:
    """One admitted request: the worker thread fills `events`; the endpoint reads them."""

    def __init__(self, loop, deadline: float):
        self.loop, self.deadline, self.cancelled, self.started = loop, deadline, False, False
        self.events: asyncio.Queue = asyncio.Queue()

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def next(self) -> tuple:
        """The next event, or a timeout error once the deadline passed (the worker may be stuck on another
        request: the deadline holds on this side too, and the worker skips a job cancelled here)."""
        try:
            return await asyncio.wait_for(self.events.get(), max(self.deadline - time.monotonic(), 0.001))
        except TimeoutError:
            self.cancelled = True
            return ("error", 504 if self.started else 503,
                    f"request {'did not finish' if self.started else 'timed out in the queue'} within the timeout")


def _quiet_signals() -> None:
    """Block SIGTERM/SIGINT in the worker thread (and the compute threads llama.cpp starts from it), so the
    kernel delivers them to the main thread, which runs the event loop and the graceful drain, and never
    interrupts a native decode call."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})


def create_app(cfg: ServeConfig, backend, model_id: str) -> FastAPI:
    """The FastAPI app around a loaded backend (tests and benchmarks call this directly)."""
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-serve", initializer=_quiet_signals)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.shutdown(wait=True)  # after uvicorn's graceful drain: what is still running finishes first
        backend.close()

    app = FastAPI(title="distill serve", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API of a distilled student.")
    state = {"pending": 0, "created": int(time.time())}
    app.state.worker, app.state.backend = worker, backend

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        return _error(400, f"{loc or 'body'}: {err.get('msg')}", loc or None)

    @app.exception_handler(RecursionError)  # JSON nested thousands deep: the parser's limit, the client's fault
    async def _deep(request: Request, exc: RecursionError):
        return _error(400, "body: JSON nested too deeply")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.headers)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "pending": state["pending"]}

    @app.get("/v1/models", responses=_ERRORS)
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": state["created"],
                                            "owned_by": "distill"}]}

    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def chat_completions(req: ChatRequest):
        if backend.render is None:
            raise APIError(400, f"{model_id} has no chat template; use /v1/completions")
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) or m.content is None
                     else "".join(p.text for p in m.content)} for m in req.messages]
        return await _serve(req, [messages], chat=True)

    @app.post("/v1/completions", responses=_ERRORS)
    async def completions(req: CompletionRequest):
        return await _serve(req, [req.prompt] if isinstance(req.prompt, str) else req.prompt, chat=False)

    async def _serve(req, inputs: list, chat: bool):
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if max_tokens is not None and max_tokens > cfg.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's cap of {cfg.max_tokens}", "max_tokens")
        if req.n * len(inputs) > cfg.max_n:
            raise APIError(400, f"n × prompts = {req.n * len(inputs)} is over this server's cap of {cfg.max_n}", "n")
        if req.stream and req.n * len(inputs) > 1:
            raise APIError(400, "stream supports one choice (n=1, one prompt)", "n")
        if state["pending"] > cfg.queue:  # one running plus `queue` waiting
            raise APIError(503, "server busy: the request queue is full", headers={"Retry-After": "1"})
        params = Params(max_tokens or 0, req.temperature, req.top_p,
                        [req.stop] if isinstance(req.stop, str) else list(req.stop or []), req.seed)
        job = _Job(asyncio.get_running_loop(), time.monotonic() + cfg.timeout_s)
        # Counted until the worker is done with the job (see `_run`), not until the response is: a client that
        # leaves before its stream starts must not hold a queue slot forever.
        state["pending"] += 1
        try:
            asyncio.get_running_loop().run_in_executor(worker, _run, job, inputs * req.n, params, chat)
            first = await job.next()
        except BaseException:
            job.cancelled = True
            raise
        if first[0] == "error":
            raise APIError(first[1], first[2], headers={"Retry-After": "1"} if first[1] == 503 else None)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, rid, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(job, rid, chat)

    def _run(job: _Job, inputs: list, params: Params, chat: bool) -> None:
        """Runs in the single worker thread: every backend call happens here, one request at a time."""
        try:
            if job.cancelled:
                return job.emit("error", 499, "client went away")
            prompts = []
            for item in inputs:
                ids = backend.encode(backend.render(item) if chat else item)
                if not ids:  # nothing to condition on: llama.cpp asserts, transformers raises
                    return job.emit("error", 400, "prompt: empty (no tokens to continue from)")
                room = backend.n_ctx - len(ids)
                if room < 1 or params.max_tokens > room:
                    return job.emit("error", 400, f"the prompt is {len(ids)} tokens; with max_tokens "
                                    f"{params.max_tokens or 1} it does not fit the context of {backend.n_ctx}")
                prompts.append((ids, Params(params.max_tokens or min(cfg.max_tokens, room), params.temperature,
                                            params.top_p, params.stop, params.seed)))
            job.started = True
            job.emit("start")
            for index, (ids, p) in enumerate(prompts):
                finish, n = backend.generate(ids, p, lambda text, i=index: job.emit("delta", i, text),
                                             lambda: job.cancelled or time.monotonic() > job.deadline)
                if time.monotonic() > job.deadline and not job.cancelled:
                    return job.emit("error", 504, f"request did not finish within {cfg.timeout_s:g} s")
                job.emit("end", index, finish, len(ids), n)
            job.emit("done")
        except TemplateRefused as e:
            job.emit("error", 400, f"messages: {e}")
        except Exception as e:  # a backend failure must not kill the worker; the client gets a 500
            log.exception("generation failed")
            job.emit("error", 500, f"generation failed: {type(e).__name__}")
        finally:
            job.loop.call_soon_threadsafe(_release)

    def _release() -> None:
        state["pending"] -= 1

    async def _collect(job: _Job, rid: str, chat: bool):
        texts: dict[int, list[str]] = {}
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        while True:
            event = await job.next()
            if event[0] == "error":
                raise APIError(event[1], event[2])
            if event[0] == "done":
                break
            if event[0] == "delta":
                texts.setdefault(event[1], []).append(event[2])
            elif event[0] == "end":
                _, i, finish, n_prompt, n_completion = event
                text = "".join(texts.get(i, []))
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                                "logprobs": None} if chat else
                               {"index": i, "text": text, "finish_reason": finish, "logprobs": None})
                usage["prompt_tokens"] += n_prompt
                usage["completion_tokens"] += n_completion
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_id, "choices": choices, "usage": usage}

    async def _sse(job: _Job, rid: str, chat: bool, include_usage: bool):
        created = int(time.time())

        def chunk(choices: list, usage: dict | None = None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created, "model": model_id, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            while True:
                event = await job.next()
                if event[0] == "error":  # headers are sent: an error object in the stream, as OpenAI does
                    yield f"data: {json.dumps({'error': {'message': event[2], 'type': 'server_error'}})}\n\n"
                    return
                if event[0] == "delta":
                    yield chunk([{"index": 0, "delta": {"content": event[2]}, "finish_reason": None} if chat
                                 else {"index": 0, "text": event[2], "finish_reason": None, "logprobs": None}])
                elif event[0] == "end":
                    _, _, finish, n_prompt, n_completion = event
                    yield chunk([{"index": 0, "delta": {}, "finish_reason": finish} if chat
                                 else {"index": 0, "text": "", "finish_reason": finish, "logprobs": None}])
                    if include_usage:
                        yield chunk([], {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                                         "total_tokens": n_prompt + n_completion})
                elif event[0] == "done":
                    yield "data: [DONE]\n\n"
                    return
        finally:  # finished, or the client went away: stop generating either way
            job.cancelled = True

    app.add_middleware(_Guard, api_key=cfg.api_key, max_body=cfg.max_body_bytes)
    return app


def serve(cfg: ServeConfig) -> None:
    """Load the model and serve it until SIGINT/SIGTERM (then drain and exit)."""
    import uvicorn

    kind, path, default_id = resolve_model(cfg.model)
    model_id = cfg.model_name or default_id
    backend = load_backend(kind, path, cfg.n_ctx)
    app = create_app(cfg, backend, model_id)
    auth = "API key required" if cfg.api_key else "no API key (loopback only)"
    print(f"serve: {model_id} ({kind}: {path}) on http://{cfg.host}:{cfg.port}/v1, {auth}", flush=True)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, timeout_graceful_shutdown=int(cfg.drain_s),
                            log_level="warning", lifespan="on", server_header=False)
    uvicorn.Server(config).run()
    print("serve: stopped", flush=True)

