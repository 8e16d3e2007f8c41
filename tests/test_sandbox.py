"""Hostile completions are contained, reported as failed within their limits, and leave nothing behind;
under bubblewrap and under the rlimits fallback alike."""

import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from distill import sandbox
from distill.sandbox import Limits, run_tests

# Small limits: the machine is shared, and a fork bomb must stay tiny.
LIMITS = Limits(wall_s=3, cpu_s=2, memory_mb=512, file_mb=4, procs=8, tmpfs_mb=16)
MODES = [pytest.param("bwrap", marks=pytest.mark.skipif(not shutil.which("bwrap"), reason="no bwrap")), "rlimits"]


def _sandbox_processes() -> int:
    """Processes still running the sandbox child (its source is on their command line)."""
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            n += b"runs inside the sandbox" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            pass
    return n


def _hostile(program: str, mode: str, tests="assert f() == 1"):
    result = run_tests(program, tests, "f", LIMITS, isolation=mode)
    assert not result.ok and result.isolation == mode
    assert result.seconds < LIMITS.wall_s + 10  # ended by its limit, not by the test's patience
    assert _sandbox_processes() == 0, "a sandboxed process outlived its run"
    return result


@pytest.mark.parametrize("mode", MODES)
def test_passing_and_failing_code(mode):
    code = "def f(x):\n    return 2 * x\n"
    assert run_tests(code, ["assert f(2) == 4", "assert f(3) == 6"], "f", LIMITS, mode).ok
    r = run_tests(code, ["assert f(2) == 4", "assert f(3) == 5"], "f", LIMITS, mode)
    assert (r.status, r.passed, r.total) == ("failed", 1, 2) and "f(3) == 5" in r.detail
    assert run_tests("def f(:\n", "assert f() == 1", "f", LIMITS, mode).status == "error"
    assert "no function named 'f'" in run_tests("g = 1", "assert f() == 1", "f", LIMITS, mode).detail


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb(mode):
    bomb = "import os\ndef f():\n    while True:\n        try:\n            os.fork()\n        except OSError:\n" \
           "            pass\n"
    _hostile(bomb, mode)


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop(mode):
    r = _hostile("def f():\n    while True:\n        pass\n", mode)
    assert r.status in ("timeout", "crashed")


@pytest.mark.parametrize("mode", MODES)
def test_ten_gigabytes(mode):
    r = _hostile("def f():\n    x = bytearray(10 * 1024 ** 3)\n    return 1\n", mode)
    assert "MemoryError" in r.detail


@pytest.mark.parametrize("mode", MODES)
def test_write_outside_the_work_directory(mode, tmp_path):
    targets = [Path(__file__).with_name(".sandbox-escape"), tmp_path / "escape", Path.home() / ".sandbox-escape",
               Path("/var/tmp/.sandbox-escape"), Path("/dev/shm/.sandbox-escape")]
    for target in targets:
        _hostile(f"def f():\n    open({str(target)!r}, 'w').write('x')\n    return 1\n", mode)
        assert not target.exists()
    # the work directory itself is writable, within the file size limit
    ok = "def f():\n    open('scratch.txt', 'w').write('x' * 100)\n    return len(open('scratch.txt').read())\n"
    assert run_tests(ok, "assert f() == 100", "f", LIMITS, mode).ok
    big = "def f():\n    open('big', 'wb').write(b'x' * (8 << 20))\n    return 1\n"
    _hostile(big, mode)


@pytest.mark.parametrize("mode", MODES)
def test_network_connection(mode):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    port = server.getsockname()[1]
    accepted, done = [], threading.Event()
    thread = threading.Thread(target=_accept, args=(server, accepted, done), daemon=True)
    thread.start()
    try:
        r = _hostile(f"import socket\ndef f():\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                     "    return 1\n", mode)
    finally:
        done.set()
        thread.join()
        server.settimeout(0)
        try:  # a connection still waiting in the backlog counts too
            accepted.append(server.accept())
        except BlockingIOError:
            pass
        server.close()
    assert not accepted and ("Errno" in r.detail or "not allowed" in r.detail)


def _accept(server, accepted, done):
    while not done.is_set():
        try:
            accepted.append(server.accept())
        except TimeoutError:
            pass


@pytest.mark.parametrize("mode", MODES)
def test_kill_the_parent(mode):
    me = os.getpid()
    _hostile("import os, signal\ndef f():\n    os.kill(os.getppid(), signal.SIGKILL)\n"
             f"    os.kill({me}, signal.SIGKILL)\n    return 1\n", mode)
    assert os.getpid() == me  # still here


@pytest.mark.parametrize("mode", MODES)
def test_object_equal_to_everything(mode):
    cheat = "class Yes:\n    def __eq__(self, other):\n        return True\ndef f():\n    return Yes()\n"
    assert "only builtin values" in _hostile(cheat, mode).detail
    subclass = "class Int(int):\n    def __eq__(self, other):\n        return True\ndef f():\n    return [Int(2)]\n"
    _hostile(subclass, mode, tests="assert f() == [1]")
    exits = "import os\ndef f():\n    os._exit(0)\n"  # ending early must not read as a pass
    assert _hostile(exits, mode).status == "crashed"


@pytest.mark.parametrize("mode", MODES[:1])  # the fallback refuses new processes outright
def test_children_are_killed_with_the_run(mode):
    code = "import subprocess\ndef f():\n    subprocess.Popen(['sleep', '60'])\n    while True:\n        pass\n"
    _hostile(code, mode)


def test_fallback_without_bwrap_warns_loudly(monkeypatch, capsys):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox, "_mode_cache", {})
    monkeypatch.setattr(sandbox, "_warned", False)
    with pytest.warns(RuntimeWarning, match="SANDBOX WEAKENED"):
        r = run_tests("def f():\n    return 1\n", "assert f() == 1", "f", LIMITS)
    assert r.ok and r.isolation == "rlimits"
    assert "SANDBOX WEAKENED" in capsys.readouterr().err


def test_fallback_when_bwrap_cannot_start(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: "/usr/bin/bwrap")
    monkeypatch.setattr(sandbox, "_bwrap_args", lambda limits: ["bwrap", "--no-such-option"])
    monkeypatch.setattr(sandbox, "_mode_cache", {})
    monkeypatch.setattr(sandbox, "_warned", False)
    with pytest.warns(RuntimeWarning, match="bwrap does not start here"):
        assert run_tests("def f():\n    return 1\n", "assert f() == 1", "f", LIMITS).isolation == "rlimits"
