"""The sandbox's slots: one folder and (as root) one user id for each program running.

    with sandbox_slots.taken() as slot:     # locked for this process; leftovers reclaimed
        slot.folder / "program.py", slot.uid, slot.gid
        sandbox_slots.cpu_seconds(slot.uid)  # CPU of every process of the slot's user

All slots live in one folder, ``$TMPDIR/floranna-sandbox-<euid>``, mode 0700, that only we
may enter; slot ``i`` is ``slot-<i>/`` (ours, 0700) and its lock ``slot-<i>.lock``. As root,
slot ``i`` runs its program as uid and gid ``BASE_ID + i``, a user of its own: programs
running side by side cannot signal, trace or write each other, the process limit counts
each program alone, and ``kill(-1)`` as that uid ends everything the program left behind,
setsid or not.

A slot is held through an ``flock`` on its lock file, which the kernel drops when the
holder dies. Taking a slot reclaims it first (kills its uid's processes, empties its work
folder as that uid), and the first ``taken`` of a process reclaims every slot no live
process holds: what a killed trainer left is gone by the next start.
"""

import contextlib
import fcntl
import functools
import json
import os
import pathlib
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import NamedTuple

LAUNCHER = pathlib.Path(__file__).with_name("sandbox_launcher.py")
BASE_ID = 0x5AD00000  # uids BASE_ID .. BASE_ID + MAX_SLOTS - 1: in no passwd file
MAX_SLOTS = 256
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_first = threading.Lock()
_swept = False


class Slot(NamedTuple):
    """folder: the slot's folder (ours, 0700). uid, gid: its user (None when not root)."""

    folder: pathlib.Path
    uid: int | None
    gid: int | None


@functools.cache
def base() -> pathlib.Path:
    """The folder of all slots, made if missing; refused unless it is ours alone."""
    path = pathlib.Path(tempfile.gettempdir()) / f"floranna-sandbox-{os.geteuid()}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise RuntimeError(
            f"sandbox folder {path} is not a folder that only uid {os.geteuid()} may enter; "
            "remove it (or set TMPDIR elsewhere)"
        )
    return path


def _slot(index: int) -> Slot:
    uid = BASE_ID + index if os.geteuid() == 0 else None
    return Slot(base() / f"slot-{index}", uid, uid)


def _has_processes(uid: int) -> bool:
    """True if a process (zombies aside) has real uid `uid`; from /proc/PID/status, which
    tells the truth even for a process that made itself non-dumpable."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as f:
                fields = dict(ln.split(b":", 1) for ln in f.read().splitlines() if b":" in ln)
        except OSError:
            continue  # gone meanwhile
        if int(fields[b"Uid"].split()[0]) == uid and fields[b"State"].split()[0] != b"Z":
            return True
    return False


def reclaim(slot: Slot) -> None:
    """Kills every process of the slot's user and empties its work folder, as that user
    (the launcher's reclaim mode; skipped when there is nothing to do, as after a program
    whose pid namespace died with it); then removes the slot's own files."""
    work = slot.folder / "work"
    if (work.is_dir() and any(os.scandir(work))) or (
        slot.uid is not None and _has_processes(slot.uid)
    ):
        job = {"uid": slot.uid, "gid": slot.gid, "folder": str(work)}
        subprocess.run(
            [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps({"reclaim": job})],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={}, check=False,
        )  # fmt: skip
    slot.folder.mkdir(mode=0o700, exist_ok=True)
    for entry in os.scandir(slot.folder):  # only we write here: plain names are safe
        if entry.is_dir(follow_symlinks=False):
            os.rmdir(entry.path)  # work/ was emptied above; only its user could fill it
        else:
            os.unlink(entry.path)


def _try_lock(index: int) -> int | None:
    """The fd holding slot `index`'s lock, or None if another holder has it."""
    fd = os.open(base() / f"slot-{index}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _sweep() -> None:
    """Reclaims every slot that no live process holds (once per process)."""
    global _swept
    with _first:
        if _swept:
            return
        _swept = True
        for lock in base().glob("slot-*.lock"):
            index = lock.name[len("slot-") : -len(".lock")]
            if index.isdigit() and (fd := _try_lock(int(index))) is not None:
                try:
                    reclaim(_slot(int(index)))
                finally:
                    os.close(fd)


@contextlib.contextmanager
def taken() -> Iterator[Slot]:
    """A free slot, reclaimed, held until the block ends (then reclaimed again)."""
    _sweep()
    for index in range(MAX_SLOTS):
        fd = _try_lock(index)
        if fd is not None:
            break
    else:
        raise RuntimeError(f"all {MAX_SLOTS} sandbox slots are taken; run fewer workers")
    slot = _slot(index)
    try:
        reclaim(slot)
        yield slot
    finally:
        try:
            reclaim(slot)
        finally:
            os.close(fd)


def cpu_seconds(uid: int) -> float:
    """CPU seconds (user + system, with reaped children) of the running processes of `uid`.
    A process that made itself non-dumpable shows as root's and is missed: the per-process
    RLIMIT_CPU and the wall-clock limit still bound it."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if fields[0] not in (b"Z", b"X"):  # a zombie of a killed program spends nothing more
            ticks += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / _CLOCK_TICKS
