"""Runs generated Python programs in isolated, resource-limited processes; never in ours.

    results = sandbox.run(programs, timeout_s=10.0, workers=2)   # one Result per program
    results[0].passed, results[0].reason, results[0].seconds, results[0].protections

What a program gets (``sandbox_launcher.py`` has each step; a Result lists those in force,
``protections()`` tells them for this machine once): a fresh Python in new user, network,
IPC, mount and pid namespaces, in which it may create no user namespace; a root holding
only what Python needs, read-only (/usr, /lib*, the interpreter's prefix, two files of
/etc, five devices), its own /proc, size-capped tmpfs on /tmp (its working directory is
/tmp/work) and /dev/shm; resource limits (CPU seconds, address space, file size, open
files, processes, core dumps off); as root, a user id of its own for each slot
(``sandbox_slots``), no groups, no new privileges; stdin closed, a minimal environment.

What it does not get: the checkout, the data and its reference solutions, the home
folders, /run and the host's sockets bound to paths (abstract ones stay in the host's
network namespace), the network, other programs' files, processes or System V IPC.

Time: ``timeout_s`` is CPU time, all the program's processes together (as root, counted
over its uid), so programs hogging the cores beside it do not make a correct program time
out; a sleeping or starved program is stopped at ``WALL_FACTOR * timeout_s`` of wall clock.
Not root: the CPU limit is each process's RLIMIT_CPU only.

Life: the launcher dies with its caller (parent-death signal), the program with its
launcher; with a pid namespace everything the program started dies with it; as root every
process of the slot's uid is killed and its folder emptied when the program ends, and by
the next start after a trainer was killed.

Score: a program passes only if it exits 0 AND the launcher's driver, after running the
whole program, hands back a random nonce the program's text never held (see
``sandbox_launcher``): returning early, ``sys.exit(0)``, ``os._exit(0)``, printing anything
from an ``atexit`` handler, or reading the program's own file does not pass. What remains
open, here as in the official HumanEval harness: code that reads the harness's memory
(its frames, through ``sys._getframe`` or a traceback) can find the nonce; a completion
may install a line tracer (``sys.settrace``) that skips the test asserts; and it may return
an object whose ``__eq__`` is always true (it passes 95.7% of HumanEval). The tests are
asserts inside the program: only the program's exit path is checked, not its answers.

Without namespaces (Docker's default seccomp profile refuses them; ``namespaces=False``
forces it), only the rlimits, the slot's own user (as root), the parent-death signals and
the reclaiming remain: the program sees every host file readable by others, may connect to
host sockets and keeps System V IPC after it ends; its working folder is on the host's
disk, not capped. The code task refuses to run there unless the config opts in
(``eval.code_allow_weak_sandbox``). Not root and without namespaces, programs run as us.

Memory is bounded per process (processes x address space at worst, 32 GiB with the
defaults): a cgroup could bound a program's total; programs get none.
"""

import concurrent.futures
import functools
import json
import math
import os
import pathlib
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import NamedTuple

from floranna_jax import sandbox_slots

LAUNCHER = sandbox_slots.LAUNCHER
PROTECTIONS = (
    "user_namespace", "no_nested_user_namespaces", "network_namespace", "ipc_namespace",
    "mount_namespace", "minimal_root", "private_tmp", "pid_namespace", "private_proc",
    "rlimits", "own_user", "no_new_privs", "die_with_launcher",
)  # fmt: skip
# What hides the host from a program; without these the sandbox is weak (see the module).
ISOLATION = ("no_nested_user_namespaces", "network_namespace", "ipc_namespace", "minimal_root",
             "pid_namespace")  # fmt: skip
WALL_FACTOR = 3  # wall-clock limit: this many times the CPU limit
READ_ONLY = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
             "/etc/ld.so.cache", "/etc/localtime")  # fmt: skip
_POLL_S = 0.1
_TAIL_BYTES = 4096
_PROCESS_LIMIT = "sandbox setup failed: process limit"
_TIMEOUT_SIGNALS = (signal.SIGXCPU,)


