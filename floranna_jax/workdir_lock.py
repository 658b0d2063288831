"""One run per workdir: ``hold(workdir)`` creates the folder if needed and locks it.

    with workdir_lock.hold("/tmp/run"):   # ConfigError if another process holds it
        ...                               # train, write metrics, save checkpoints

The lock is ``fcntl.flock`` on ``WORKDIR/.lock``, which holds the holder's pid: a second
launch on the same workdir fails at once with one line naming that pid, instead of
interleaving its metrics rows and checkpoints with the first. The kernel drops the lock
when its process dies, however it dies, so a lock left by a killed run (a stale pid in the
file) is simply taken over. On exit the lock file is removed, and so are the folders
``hold`` created if they are still empty: a run stopped by a bad input leaves no trace.

A workdir that cannot be created (under a file, on a read-only or pseudo file system such
as ``/proc``) is one ``ConfigError`` naming it. Several processes of one run (``dist``):
only process 0 writes the workdir's files, so only it takes the lock (``primary``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

from floranna_jax.errors import ConfigError

LOCK_FILE = ".lock"


def _missing_folders(workdir: str) -> list[str]:
    """The folders from ``workdir`` up that do not exist yet, deepest first."""
    out, path = [], os.path.abspath(workdir)
    while not os.path.exists(path):
        out.append(path)
        path = os.path.dirname(path)
    return out


def _holder(path: str) -> str:
    with contextlib.suppress(OSError), open(path) as f:
        return f.read().strip() or "unknown"
    return "unknown"


def _lock(path: str) -> int:
    """An open descriptor of ``path`` holding its exclusive lock, or ConfigError naming the
    holder. Retried when the file was replaced between opening and locking (its previous
    holder removed it on exit): a lock on a removed file would exclude no one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise ConfigError(
                f"--workdir {os.path.dirname(path)}: another run (pid {_holder(path)}) is "
                "using it; wait for it to end or choose another --workdir"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


@contextlib.contextmanager
def hold(workdir: str, primary: bool = True) -> Iterator[None]:
    """Create ``workdir`` (and its missing parents) and lock it while the block runs; see
    the module. ``primary=False``: a process other than 0 of a run, which locks nothing."""
    if not primary:
        yield
        return
    created = _missing_folders(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        fd = _lock(os.path.join(workdir, LOCK_FILE))
    except OSError as e:
        _remove_empty(created)
        raise ConfigError(
            f"--workdir {workdir}: cannot create or lock it ({e.strerror}: {e.filename}); "
            "choose a folder you can write"
        ) from None
    except ConfigError:
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(workdir, LOCK_FILE))
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders: list[str]) -> None:
    """Remove ``folders`` (deepest first) that are empty; keep any that hold something."""
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)
