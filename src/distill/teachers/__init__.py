"""Teachers (and any model we sample from): one small protocol, backends chosen by the model reference.

    llamacpp  a .gguf file, in-process through llama-cpp-python (the chat template from the file)
    hf        a Hugging Face directory through transformers (the tokenizer's chat template)
    openai    `http(s)://host:port/v1#model`: any OpenAI-compatible server (the server's template)

`distill evaluate` samples students through the same backends, so a number means the same thing
wherever it is printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from distill.config import DistillError
from distill.models import ModelRef


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)


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


class Teacher(Protocol):
    backend: str

    def complete(self, messages: list[dict], seeds: list[int], sampling: Sampling) -> list[Completion]:
        """One completion of the chat `messages` per seed."""
        ...

    def close(self) -> None:
        """Free the model (llama.cpp holds native memory until closed)."""
        ...


BACKENDS = ("auto", "llamacpp", "hf", "openai")


def backend_for(model: ModelRef, backend: str = "auto", field: str = "generate.backend") -> str:
    if backend == "auto":
        return {"gguf": "llamacpp", "hf_dir": "hf", "openai": "openai"}[model.kind]
    if (backend == "openai") != (model.kind == "openai"):
        raise DistillError(f"{field}: {backend} does not serve {model.ref} (openai is for http(s)://…#model)")
    if backend == "llamacpp" and model.kind != "gguf":
        raise DistillError(f"{field}: llamacpp needs a .gguf model, got the directory {model.path}")
    return backend


def load_teacher(model: ModelRef, backend: str = "auto", seed: int = 0, api_key: str | None = None) -> Teacher:
    backend = backend_for(model, backend)
    if backend == "openai":
        from distill.teachers.openai import OpenAITeacher

        return OpenAITeacher(model.url, model.model_id, api_key)
    if backend == "llamacpp":
        from distill.teachers.llamacpp import LlamaCppTeacher

        return LlamaCppTeacher(model.path, seed=seed)
    from distill.teachers.hf import HFTeacher

    return HFTeacher(model)
