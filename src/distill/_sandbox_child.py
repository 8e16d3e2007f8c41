"""The program that runs inside the sandbox; never imported by distill. `sandbox.py` passes this file's
text to `python -I -c` and the job as JSON on stdin:

    {"program": str, "tests": str | [str], "entry_point": str | null, "workdir": str, "uid": int | null,
     "limits": {"cpu_s", "memory_mb", "file_mb", "procs"}, "audit": bool}

It sets its own resource limits (so the parent needs no `preexec_fn`, which is unsafe with threads), drops
root for an unused uid (RLIMIT_NPROC, the fork-bomb limit, does not apply to root), runs the program and
its tests, and writes one JSON object of builtin values to its original stdout: the result channel. The
model's own prints go to /dev/null so that they cannot be mistaken for a result.
"""

import builtins
import json
import os
import resource
import sys


def main():
    job = json.loads(sys.stdin.read())
    result = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    _confine(job)
    out = _run(job)
    result.write(json.dumps(out))
    result.flush()
    os._exit(0)  # no atexit handlers or finalizers that the model's code may have registered


def _confine(job):
    lim = job["limits"]
    mb = 1 << 20
    for res, value in ((resource.RLIMIT_CPU, lim["cpu_s"]), (resource.RLIMIT_AS, lim["memory_mb"] * mb),
                       (resource.RLIMIT_FSIZE, lim["file_mb"] * mb), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    workdir, uid = job["workdir"], job["uid"]
    if os.getuid() == 0 and uid is not None:
        os.chown(workdir, uid, uid)
        resource.setrlimit(resource.RLIMIT_NPROC, (lim["procs"], lim["procs"]))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)  # from root to a plain uid: every capability is gone too
    else:  # not root: RLIMIT_NPROC counts all of this user's processes, so allow for those already running
        mine = sum(1 for p in os.listdir("/proc") if p.isdigit() and _owner(p) == os.getuid())
        n = mine + lim["procs"]
        resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update({"HOME": workdir, "TMPDIR": workdir, "PATH": "/usr/bin:/bin"})
    if job["audit"]:
        sys.addaudithook(_audit_hook(os.path.realpath(workdir), os.getpid()))


def _owner(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _audit_hook(workdir, pid):
    """Without bubblewrap: refuse sockets, signals to other processes, new processes and writes outside the
    work directory. PEP 578 hooks are no security boundary (ctypes can get around them); they stop the
    accidents and the obvious attempts."""
    spawn = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
             "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.setsid"}
    paths = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.link",
             "os.symlink", "os.utime", "shutil.rmtree"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    realpath, sep, str_, isinstance_ = os.path.realpath, os.sep, str, isinstance

    def inside(path):
        if not isinstance_(path, (str_, bytes)):
            return True  # a file descriptor
        p = realpath(os.fsdecode(path))
        return p == workdir or p.startswith(workdir + sep)

    def hook(event, args):
        if event.startswith("socket.") or event in spawn:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event in ("os.kill", "os.killpg") and args[0] != pid:
            raise PermissionError(f"sandbox: {event} of another process is not allowed")
        if event == "open" and args[0] is not None and not inside(args[0]):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & write_flags:
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the work directory")
        if event in paths and not all(inside(a) for a in args[:2] if isinstance_(a, (str_, bytes))):
            raise PermissionError(f"sandbox: {event} outside the work directory")

    return hook


# Captured before the model's code runs, which could rebind the builtins.
_PLAIN = (bool, int, float, complex, str, bytes, type(None))
_CONTAINERS = (list, tuple, set, frozenset)


def _is_plain(value, _type=type, _id=id, _len=len):
    """True when `value` is built only of builtin types (exactly: no subclasses), so that `==` in a test
    means what the test's author meant; an object whose `__eq__` always returns True is not plain."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        t = _type(v)
        if t in _PLAIN:
            continue
        if t not in _CONTAINERS and t is not dict:
            return False
        if _id(v) in seen:
            continue
        seen.add(_id(v))
        stack.extend(list(v.keys()) + list(v.values()) if t is dict else list(v))
        if _len(seen) > 1_000_000:
            return False
    return True


def _guarded(fn, _is_plain=_is_plain, _type=type):
    def candidate(*args, **kwargs):
        value = fn(*args, **kwargs)
        if not _is_plain(value):
            raise TypeError(f"returned a {_type(value).__name__}: only builtin values are accepted")
        return value

    return candidate


def _describe(exc):
    try:
        text = f"{type(exc).__name__}: {exc}"
    except BaseException:  # noqa: BLE001 - an exception whose __str__ itself fails
        text = "exception"
    return str(text)[:300]


def _run(job):
    tests = job["tests"]
    total = len(tests) if isinstance(tests, list) else 1
    ns = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        exec(compile(job["program"], "<completion>", "exec"), ns)
    except BaseException as e:  # noqa: BLE001 - SystemExit, MemoryError, anything: the program failed
        return {"status": "error", "passed": 0, "total": total, "detail": f"program: {_describe(e)}"}
    entry = job["entry_point"]
    if entry:
        if not callable(ns.get(entry)):
            return {"status": "error", "passed": 0, "total": total, "detail": f"no function named {entry!r}"}
        ns[entry] = _guarded(ns[entry])
    if isinstance(tests, list):  # independent assertions: count how many pass
        passed, first = 0, None
        for t in tests:
            try:
                exec(compile(t, "<test>", "exec"), ns)
                passed += 1
            except BaseException as e:  # noqa: BLE001
                first = first or f"{t.strip()[:120]}: {_describe(e)}"
        status = "passed" if passed == total else "failed"
        return {"status": status, "passed": passed, "total": total, "detail": first or ""}
    try:
        exec(compile(tests, "<tests>", "exec"), ns)
        if entry and callable(ns.get("check")):  # HumanEval: `def check(candidate)`
            ns["check"](ns[entry])
    except BaseException as e:  # noqa: BLE001
        return {"status": "failed", "passed": 0, "total": 1, "detail": _describe(e)}
    return {"status": "passed", "passed": 1, "total": 1, "detail": ""}


main()
