"""Every GGUF load in the project goes through here: one place decides llama.cpp's model parameters,
and a new (file, llama.cpp build, CPU) is first tried in a child process, so that a crash of the native
library becomes one error line instead of a segfault.

    python -m distill.llama_load probe path/to/model.gguf        # what the child runs; prints one JSON line

Why: llama.cpp may move weights into "extra" CPU buffers at load time (`llama_model_params.use_extra_bufts`,
llama-server's `--no-repack` turns it off): the REPACK buffer, which reorders Q4_0/Q4_K/IQ4_NL/Q8_0 blocks
for the AVX2/AVX-512 and ARM kernels, and on Intel CPUs with AMX (Sapphire Rapids and later) the AMX
buffer. llama-cpp-python 0.3.36 segfaults in `ggml_backend_amx_mul_mat` on such CPUs (llama.cpp #20824,
closed without a fix); with the extra buffers off the same calls work. So by default (`DISTILL_LLAMA_REPACK`
unset or `auto`) they are off on a CPU that reports AMX and on elsewhere, where repacking is kept for its
speed (`benchmarks/llamacpp_repack.py` measures it). `DISTILL_LLAMA_REPACK=1` or `0` forces either way for
a user who knows their build.

`Llama(...)` has no argument for `use_extra_bufts`: `load_llama` sets it through the defaults function
`Llama.__init__` starts from (see `_default_params`), and `distill.llama_server` does the same for
llama-cpp-python's OpenAI-compatible server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from distill.config import DistillError

REPACK_ENV = "DISTILL_LLAMA_REPACK"
_PATCH_LOCK = threading.Lock()


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """(`model name`, sorted feature flags) of the first CPU in /proc/cpuinfo; ("unknown", []) elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown", []
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    return (name.group(1).strip() if name else "unknown"), sorted(set(flags.group(1).split()) if flags else ())


def cpu_has_amx(flags: list[str] | None = None) -> bool:
    """Whether the CPU (or these /proc/cpuinfo flags) has AMX: amx_tile, amx_int8, amx_bf16, …."""
    return any(f.startswith("amx") for f in (cpu_model_and_flags()[1] if flags is None else flags))


def repack_default() -> bool:
    """Whether llama.cpp may use its extra buffer types: `DISTILL_LLAMA_REPACK` (1/0) when set, else not on
    a CPU with AMX (the crash above) and yes elsewhere."""
    value = os.environ.get(REPACK_ENV, "auto").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    if value not in ("", "auto"):
        raise DistillError(f"{REPACK_ENV}: expected auto, 1 or 0, got {value!r}")
    return not cpu_has_amx()


def model_params(path: Path, *, vocab_only: bool = False, repack: bool | None = None):
    """llama.cpp's `llama_model_params` for `path`, after the file has passed its probe (see `check`).

    `repack` None: `repack_default()`, or off if the probe found that setting crashes here."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = vocab_only
    params.use_extra_bufts = _extra_bufts(Path(path), vocab_only, repack)
    return params


def load_llama(path: Path, *, repack: bool | None = None, **kwargs):
    """`llama_cpp.Llama(model_path=path, **kwargs)` with the project's model parameters; checked first
    (a vocab-only load computes nothing and skips the probe)."""
    from llama_cpp import Llama

    use = _extra_bufts(Path(path), bool(kwargs.get("vocab_only")), repack)
    kwargs.setdefault("verbose", False)
    with _default_params(use):
        return Llama(model_path=str(path), **kwargs)


def _extra_bufts(path: Path, vocab_only: bool, repack: bool | None) -> bool:
    """`use_extra_bufts` for one load: off for a vocab-only load (no weights, nothing to probe), else the
    probe's verdict."""
    return False if vocab_only else check(path, repack)


@contextlib.contextmanager
def _default_params(use_extra_bufts: bool):
    """While a `Llama` is built, its model parameters start from defaults with `use_extra_bufts` set.

    Written here because llama-cpp-python's `Llama.__init__` builds its params from
    `llama_cpp.llama_model_default_params()` and passes no field of ours; swapping that function for the
    duration of one load (under a lock: loads are rare) is the narrowest way in."""
    import llama_cpp.llama_cpp as C

    with _PATCH_LOCK:
        original = C.llama_model_default_params
        C.llama_model_default_params = _defaults_with(original, use_extra_bufts)
        try:
            yield
        finally:
            C.llama_model_default_params = original


def patch_defaults_for_process(use_extra_bufts: bool) -> None:
    """For a process that only loads models (the server launcher): the same swap, for good."""
    import llama_cpp.llama_cpp as C

    C.llama_model_default_params = _defaults_with(C.llama_model_default_params, use_extra_bufts)


def _defaults_with(original, use_extra_bufts: bool):
    def defaults():
        p = original()
        p.use_extra_bufts = use_extra_bufts
        return p

    return defaults


# --- The probe: a child process loads the file and decodes a few tokens --------------------------------

