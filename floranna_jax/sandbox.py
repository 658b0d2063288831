"""Runs generated Python programs in isolated, resource-limited processes; never in ours.

    results = sandbox.run(programs, timeout_s=10.0, workers=2)   # one Result per program
    results[0].passed, results[0].reason, results[0].seconds, results[0].protections

Each program gets a fresh Python process through ``sandbox_launcher.py``, which enters new
network, mount and pid namespaces where the kernel allows, makes the file system read-only
but for a private size-capped /tmp (the working directory), sets resource limits (CPU
seconds, address space, file size, open files, processes, core dumps off), drops to the
user ``nobody`` when we are root, and closes standard input; the environment is minimal. The
launcher starts a new session, and at the wall-clock timeout the whole process group is
killed (and with a pid namespace, everything the program started). Each Result lists the
protections that were active; ``protections()`` tells them for this machine once.

A program passes only if it exits 0 AND prints a random marker that ``run`` appends after
its last line, so ``sys.exit(0)`` (or ``os._exit(0)``) before its tests fails. The marker
guards against generated code that stops early, not against code written to find it.

What rlimits cannot do (a cgroup could; programs get none): the process limit counts
every process of the sandbox user, so a fork bomb keeps the programs started beside it
from starting until it is killed (`run` starts those once more afterwards); and memory is
bounded per process (processes x address space at worst, 32 GiB with the defaults).
"""

import concurrent.futures
import functools
import json
import math
import os
import pathlib
import pwd
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import NamedTuple

LAUNCHER = pathlib.Path(__file__).with_name("sandbox_launcher.py")
SANDBOX_USER = "nobody"
PROTECTIONS = (
    "user_namespace", "network_namespace", "mount_namespace", "read_only_root", "private_tmp",
    "pid_namespace", "private_proc", "rlimits", "user_nobody", "no_new_privs",
    "die_with_launcher",
)  # fmt: skip
_TAIL_BYTES = 4096
_PROCESS_LIMIT = "sandbox setup failed: process limit"


class Limits(NamedTuple):
    """Per-program resource limits. cpu_s None: the wall-clock timeout, rounded up."""

    cpu_s: int | None = None  # RLIMIT_CPU seconds
    memory_mb: int = 1024  # RLIMIT_AS of each process
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file written, stdout and stderr included
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 32  # RLIMIT_NPROC: counts every process of the sandbox user
    tmp_mb: int = 64  # size of the private /tmp (the working directory)


DEFAULT_LIMITS = Limits()


class Result(NamedTuple):
    """passed: exited 0 and printed the marker. reason: "passed", "timeout after 3 s",
    "exit 1: AssertionError", "signal SIGKILL", "exited 0 before the end (no marker)", or
    "sandbox setup failed: ...". seconds: wall-clock time. protections: those active."""

    passed: bool
    reason: str
    seconds: float
    protections: tuple[str, ...]


def _runnable_by_others(path: str) -> bool:
    """True if a user other than the owner can execute `path` (and reach it)."""
    path = os.path.realpath(path)
    if not os.path.isfile(path) or not os.stat(path).st_mode & stat.S_IXOTH:
        return False
    parent = os.path.dirname(path)
    while True:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        if parent == os.path.dirname(parent):
            return True
        parent = os.path.dirname(parent)


@functools.cache
def default_python() -> str:
    """The interpreter for programs: ours, unless we are root and the sandbox user cannot
    run it (an interpreter under /root, as pyenv installs it), then the system's python3."""
    if os.geteuid() != 0 or _runnable_by_others(sys.executable):
        return sys.executable
    for path in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        if path and _runnable_by_others(path):
            return path
    raise RuntimeError(
        f"no Python interpreter the sandbox user {SANDBOX_USER!r} may run: {sys.executable} "
        "sits in a folder closed to other users; install python3 system-wide (e.g. "
        "/usr/bin/python3) or pass python=<interpreter readable by all users>"
    )


def _sandbox_ids() -> tuple[int, int] | tuple[None, None]:
    if os.geteuid() != 0:
        return None, None
    entry = pwd.getpwnam(SANDBOX_USER)
    return entry.pw_uid, entry.pw_gid


def _spec(
    private: pathlib.Path, limits: Limits, timeout_s: float, python: str, namespaces: bool
) -> dict:
    """What the launcher reads (its argv[1], as JSON); the status fd is added at launch."""
    uid, gid = _sandbox_ids()
    mb = 1 << 20
    return {
        "program": str(private / "program.py"),
        "host_workdir": str(private / "work"),
        "namespaces": namespaces,
        "python": python,
        "uid": uid,
        "gid": gid,
        "tmp_bytes": limits.tmp_mb * mb,
        "limits": {
            "cpu_s": limits.cpu_s or max(1, math.ceil(timeout_s)),
            "memory_bytes": limits.memory_mb * mb,
            "file_bytes": limits.file_size_mb * mb,
            "open_files": limits.open_files,
            "processes": limits.processes,
        },
        "env": {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp",
            "TMPDIR": "/tmp",
            "LANG": "C.UTF-8",
        },  # fmt: skip
    }


