"""The sandbox's launcher: isolates one generated program, then execs a fresh Python on it.

Run only by floranna_jax.sandbox, as ``python -I -S sandbox_launcher.py SPEC`` (SPEC is JSON,
see ``sandbox._spec``); it imports nothing of the framework. It dies with its caller
(parent-death signal). In order, each step kept only where the kernel allows it, and every
one that took effect named in the report:

  user_namespace        a user namespace mapping only the ids the program needs (as root: 0
                        and the slot's own uid, mapped by a helper left outside; otherwise
                        our own uid), then, inside it:
    no_nested_user_namespaces  user.max_user_namespaces = 0: the program can make none
  network_namespace     a new, empty network namespace: no interface up, not even loopback
  ipc_namespace         System V IPC and POSIX message queues die with the program
  mount_namespace       a private copy of the mount table, then:
    minimal_root          a new root (tmpfs) holding only read-only binds of /usr, /bin,
                          /lib*, the interpreter's prefix, /etc/ld.so.cache and
                          /etc/localtime, plus /dev/null, zero, full, random, urandom; the
                          launcher moves it onto / and chroots into it, so the checkout, the
                          data, /run and host sockets bound to paths do not exist there
    private_tmp           size-capped tmpfs on /tmp and /dev/shm; the working directory is
                          /tmp/work
  pid_namespace         the program is pid 1 of a new pid namespace: when it exits or is
                        killed, the kernel kills everything it started, session changes or not
    private_proc          /proc shows only the namespace's processes
  rlimits               CPU seconds, address space, file size, open files, processes, core 0
  own_user              (root) all groups dropped, uid and gid of this program's slot alone
  no_new_privs          setuid binaries (su, sudo) cannot raise privileges
  die_with_launcher     the program is killed if the launcher dies

The program never reads its own source from a file: the launcher opens it (in the slot's
root-only folder) and passes it as fd 5 to a small driver (``DRIVER``), which also reads a
random nonce from fd 3, closes it, runs the program, and only if the program returned writes
the nonce to fd 4 and leaves through ``os._exit(0)``. The launcher reports ``proof`` true when
fd 4 held exactly the nonce. Nothing of the nonce is in the program's text, its files, its
argv or its environment.

The report goes to the status file descriptor, one JSON object per line:
``{"protections": [...]}`` or ``{"error": "..."}`` from the program's side before exec, then
``{"exit": code, "proof": bool}`` or ``{"signal": number}`` when the program ends. Any
failure to drop privileges stops the launch (nothing runs as root); the other steps degrade.

``{"reclaim": {"uid", "gid", "folder"}}`` as SPEC instead kills every process of ``uid``
(as that uid: ``kill(-1)``) and empties ``folder`` as that uid, so root never acts on what a
program could have touched.
"""

import ctypes
import fcntl
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWIPC = 0x00020000, 0x10000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 1024, 2048, 4096, 8192, 0x4000
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
# statvfs flag -> the mount flag that must be kept when remounting a bind in a user namespace
_LOCKED = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC,
           os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME,
           os.ST_RELATIME: MS_RELATIME}  # fmt: skip
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
WORKDIR = "/tmp/work"
NONCE_FD, PROOF_FD, SOURCE_FD = 3, 4, 5
# Runs the program read from fd 5; the nonce lives only in _main's frame.
DRIVER = """import os, sys
def _main():
    nonce = os.read(3, 64)
    os.close(3)
    with open(5, "rb") as f:
        code = compile(f.read(), "program.py", "exec")
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.write(4, nonce)
    os._exit(0)
_main()
"""

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int, what: str) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({what})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:  # fmt: skip
    args = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc.mount(args[0], args[1], args[2], ctypes.c_ulong(flags), args[3]), target)