def check(path: Path, repack: bool | None = None) -> bool:
    """The `use_extra_bufts` to load `path` with, once a child process has loaded it and decoded with it.

    The verdict is cached per (file sha256, llama.cpp version, CPU flags, setting) under
    `models.cache_dir()/llama-probe`, so a 1 GB teacher is probed once, not at every load. With `repack`
    None and the default crashing, the extra buffers are tried off before giving up. Raises `DistillError`
    (one line naming the file and the likely cause) when the file cannot be used on this machine."""
    path = Path(path)
    want = repack_default() if repack is None else repack
    first = _probe_cached(path, want)
    if first["ok"]:
        return want
    if repack is None and want:
        second = _probe_cached(path, False)
        if second["ok"]:
            print(f"warning: {path.name}: llama.cpp {first['error']} with its extra weight buffers (repacking) on "
                  f"this CPU; loading with them off ({REPACK_ENV}=0 does this without the probe's retry)",
                  file=sys.stderr)
            return False
    raise DistillError(f"{path}: {first['error']}")


def _probe_cached(path: Path, repack: bool) -> dict:
    from distill.models import cache_dir
    from distill.rundir import atomic_write_text, sha256_file

    verdict_file = cache_dir() / "llama-probe" / f"{_probe_key(sha256_file(path), repack)}.json"
    if verdict_file.is_file():
        try:
            return json.loads(verdict_file.read_text())
        except ValueError:
            pass  # a torn or foreign file: probe again
    verdict = _probe(path, repack)
    if verdict.get("cacheable", True):
        verdict_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(verdict_file, json.dumps({**verdict, "file": str(path)}) + "\n")
    return verdict


def _probe_key(sha256: str, repack: bool) -> str:
    from importlib import metadata

    model, flags = cpu_model_and_flags()
    cpu = hashlib.sha256((model + " " + " ".join(flags)).encode()).hexdigest()[:12]
    return f"{sha256[:16]}-llama{metadata.version('llama_cpp_python')}-cpu{cpu}-repack{int(repack)}"


def _probe_command(path: Path, repack: bool) -> list[str]:
    return [sys.executable, "-m", "distill.llama_load", "probe", str(path), "--repack", str(int(repack))]


def _probe(path: Path, repack: bool, timeout_s: float = 600) -> dict:
    try:
        proc = subprocess.run(_probe_command(path, repack), capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    except subprocess.TimeoutExpired:
        return {"ok": False, "cacheable": False,
                "error": f"llama.cpp did not load and decode it within {timeout_s:.0f} s (probe timed out)"}
    if proc.returncode == 0:
        return {"ok": True, **json.loads(proc.stdout.strip().splitlines()[-1])}
    if proc.returncode < 0:  # killed by a signal: the native library crashed
        model, flags = cpu_model_and_flags()
        name = signal.Signals(-proc.returncode).name
        amx = " with AMX (llama.cpp's AMX kernels crash on some files: llama.cpp #20824)" if cpu_has_amx(flags) else ""
        return {"ok": False, "signal": name,
                "error": f"llama.cpp crashed ({name}) loading or decoding this GGUF on this CPU ({model}{amx}); "
                         f"a llama.cpp CPU-kernel bug for this CPU and quantization, or a damaged file. "
                         f"Try {REPACK_ENV}=0, another quantization, or another llama-cpp-python build"}
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    reason = lines[-1].strip() if lines else f"exit status {proc.returncode}"
    return {"ok": False, "error": f"llama.cpp could not load it ({reason[:300]})"}


def _probe_child(path: str, repack: bool) -> None:
    """Load `path`, prefill a 32-token prompt as two sequences and decode 4 tokens of each: every matmul
    shape the teachers, evaluate and serve use (a batch of many tokens, and one token per sequence)."""
    import time

    import llama_cpp
    from llama_cpp._internals import LlamaContext, LlamaModel
    from llama_cpp._logger import set_verbose

    set_verbose(False)
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = repack
    t0 = time.perf_counter()
    model = LlamaModel(path_model=path, params=params, verbose=False)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 512, 256, 256, 2
    cp.n_threads = cp.n_threads_batch = 1
    ctx = LlamaContext(model=model, params=cp, verbose=False)
    n_vocab = llama_cpp.llama_vocab_n_tokens(model.vocab)
    prompt = [(7 * i + 11) % n_vocab for i in range(32)]
    batch = llama_cpp.llama_batch_init(256, 0, 2)

    def decode(items: list[tuple[int, int, int]]) -> None:  # (token, position, seq_id), logits for each
        batch.n_tokens = len(items)
        for i, (tok, pos, seq) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, True
        if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    decode([(t, p, s) for s in (0, 1) for p, t in enumerate(prompt)])
    for step in range(4):
        decode([(prompt[step], len(prompt) + step, s) for s in (0, 1)])
    llama_cpp.llama_batch_free(batch)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 3), "repack": repack}))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m distill.llama_load")
    parser.add_argument("command", choices=["probe"])
    parser.add_argument("path")
    parser.add_argument("--repack", type=int, choices=[0, 1], default=None)
    args = parser.parse_args()
    _probe_child(args.path, repack_default() if args.repack is None else bool(args.repack))
