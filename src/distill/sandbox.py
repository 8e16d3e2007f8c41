"""A sandbox for model-written code: run a program and its tests, get back a verdict as plain data.

    python -c "from distill.sandbox import run_tests; \
print(run_tests('def f(x):\\n    return 2 * x', ['assert f(2) == 4', 'assert f(3) == 5'], 'f'))"

Each run is a fresh `python -I` in its own process group, inside bubblewrap (`bwrap`, the sandbox Flatpak
uses) where the machine has it:

- read-only root file system; a size-limited tmpfs as the throwaway working directory (`/tmp`); the
  home directories that hold the interpreter re-mounted so that only the interpreter shows;
- new network namespace (no network at all), pid namespace (the code sees only itself; killing pid 1
  there ends the whole sandbox), ipc and uts namespaces, a new session, death with its parent;
- inside, `_sandbox_child.py` sets rlimits (CPU seconds, address space, file size, no core files),
  drops root for an unused uid so that RLIMIT_NPROC caps processes and threads (a fork bomb stops at
  `procs`) and no capability is left, and runs the program and tests;
- the parent enforces the wall-clock limit and kills the whole process group.

Without bubblewrap (or where it cannot start, e.g. no namespaces in a container) the same child runs
with the same rlimits and uid drop in a temporary directory, plus a PEP 578 audit hook that refuses
sockets, new processes, signals to other processes and writes outside the work directory; a loud
warning says that this is weaker.

Results leave the sandbox as one JSON object (builtin values only) on a channel the model's prints do
not reach, and the function under test may only return builtin values (`int`, `str`, `list`, … exactly,
no subclasses): an object whose `__eq__` always returns True fails the test instead of passing it.

What it does NOT defend against (read docs/verify.md): code written to attack this harness in
particular (the tests run in the same interpreter as the model's code, so code that inspects the
runner's frames or writes a forged result to the result channel can fake a pass); kernel exploits;
CPU and memory pressure on the machine within the limits (run fewer sandboxes at once on a small
machine); reading world-readable files (the root file system is visible, read-only). In the fallback,
much more: ctypes, and anything the audit hook does not see.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0  # wall clock, enforced by the parent
    cpu_s: int = 10  # CPU seconds (RLIMIT_CPU)
    memory_mb: int = 1024  # address space (RLIMIT_AS); the interpreter itself needs ~30 MB
    file_mb: int = 16  # largest file the code may write (RLIMIT_FSIZE)
    procs: int = 16  # processes and threads at once (RLIMIT_NPROC)
    tmpfs_mb: int = 64  # size of the work directory under bubblewrap


@dataclass
class Result:
    status: str  # passed | failed (a test failed) | error (the program failed) | timeout | crashed
    passed: int  # tests passed, of
    total: int
    detail: str  # the first failure, or why the run ended
    seconds: float
    isolation: str  # bwrap | rlimits

    @property
    def ok(self) -> bool:
        return self.status == "passed"


_CHILD = (Path(__file__).with_name("_sandbox_child.py")).read_text()
_STATUSES = {"passed", "failed", "error"}
# Unused uids, one per concurrent run, so that one run's fork bomb does not use up another's RLIMIT_NPROC
# and a run's clean-up (which kills every process of its uid) touches nothing else: a block of 1,000 per
# process id, far above the uids of real users (uids are 32-bit).
_UIDS = itertools.cycle(range(2_000_000_000 + os.getpid() % 1_000_000 * 1000,
                              2_000_000_000 + os.getpid() % 1_000_000 * 1000 + 1000))
_UIDS_LOCK = threading.Lock()
_warned = False


def run_tests(program: str, tests: str | list[str], entry_point: str | None = None, limits: Limits = Limits(),
              isolation: str = "auto") -> Result:
    """Run `program`, then `tests` in its namespace, in a sandbox.

    Args:
        program: the model's code (a module: imports, functions).
        tests: one test script (HumanEval style: it may define `check(candidate)`, which is then called
            with the entry point), or a list of independent assertions (the score counts how many pass).
        entry_point: the function under test; it is wrapped so that it may only return builtin values.
        isolation: auto (bubblewrap when it works, else rlimits with a warning) | bwrap | rlimits.
    """
    mode = _mode() if isolation == "auto" else isolation
    total = len(tests) if isinstance(tests, list) else 1
    with _UIDS_LOCK:
        uid = next(_UIDS)
    if mode != "bwrap" and _hidden_dirs():
        uid = None  # a plain uid could not read the interpreter here; the audit hook stands in for it
    host_dir = None if mode == "bwrap" else tempfile.mkdtemp(prefix="distill-sandbox-")
    job = {"program": program, "tests": tests, "entry_point": entry_point, "uid": uid, "audit": mode != "bwrap",
           "workdir": "/tmp" if mode == "bwrap" else host_dir,
           "limits": {"cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb, "file_mb": limits.file_mb,
                      "procs": limits.procs}}
    python = [sys.executable, "-I", "-B", "-c", _CHILD]
    cmd = _bwrap_args(limits) + python if mode == "bwrap" else python
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                            cwd=host_dir or "/")
    try:
        out, err = proc.communicate(json.dumps(job).encode(), timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        _kill(proc, uid)
        return Result("timeout", 0, total, f"wall-clock limit of {limits.wall_s:g} s", time.monotonic() - start, mode)
    finally:
        _kill(proc, uid)
        if host_dir:
            shutil.rmtree(host_dir, ignore_errors=True)
    seconds = time.monotonic() - start
    try:
        data = json.loads(out)
        if not (isinstance(data, dict) and data.get("status") in _STATUSES and type(data.get("passed")) is int
                and 0 <= data["passed"] <= total and type(data.get("detail")) is str):
            raise ValueError
    except ValueError:
        return Result("crashed", 0, total, _why_ended(proc.returncode, err, limits), seconds, mode)
    return Result(data["status"], data["passed"], total, data["detail"], seconds, mode)


def _bwrap_args(limits: Limits) -> list[str]:
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--size", str(limits.tmpfs_mb << 20), "--perms", "1777", "--tmpfs", "/tmp",
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--die-with-parent", "--new-session", "--chdir", "/tmp"]
    return args + _interpreter_mounts()


def _interpreter_mounts() -> list[str]:
    """After dropping root, the child must still read the interpreter and its libraries. Where those lie
    under a directory others may not enter (pyenv under /root, mode 700), put an empty tmpfs over that
    directory and bind back only the interpreter's own folders: the rest of it stays hidden. The same
    for an interpreter under /tmp (a virtual environment in a checkout there), which the work directory's
    tmpfs covers."""
    needed, hidden = _interpreter_dirs(), _hidden_dirs()
    args = [a for h in hidden for a in ("--perms", "0755", "--tmpfs", str(h))]
    made: set[Path] = set()
    for path in needed:
        for h in [*hidden, Path("/tmp")]:
            if h in path.parents:
                # bwrap would make the folders in between with mode 700: make them 755 first.
                for mid in reversed(path.parents[: path.parents.index(h)]):
                    if mid not in made:
                        made.add(mid)
                        args += ["--perms", "0755", "--dir", str(mid)]
                args += ["--ro-bind", str(path), str(path)]
                break
    return args


def _interpreter_dirs() -> list[Path]:
    return sorted({Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                               Path(sys.executable).parent)})


def _hidden_dirs() -> list[Path]:
    """Directories above the interpreter that other users may not enter (outermost first, no nesting)."""
    hidden: list[Path] = []
    for path in _interpreter_dirs():
        for parent in reversed(path.parents):
            if any(h == parent or h in parent.parents for h in hidden):
                break
            if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
                hidden.append(parent)
                break
    return hidden


def _kill(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the run's process group, then every process left with the run's own uid (children in the pid
    namespace die with its init, but asynchronously; one that left the group dies here), and wait until
    none is left, so that a finished run has really finished."""
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    deadline = time.monotonic() + 10
    while uid is not None and time.monotonic() < deadline:
        left = _processes_of(uid)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _processes_of(uid: int) -> list[int]:
    """Live processes of `uid` (zombies are dead already; their reaping is up to whoever adopted them)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid and Path(f"/proc/{name}/stat").read_text().rsplit(
                        ")", 1)[1].split()[0] != "Z":
                    pids.append(int(name))
            except (OSError, IndexError):
                pass
    return pids


def _why_ended(code: int, err: bytes, limits: Limits) -> str:
    if code is not None and code < 0:
        sig = -code
        why = {9: "killed", 24: f"CPU limit of {limits.cpu_s} s", 25: f"file size limit of {limits.file_mb} MB"}
        return f"ended by signal {sig} ({why.get(sig, 'signal')}) before reporting a result"
    tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no result"]
    return f"exit status {code} before reporting a result: {tail[0][:200]}"


_mode_cache: dict[str, str] = {}


def _mode() -> str:
    """bwrap when it is installed and starts here (tried once per process), else rlimits, loudly."""
    global _warned
    if "mode" not in _mode_cache:
        mode, why = "rlimits", "bubblewrap (bwrap) is not installed"
        if shutil.which("bwrap"):
            probe = subprocess.run(_bwrap_args(Limits()) + ["/bin/true"], capture_output=True, timeout=30)
            if probe.returncode == 0:
                mode = "bwrap"
            else:
                why = f"bwrap does not start here: {probe.stderr.decode(errors='replace').strip()[:200]}"
        _mode_cache["mode"] = mode
        if mode == "rlimits" and not _warned:
            _warned = True
            msg = (f"SANDBOX WEAKENED: {why}; model-written code runs under rlimits and an audit hook only, "
                   "without namespaces (no real network or file system isolation). Install bubblewrap "
                   "(apt-get install bubblewrap).")
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            print(f"warning: {msg}", file=sys.stderr)
    return _mode_cache["mode"]