def _high(fd: int) -> int:
    """`fd` moved to a number >= 10 (close-on-exec), out of the way of fds 3-5."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


def _map_ids(pid: int, uid: int, gid: int) -> None:
    """In a helper left in the parent namespace: maps 0 and the slot's ids into `pid`'s."""
    for name, text in (("uid_map", f"0 0 1\n{uid} {uid} 1\n"),
                       ("gid_map", f"0 0 1\n{gid} {gid} 1\n")):  # fmt: skip
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(text)


def _enter_user_namespace(uid: int | None, gid: int | None) -> None:
    """A new user namespace. Root: a forked helper, still outside, writes the maps (only a
    process with CAP_SETUID over the parent namespace may map more than its own id).
    Otherwise only our own ids are mapped. Inside, user namespaces are then forbidden."""
    if uid is None:
        own_uid, own_gid = os.getuid(), os.getgid()
        _unshare(CLONE_NEWUSER, "user")
        for name, text in (("setgroups", "deny"), ("uid_map", f"{own_uid} {own_uid} 1"),
                           ("gid_map", f"{own_gid} {own_gid} 1")):  # fmt: skip
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        return
    ready_r, ready_w = os.pipe()
    parent = os.getpid()
    helper = os.fork()
    if helper == 0:
        os.close(ready_w)
        code = 1
        try:
            if os.read(ready_r, 1) == b"u":
                _map_ids(parent, uid, gid)
                code = 0
        finally:
            os._exit(code)
    os.close(ready_r)
    try:
        _unshare(CLONE_NEWUSER, "user")
        os.write(ready_w, b"u")
    finally:
        os.close(ready_w)
        _, status = os.waitpid(helper, 0)
    if status != 0:
        raise OSError("the helper could not map the user namespace's ids")


def _bind_read_only(path: str, new_root: str) -> None:
    """`path` of the host at the same place under `new_root`, read-only; a symbolic link
    (/bin -> usr/bin) is copied as a link. Missing paths are skipped."""
    target = new_root + path
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), target)
        return
    if not os.path.exists(path):
        return
    if os.path.isdir(path):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
    _mount(path, target, None, MS_BIND | MS_REC)
    if path in DEVICES:
        return  # /dev/null must stay writable; the devices hold nothing to protect
    kept = sum(flag for st, flag in _LOCKED.items() if os.statvfs(path).f_flag & st)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | kept)


def _minimal_root(spec: dict) -> None:
    """Builds the new root on spec["new_root"] (an empty folder of the slot), then moves it
    onto / and chroots into it. Needs a private mount namespace."""
    new = spec["new_root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing of ours reaches the host's table
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in spec["read_only"] + list(DEVICES):
        _bind_read_only(path, new)
    os.mkdir(new + "/proc", 0o555)
    for folder in ("/tmp", "/dev/shm"):  # /dev/shm: POSIX shared memory, multiprocessing
        os.mkdir(new + folder, 0o755)
        _mount("tmpfs", new + folder, "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={spec['tmp_bytes']},mode=1777")  # fmt: skip
    os.mkdir(new + WORKDIR, 0o700)
    if spec["uid"] is not None:
        os.chown(new + WORKDIR, spec["uid"], spec["gid"])
    _mount(None, new, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(new)
    _mount(new, "/", None, MS_MOVE)
    _check(_libc.chroot(b"."), "chroot")
    os.chdir("/")


def _isolate(spec: dict, done: list) -> str:
    """Namespaces and the new root (before the fork); returns the working directory."""
    if not spec["namespaces"]:
        return spec["host_workdir"]
    try:
        _enter_user_namespace(spec["uid"], spec["gid"])
        done.append("user_namespace")
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        done.append("no_nested_user_namespaces")
    except OSError:
        pass
    for flag, name in ((CLONE_NEWNET, "network"), (CLONE_NEWIPC, "ipc"), (CLONE_NEWNS, "mount"),
                       (CLONE_NEWPID, "pid")):  # fmt: skip
        try:
            _unshare(flag, name)
            done.append(f"{name}_namespace")
        except OSError:
            pass
    if "mount_namespace" not in done:
        return spec["host_workdir"]
    try:
        _minimal_root(spec)
    except OSError:
        return spec["host_workdir"]  # whatever was mounted stays in our private namespace
    done += ["minimal_root", "private_tmp"]
    return WORKDIR


def _set_limits(limits: dict) -> None:
    pairs = {
        resource.RLIMIT_CPU: (limits["cpu_s"], limits["cpu_s"] + 1),  # SIGXCPU, then SIGKILL
        resource.RLIMIT_AS: limits["memory_bytes"],
        resource.RLIMIT_FSIZE: limits["file_bytes"],
        resource.RLIMIT_NOFILE: limits["open_files"],
        resource.RLIMIT_NPROC: limits["processes"],
        resource.RLIMIT_CORE: 0,
    }
    for which, value in pairs.items():
        resource.setrlimit(which, value if isinstance(value, tuple) else (value, value))


def _drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getegid() != gid:
        raise OSError(f"still uid {os.geteuid()} gid {os.getegid()} after setuid({uid})")


def _program_side(spec: dict, workdir: str, done: list, status: int, fds: tuple) -> None:
    """In the child: the last steps, the report, then exec. Never returns."""
    try:
        for fd, target in zip(fds, (NONCE_FD, PROOF_FD, SOURCE_FD), strict=True):
            os.dup2(fd, target, inheritable=True)
        if "pid_namespace" in done and "minimal_root" in done:
            try:
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                done.append("private_proc")
            except OSError:
                pass
        os.chdir(workdir)
        _set_limits(spec["limits"])
        done.append("rlimits")
        if spec["uid"] is not None:
            _drop_privileges(spec["uid"], spec["gid"])
            done.append("own_user")
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        done.append("no_new_privs")
        # after setuid: a change of credentials clears the parent-death signal
        _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl(PDEATHSIG)")
        done.append("die_with_launcher")
        _report(status, {"protections": done})
        os.close(0)  # standard input closed, not merely empty
        python = spec["python"]
        os.execve(python, [python, "-I", "-B", "-c", DRIVER], spec["env"])
    except BlockingIOError:  # EAGAIN from execve after setuid: the user's process count
        error = f"process limit: user {spec['uid']} has {spec['limits']['processes']} processes"
    except BaseException as e:  # noqa: BLE001 - any failure is reported, and nothing runs
        error = f"{type(e).__name__}: {e}"
    try:
        _report(status, {"error": error})
    finally:
        os._exit(125)


def _report(status: int, report: dict) -> None:
    os.write(status, (json.dumps(report) + "\n").encode())


def _pipes(nonce: bytes, program: str) -> tuple[tuple[int, int, int], int]:
    """((nonce read end, proof write end, source fd) for the child, proof read end)."""
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    proof_r, proof_w = os.pipe()
    source = os.open(program, os.O_RDONLY | os.O_NOFOLLOW)
    child = tuple(_high(fd) for fd in (nonce_r, proof_w, source))
    return child, _high(proof_r)


def _proof(proof_r: int) -> bytes:
    os.set_blocking(proof_r, False)
    try:
        return os.read(proof_r, 128)
    except BlockingIOError:
        return b""


def _reclaim(job: dict) -> None:
    """As the slot's uid (when root gave one): kill all its processes, then empty `folder`."""
    # resolved before setuid: the uid may not read our interpreter's lazily imported modules
    tools = {n: next(p for p in (f"/usr/bin/{n}", f"/bin/{n}") if os.path.exists(p))
             for n in ("chmod", "find")}  # fmt: skip
    try:
        os.chdir(job["folder"])  # before setuid: the uid cannot reach its folder by name
    except FileNotFoundError:
        job = {**job, "folder": None}
    if job["uid"] is not None:
        os.setgroups([])
        os.setgid(job["gid"])
        os.setuid(job["uid"])
        try:  # every process of this uid but us; none can fork once the signal is pending
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if job["folder"] is None or not os.listdir("."):
        return
    pid = os.fork()
    if pid == 0:  # a tree with folders closed to their owner: open them first
        os.execve(tools["chmod"], ["chmod", "-R", "u+rwx", "."], {})
    os.waitpid(pid, 0)
    os.execve(tools["find"], ["find", ".", "-mindepth", "1", "-delete"], {})


def main() -> None:
    spec = json.loads(sys.argv[1])
    if "reclaim" in spec:
        _reclaim(spec["reclaim"])
        return
    _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl(PDEATHSIG)")
    if os.getppid() != spec["caller_pid"]:
        return  # the caller died before the line above
    status = _high(spec["status_fd"])
    done: list[str] = []
    nonce = os.urandom(16).hex().encode()
    try:
        child_fds, proof_r = _pipes(nonce, spec["program"])
        workdir = _isolate(spec, done)
        pid = os.fork()
    except Exception as e:  # noqa: BLE001 - reported; the program never started
        _report(status, {"error": f"{type(e).__name__}: {e}"})
        return
    if pid == 0:
        _program_side(spec, workdir, done, status, child_fds)
    for fd in child_fds:
        os.close(fd)
    _, wait_status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(wait_status):
        _report(status, {"signal": os.WTERMSIG(wait_status)})
    else:
        code = os.WEXITSTATUS(wait_status)
        _report(status, {"exit": code, "proof": _proof(proof_r) == nonce})


if __name__ == "__main__":
    main()
