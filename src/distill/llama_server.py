"""llama-cpp-python's OpenAI-compatible server, started with the project's llama.cpp model parameters.

    python -m distill.llama_server --model model.gguf --model_alias smol --host 127.0.0.1 --port 8000

Takes exactly the arguments of `python -m llama_cpp.server` and passes them on. That server builds its
`Llama` with no way to set `use_extra_bufts`, which llama.cpp's AMX kernels need off on Intel CPUs with
AMX (llama.cpp #20824: a segfault on the first request), so this launcher first runs the probe of
`distill.llama_load` on the `--model` file (a crash becomes one error line and exit status 2), then starts
the server with the extra buffers set as that probe decided (`DISTILL_LLAMA_REPACK` overrides it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from distill.config import DistillError
from distill.llama_load import check, patch_defaults_for_process, repack_default


def _model_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    model = _model_arg(argv)
    try:
        if model and Path(model).is_file():
            use_extra_bufts = check(Path(model))
        else:  # --config_file, or a path the server itself will refuse: no file to probe
            use_extra_bufts = repack_default()
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    patch_defaults_for_process(use_extra_bufts)
    from llama_cpp.server.__main__ import main as server_main

    sys.argv = ["python -m llama_cpp.server", *argv]
    server_main()


if __name__ == "__main__":
    main()
