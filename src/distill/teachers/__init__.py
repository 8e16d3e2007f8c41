"""Teachers (and any model we sample from): one small protocol, backends chosen by the model reference.

    llamacpp  a .gguf file, in-process through llama-cpp-python (the chat template from the file)
    hf        a Hugging Face directory through transformers (the tokenizer's chat template)
    openai    `http(s)://host:port/v1#model`: any OpenAI-compatible server (the server's template)
    vllm      a Hugging Face directory or hub id in vLLM's offline engine, on a GPU (`backend: vllm`)

`distill evaluate` samples students through the same backends, so a number means the same thing
wherever it is printed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from distill.config import DistillError
from distill.logprobs import TopK
from distill.models import ModelRef


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    logprobs: int = 0  # top-k teacher logprobs to return per completion token; 0: none


@dataclass
class TeacherOptions:
    """How hard a backend may push: the same knobs for every backend, each using what applies to it."""

    concurrency: int = 16  # requests in flight (openai); sequences decoded together (llamacpp, hf, vllm)
    timeout_s: float = 600.0  # per request (openai)
    max_retries: int = 6  # per request, with exponential backoff and jitter (openai)
    rpm: int | None = None  # requests-per-minute budget (openai)
    tpm: int | None = None  # tokens-per-minute budget, prompt + completion (openai)
    n_ctx: int = 4096  # context window of an in-process model (llamacpp)
    tokenizer: str | None = None  # model reference whose tokenizer maps a server's token texts to ids (openai)
    ray: dict | None = None  # fan out over a Ray cluster (see distill.scaleout.RayOptions)


@dataclass
class Request:
    """One prompt to answer, once per seed; `key` is the caller's (generate uses the prompt id)."""

    key: str
    messages: list[dict]
    seeds: list[int]


@dataclass
class Completion:
    text: str
    finish_reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # wall time of this completion (a batch's time is shared evenly)
    reasoning: str | None = None  # a server's separate `reasoning_content` / `reasoning`, when it sends one
    # Prefill (prompt) and decode (new tokens) apart, where the backend can tell: tokens and seconds.
    # Prefill tokens can be fewer than prompt tokens when a backend reuses a cached prompt prefix.
    prefill_tokens: int | None = None
    prefill_s: float | None = None
    decode_tokens: int | None = None
    decode_s: float | None = None
    topk: TopK | None = None  # the teacher's top-k per completion token, when `Sampling.logprobs` asked


Result = tuple[Request, "list[Completion] | Exception"]


class Teacher(Protocol):
    backend: str

    def complete(self, messages: list[dict], seeds: list[int], sampling: Sampling) -> list[Completion]:
        """One completion of the chat `messages` per seed."""
        ...

    def stream(self, requests: Iterable[Request], sampling: Sampling) -> Iterator[Result]:
        """Answer many requests, yielding each as soon as it is done (in any order): its completions, one
        per seed, or the exception that failed it after the backend's retries. Backends that can work on
        several requests at once (concurrent HTTP, batched decoding) do so here. Stopping iteration early
        (e.g. a spend cap) is allowed; `close()` then cancels what is still in flight."""
        ...

    def close(self) -> None:
        """Free the model (llama.cpp holds native memory until closed)."""
        ...


BACKENDS = ("auto", "llamacpp", "hf", "openai", "vllm")


def backend_for(model: ModelRef, backend: str = "auto", field: str = "generate.backend") -> str:
    if backend == "auto":
        return {"gguf": "llamacpp", "hf_dir": "hf", "openai": "openai"}[model.kind]
    if (backend == "openai") != (model.kind == "openai"):
        raise DistillError(f"{field}: {backend} does not serve {model.ref} (openai is for http(s)://…#model)")
    if backend == "llamacpp" and model.kind != "gguf":
        raise DistillError(f"{field}: llamacpp needs a .gguf model, got the directory {model.path}")
    if backend == "vllm" and model.kind != "hf_dir":
        raise DistillError(f"{field}: vllm needs a Hugging Face model directory or hub id, got {model.ref}")
    return backend


def sequential_stream(teacher: Teacher, requests: Iterable[Request], sampling: Sampling) -> Iterator[Result]:
    """`Teacher.stream` for a backend that answers one request at a time."""
    for req in requests:
        try:
            yield req, teacher.complete(req.messages, req.seeds, sampling)
        except Exception as e:  # noqa: BLE001 - handed to the caller, who records it as failed
            yield req, e


def complete_via_stream(teacher: Teacher, messages: list[dict], seeds: list[int],
                        sampling: Sampling) -> list[Completion]:
    """`Teacher.complete` for a backend whose work happens in `stream` (batched or concurrent)."""
    # The stream is run to its end (it yields once per request), not left mid-way: a backend may keep
    # state for the next call only after a clean end (the llama.cpp teacher's cached prompt prefixes).
    results = [result for _, result in teacher.stream([Request("", messages, list(seeds))], sampling)]
    if not results:
        raise RuntimeError(f"{teacher.backend} returned no result")
    if isinstance(results[0], Exception):
        raise results[0]
    return results[0]


def load_teacher(model: ModelRef, backend: str = "auto", seed: int = 0, api_key: str | None = None,
                 options: TeacherOptions | None = None) -> Teacher:
    backend = backend_for(model, backend)
    options = options or TeacherOptions()
    if options.ray is not None:
        from distill.scaleout import RayTeacher

        return RayTeacher(model, backend, seed, api_key, options)
    if backend == "openai":
        from distill.teachers.openai import OpenAITeacher

        return OpenAITeacher(model.url, model.model_id, api_key, options)
    if backend == "llamacpp":
        from distill.teachers.llamacpp import LlamaCppTeacher

        return LlamaCppTeacher(model.path, n_ctx=options.n_ctx, seed=seed, concurrency=options.concurrency)
    if backend == "vllm":
        from distill.teachers.vllm import VLLMTeacher

        return VLLMTeacher(model, seed=seed, concurrency=options.concurrency)
    from distill.teachers.hf import HFTeacher

    return HFTeacher(model, concurrency=options.concurrency)