class Limits(NamedTuple):
    """Per-program resource limits. cpu_s None: the CPU timeout, rounded up, plus 1 s (the
    total over the program's processes is checked first, as root)."""

    cpu_s: int | None = None  # RLIMIT_CPU seconds of each process
    memory_mb: int = 1024  # RLIMIT_AS of each process
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file written, stdout and stderr included
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 32  # RLIMIT_NPROC: as root, the processes of this program's uid
    tmp_mb: int = 64  # size of the private /tmp (the working directory)


DEFAULT_LIMITS = Limits()


class Result(NamedTuple):
    """passed: exited 0 and the driver handed back the nonce. reason: "passed",
    "timeout after 3 s of CPU", "timeout after 9 s wall-clock", "exit 1: AssertionError",
    "signal SIGKILL", "exited 0 before the end (no proof)", or "sandbox setup failed: ...".
    seconds: wall-clock time. protections: those active."""

    passed: bool
    reason: str
    seconds: float
    protections: tuple[str, ...]


def weak(protections: Sequence[str]) -> tuple[str, ...]:
    """The protections of ISOLATION missing from `protections` (empty: fully isolated)."""
    return tuple(p for p in ISOLATION if p not in protections)


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
    """The interpreter for programs: ours, unless we are root and the sandbox's users cannot
    run it (an interpreter under /root, as pyenv installs it), then the system's python3."""
    if os.geteuid() != 0 or _runnable_by_others(sys.executable):
        return sys.executable
    for path in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        if path and _runnable_by_others(path):
            return path
    raise RuntimeError(
        f"no Python interpreter the sandbox's users may run: {sys.executable} sits in a "
        "folder closed to other users; install python3 system-wide (e.g. /usr/bin/python3) "
        "or pass python=<interpreter readable by all users>"
    )


def _read_only(python: str) -> list[str]:
    """What the new root binds read-only: READ_ONLY and the interpreter's prefix."""
    prefix = os.path.dirname(os.path.dirname(python))
    covered = any(prefix == p or prefix.startswith(p + "/") for p in READ_ONLY)
    return list(READ_ONLY) + ([] if covered else [prefix])


