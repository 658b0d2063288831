"""The sandbox's launcher: isolates one generated program, then execs a fresh Python on it.

Run only by floranna_jax.sandbox, as ``python -I -S sandbox_launcher.py SPEC`` (SPEC is JSON,
see ``sandbox._spec``); it imports nothing of the framework. In order, each step kept only
where the kernel allows it, and every one that took effect named in the report:

  user_namespace      (not root) a user namespace mapping only our own ids, for what follows
  network_namespace   a new, empty network namespace: no interface up, not even loopback
  mount_namespace     a private copy of the mount table, then:
    read_only_root      every mount read-only, no setuid (mount_setattr, Linux >= 5.12)
    private_tmp         fresh size-capped tmpfs on /tmp, /var/tmp, /dev/shm; the working
                        directory /tmp/work lives there and vanishes with the namespace
  pid_namespace       the program is pid 1 of a new pid namespace: when it exits or is
                      killed, the kernel kills everything it started, session changes or not
    private_proc        /proc shows only the namespace's processes
  rlimits             CPU seconds, address space, file size, open files, processes, core 0
  user_nobody         (root) all groups dropped, uid and gid of the sandbox user
  no_new_privs        setuid binaries (su, sudo) cannot raise privileges
  die_with_launcher   the program is killed if the launcher dies (the framework's timeout)

The report goes to the status file descriptor, one JSON object per line:
``{"protections": [...]}`` or ``{"error": "..."}`` from the program's side before exec, then
``{"exit": code}`` or ``{"signal": number}`` from the launcher when the program ends. Any
failure to drop privileges stops the launch (nothing runs as root); the other steps degrade.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
WORKDIR = "/tmp/work"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns")]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int, what: str) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({what})")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    args = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc.mount(args[0], args[1], args[2], ctypes.c_ulong(flags), args[3]), target)


def _enter_user_namespace() -> None:
    """Maps only our own uid and gid: the program keeps no capability after its execve."""
    uid, gid = os.getuid(), os.getgid()
    _unshare(CLONE_NEWUSER, "user")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):  # fmt: skip
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _read_only_root() -> None:
    """All mounts of this (private) namespace read-only and nosuid, recursively."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, MS_PRIVATE, 0)
    ret = _libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), b"/",
        ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
    )  # fmt: skip
    _check(int(ret), "mount_setattr(/)")


def _private_tmp(tmp_bytes: int) -> None:
    options = f"size={tmp_bytes},mode=1777"
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, options)
    for path in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            try:
                _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, options)
            except OSError:
                pass  # /tmp is what programs use; these two are a bonus


def _isolate(spec: dict, done: list) -> str:
    """Namespaces and mounts (before the fork); returns the working directory to use."""
    if not spec["namespaces"]:
        return spec["host_workdir"]
    if os.geteuid() != 0:
        try:
            _enter_user_namespace()
            done.append("user_namespace")
        except OSError:
            pass
    for flag, name in ((CLONE_NEWNET, "network"), (CLONE_NEWNS, "mount"), (CLONE_NEWPID, "pid")):
        try:
            _unshare(flag, name)
            done.append(f"{name}_namespace")
        except OSError:
            pass
    if "mount_namespace" not in done:
        return spec["host_workdir"]
    try:
        _read_only_root()
        done.append("read_only_root")
    except OSError:
        try:  # at least keep our mounts out of the host's table
            _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
        except OSError:
            return spec["host_workdir"]  # mounting could leak to the host: mount nothing
    try:
        _private_tmp(spec["tmp_bytes"])
    except OSError:
        return spec["host_workdir"]
    done.append("private_tmp")
    os.mkdir(WORKDIR, 0o700)
    if spec["uid"] is not None:
        os.chown(WORKDIR, spec["uid"], spec["gid"])
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


def _place_program(code: bytes, folder: str, spec: dict) -> None:
    path = os.path.join(folder, "program.py")
    with open(path, "wb") as f:
        f.write(code)
    if spec["uid"] is not None:
        os.chown(path, spec["uid"], spec["gid"])


def _program_side(spec: dict, code: bytes, workdir: str, done: list, status: int) -> None:
    """In the child: the last steps, the report, then exec. Never returns."""
    try:
        if "pid_namespace" in done and "mount_namespace" in done:
            try:
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
                done.append("private_proc")
            except OSError:
                pass
        if workdir == WORKDIR:  # a fresh tmpfs: the program file goes in it too
            _place_program(code, WORKDIR, spec)
        os.chdir(workdir)
        _set_limits(spec["limits"])
        done.append("rlimits")
        if spec["uid"] is not None:
            _drop_privileges(spec["uid"], spec["gid"])
            done.append("user_nobody")
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        done.append("no_new_privs")
        # after setuid: a change of credentials clears the parent-death signal
        _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl(PDEATHSIG)")
        done.append("die_with_launcher")
        _report(status, {"protections": done})
        os.set_inheritable(status, False)  # closed by a successful exec, kept for an error
        os.close(0)  # standard input closed, not merely empty
        python = spec["python"]
        os.execve(python, [python, "-I", "-B", "program.py"], spec["env"])
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


def main() -> None:
    spec = json.loads(sys.argv[1])
    status = spec["status_fd"]
    done: list[str] = []
    try:
        with open(spec["program"], "rb") as f:  # before a private /tmp hides the host's
            code = f.read()
        _place_program(code, spec["host_workdir"], spec)
        workdir = _isolate(spec, done)
        pid = os.fork()
    except Exception as e:  # noqa: BLE001 - reported; the program never started
        _report(status, {"error": f"{type(e).__name__}: {e}"})
        return
    if pid == 0:
        _program_side(spec, code, workdir, done, status)
    _, wait_status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(wait_status):
        _report(status, {"signal": os.WTERMSIG(wait_status)})
    else:
        _report(status, {"exit": os.WEXITSTATUS(wait_status)})


if __name__ == "__main__":
    main()