def _wait_unreaped(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Waits for the launcher to exit WITHOUT reaping it, so that its pid, which is also
    the process group id, cannot be reused before we kill the group. True if it exited."""
    deadline = time.monotonic() + timeout_s
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = None
    try:
        while True:
            left = deadline - time.monotonic()
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return True
            if left <= 0:
                return False
            if fd is not None:
                select.select([fd], [], [], left)
            else:
                time.sleep(min(left, 0.005))
    finally:
        if fd is not None:
            os.close(fd)


def _tail(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
        return f.read().decode("utf-8", "replace")


def _printed(path: pathlib.Path, marker: str) -> bool:
    """True if the file holds `marker` on a line of its own (it is at most RLIMIT_FSIZE)."""
    return f"\n{marker}\n".encode() in path.read_bytes()


def _reason(report: dict, printed: bool, stderr: str) -> tuple[bool, str]:
    if "error" in report:
        return False, f"sandbox setup failed: {report['error']}"
    if "signal" in report:
        name = signal.Signals(report["signal"]).name
        return False, f"signal {name}"
    if "exit" not in report:
        return False, "launcher died"
    last = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "")
    if report["exit"] != 0:
        return False, f"exit {report['exit']}" + (f": {last[:200]}" if last else "")
    if not printed:
        return False, "exited 0 before the end (no marker)"
    return True, "passed"


def _read_status(path: pathlib.Path) -> dict:
    report: dict = {}
    for line in path.read_text().splitlines():
        try:
            report.update(json.loads(line))
        except json.JSONDecodeError:
            pass  # a torn line from a killed launcher
    return report


def _private_file(path: pathlib.Path):
    """A new file only we may read: programs beside this one cannot see its output."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def _launch(private: pathlib.Path, spec: dict) -> subprocess.Popen:
    """Starts the launcher in a new session, its output in files of `private`."""
    files = {n: _private_file(private / n) for n in ("stdout", "stderr", "status")}
    try:
        spec = {**spec, "status_fd": files["status"].fileno()}
        return subprocess.Popen(
            [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(spec)],
            stdin=subprocess.DEVNULL, stdout=files["stdout"], stderr=files["stderr"],
            pass_fds=[files["status"].fileno()], cwd=private, env={}, start_new_session=True,
        )  # fmt: skip
    finally:
        for f in files.values():
            f.close()


def run_one(
    program: str,
    *,
    timeout_s: float = 10.0,
    limits: Limits = DEFAULT_LIMITS,
    python: str | None = None,
    namespaces: bool = True,
) -> Result:
    """Runs one program (source text) in the sandbox; see `run`."""
    marker = "sandbox-ok-" + secrets.token_hex(16)
    start = time.monotonic()
    private = pathlib.Path(tempfile.mkdtemp(prefix="floranna-sandbox-"))
    try:
        os.chmod(private, 0o711)  # the sandbox user may pass through to work/, list nothing
        (private / "work").mkdir(mode=0o700)
        uid, gid = _sandbox_ids()
        if uid is not None:
            os.chown(private / "work", uid, gid)
        marked = program + f"\n\n__import__('os').write(1, b'\\n{marker}\\n')\n"
        with _private_file(private / "program.py") as f:
            f.write(marked.encode())
        spec = _spec(private, limits, timeout_s, python or default_python(), namespaces)
        proc = _launch(private, spec)
        finished = _wait_unreaped(proc, timeout_s)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # also whatever it left behind
        except ProcessLookupError:
            pass
        proc.wait()
        seconds = time.monotonic() - start
        report = _read_status(private / "status")
        active = tuple(report.get("protections", ()))
        if not finished:
            return Result(False, f"timeout after {timeout_s:g} s", seconds, active)
        printed = _printed(private / "stdout", marker)
        passed, reason = _reason(report, printed, _tail(private / "stderr"))
        return Result(passed, reason, seconds, active)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def run(
    programs: Sequence[str],
    *,
    timeout_s: float = 10.0,
    workers: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    python: str | None = None,
    namespaces: bool = True,
) -> list[Result]:
    """Runs `programs` (Python source texts), at most `workers` at a time (default: the CPU
    count), each in its own sandbox with a wall-clock limit of `timeout_s` seconds.

    Returns one Result per program, in order. python: the interpreter for the programs
    (default: `default_python()`; it must be runnable by the sandbox user). namespaces:
    False skips every namespace and mount (what a kernel that refuses them gives; tests).
    """
    python = python or default_python()
    workers = max(1, min(workers or os.cpu_count() or 1, len(programs) or 1))
    one = functools.partial(
        run_one, timeout_s=timeout_s, limits=limits, python=python, namespaces=namespaces
    )
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, programs))
    # A fork bomb among the programs holds the sandbox user's process count at its limit
    # until killed, so programs launched beside it cannot start: give those a second try.
    again = [i for i, r in enumerate(results) if r.reason.startswith(_PROCESS_LIMIT)]
    for i in again:
        results[i] = one(programs[i])
    return results


@functools.cache
def protections() -> tuple[str, ...]:
    """The protections the sandbox gets on this machine (from running one empty program)."""
    return run_one("pass", timeout_s=30.0).protections