def _spec(slot: sandbox_slots.Slot, limits: Limits, timeout_s: float, python: str,
          namespaces: bool) -> dict:  # fmt: skip
    """What the launcher reads (its argv[1], as JSON); the status fd is added at launch."""
    mb = 1 << 20
    python = os.path.realpath(python)
    return {
        "program": str(slot.folder / "program.py"),
        "host_workdir": str(slot.folder / "work"),
        "new_root": str(slot.folder / "root"),
        "read_only": _read_only(python),
        "namespaces": namespaces,
        "python": python,
        "uid": slot.uid,
        "gid": slot.gid,
        "caller_pid": os.getpid(),
        "tmp_bytes": limits.tmp_mb * mb,
        "limits": {
            "cpu_s": limits.cpu_s or math.ceil(timeout_s) + 1,
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


def _wait(proc: subprocess.Popen, uid: int | None, timeout_s: float) -> str | None:
    """Waits for the launcher to exit WITHOUT reaping it (its pid, also the process group
    id, cannot be reused before we kill the group). None if it exited, else the timeout
    reason: the CPU of `uid`'s processes over `timeout_s`, or the wall clock over
    WALL_FACTOR times that."""
    wall_s = WALL_FACTOR * timeout_s
    deadline = time.monotonic() + wall_s
    fd = os.pidfd_open(proc.pid)
    try:
        while not os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            left = deadline - time.monotonic()
            if left <= 0:
                return f"timeout after {wall_s:g} s wall-clock"
            if uid is not None and sandbox_slots.cpu_seconds(uid) > timeout_s:
                return f"timeout after {timeout_s:g} s of CPU"
            select.select([fd], [], [], min(left, _POLL_S))
        return None
    finally:
        os.close(fd)


def _tail(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
        return f.read().decode("utf-8", "replace")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time signals have no name
        return str(number)


def _reason(report: dict, stderr: str, timeout_s: float) -> tuple[bool, str]:
    if "error" in report:
        return False, f"sandbox setup failed: {report['error']}"
    if report.get("signal") in _TIMEOUT_SIGNALS:
        return False, f"timeout after {timeout_s:g} s of CPU"
    if "signal" in report:
        return False, f"signal {_signal_name(report['signal'])}"
    if "exit" not in report:
        return False, "launcher died"
    last = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "")
    if report["exit"] != 0:
        return False, f"exit {report['exit']}" + (f": {last[:200]}" if last else "")
    if report.get("proof") is not True:
        return False, "exited 0 before the end (no proof)"
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
    """A new file only we may read, never through a link (its folder is ours alone)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    return os.fdopen(os.open(path, flags, 0o600), "wb")


def _prepare(slot: sandbox_slots.Slot, program: str) -> None:
    """The slot's program file (read by the launcher only) and its empty work folder."""
    with _private_file(slot.folder / "program.py") as f:
        f.write(program.encode("utf-8", "surrogateescape"))
    os.mkdir(slot.folder / "root", 0o755)  # where the launcher mounts the new root
    work = slot.folder / "work"
    os.mkdir(work, 0o700)
    if slot.uid is not None:  # made by us a line above, in a folder only we may enter
        os.chown(work, slot.uid, slot.gid)


def _launch(slot: sandbox_slots.Slot, spec: dict) -> subprocess.Popen:
    """Starts the launcher in a new session, its output in files of the slot."""
    files = {n: _private_file(slot.folder / n) for n in ("stdout", "stderr", "status")}
    try:
        spec = {**spec, "status_fd": files["status"].fileno()}
        return subprocess.Popen(
            [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(spec)],
            stdin=subprocess.DEVNULL, stdout=files["stdout"], stderr=files["stderr"],
            pass_fds=[files["status"].fileno()], cwd=slot.folder, env={},
            start_new_session=True,
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
    start = time.monotonic()
    python = python or default_python()
    try:
        with sandbox_slots.taken() as slot:
            _prepare(slot, program)
            proc = _launch(slot, _spec(slot, limits, timeout_s, python, namespaces))
            try:
                timed_out = _wait(proc, slot.uid, timeout_s)
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # also whatever it left behind
                except ProcessLookupError:
                    pass
                proc.wait()
            seconds = time.monotonic() - start
            report = _read_status(slot.folder / "status")
            active = tuple(report.get("protections", ()))
            if timed_out:
                return Result(False, timed_out, seconds, active)
            passed, reason = _reason(report, _tail(slot.folder / "stderr"), timeout_s)
            return Result(passed, reason, seconds, active)
    except OSError as e:  # e.g. a disk that a program without namespaces filled
        return Result(False, f"sandbox setup failed: {e}", time.monotonic() - start, ())


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
    count), each in its own sandbox, with `timeout_s` seconds of CPU (and WALL_FACTOR times
    that of wall clock).

    Returns one Result per program, in order. python: the interpreter for the programs
    (default: `default_python()`; it must be runnable by the sandbox's users). namespaces:
    False skips every namespace and mount (what a kernel that refuses them gives; tests).
    """
    python = python or default_python()
    workers = max(1, min(workers or os.cpu_count() or 1, len(programs) or 1))
    one = functools.partial(
        run_one, timeout_s=timeout_s, limits=limits, python=python, namespaces=namespaces
    )
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, programs))
    # Not root, a fork bomb holds our process count at its limit until killed, so programs
    # launched beside it cannot start: give those a second try.
    again = [i for i, r in enumerate(results) if r.reason.startswith(_PROCESS_LIMIT)]
    for i in again:
        results[i] = one(programs[i])
    return results


@functools.cache
def protections() -> tuple[str, ...]:
    """The protections the sandbox gets on this machine (from running one empty program)."""
    return run_one("pass", timeout_s=30.0).protections
