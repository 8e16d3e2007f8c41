"""A small terminal chat with a local model, for trying a student by hand.

    distill chat runs/demo/05_export/student-f16.gguf
    echo "What is 2 + 3?" | distill chat runs/demo --max-tokens 32

The model is loaded in-process through the same backends and sandboxed chat template as `distill
serve` (llama.cpp for a .gguf, transformers for a model directory), so an answer here is the answer the
server gives. Each line typed is one user turn; the answer streams as it is generated. `/reset` forgets
the conversation, `/exit` or end of input (Ctrl-D) quits.
"""

from __future__ import annotations

import sys

from distill.config import DistillError


def chat(model: str, system: str | None = None, max_tokens: int = 256, temperature: float = 0.0) -> None:
    from distill.serve import Params, TemplateRefused, load_backend, resolve_model

    if max_tokens < 1 or temperature < 0:
        raise DistillError("chat: --max-tokens must be >= 1 and --temperature >= 0")
    kind, path, name = resolve_model(model)
    backend = load_backend(kind, path, 4096)
    if backend.render is None:
        raise DistillError(f"chat: {path} has no chat template; serve it and use /v1/completions instead")
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{name} ({kind}). /reset starts over, /exit quits.")
    try:
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            if line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/reset":
                history = list(start)
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            try:
                ids = backend.encode(backend.render(history))
            except TemplateRefused as e:
                print(f"error: {e}", file=sys.stderr)
                history.pop()
                continue
            room = backend.n_ctx - len(ids)
            if room < 1:
                print("error: the conversation no longer fits the context; /reset to start over", file=sys.stderr)
                history.pop()
                continue
            parts: list[str] = []

            def show(text: str, parts: list[str] = parts) -> None:
                parts.append(text)
                print(text, end="", flush=True)

            if interactive:
                print(f"{name}> ", end="", flush=True)
            finish, _ = backend.generate(ids, Params(min(max_tokens, room), temperature, 1.0, [], None), show,
                                         lambda: False)
            print(" [cut at --max-tokens]" if finish == "length" else "", flush=True)
            history.append({"role": "assistant", "content": "".join(parts)})
    except KeyboardInterrupt:
        print()
    finally:
        backend.close()
