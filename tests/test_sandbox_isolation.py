"""The sandbox against the nine cases of issue 18, each with a program of its own, written
to PASS (or to do its harm) if the attack succeeds, so "it failed" means "it was stopped".
Every test here failed (or raised) on the sandbox before that issue was fixed; the last one
pins the two holes shared with the official HumanEval harness, which stay documented."""

import glob
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from sandbox_cases import (
    TIMEOUT_S,
    assert_failed_in_time,
    processes_of,
    sandbox_uids,
    wait_for_no_more_than,
)
from smoke_setup import REPO, config_file

from floranna_jax import config_check, sandbox, sandbox_slots
from floranna_jax.errors import ConfigError

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="per-program users need root")


def _isolated() -> bool:
    return not sandbox.weak(sandbox.protections())


needs_namespaces = pytest.mark.skipif(
    sys.platform != "linux" or not _isolated(), reason="this kernel refuses namespaces"
)

# 1. plants links to a host file wherever a neighbour's (or its own) files will be written
PLANTER = """
import glob, os, time
end = time.monotonic() + 3
while time.monotonic() < end:
    for folder in glob.glob({pattern!r}) + glob.glob({pattern!r} + "*/"):
        for name in ("work/program.py", "program.py", "stdout", "status", "work"):
            try:
                os.symlink({target!r}, os.path.join(folder, name))
            except OSError:
                pass
    time.sleep(0.002)
"""
# 2. reads host files it should not see
READER = """
import os
seen = []
for path in {paths!r}:
    try:
        os.listdir(path) if os.path.isdir(path) else open(path, "rb").read(1)
        seen.append(path)
    except OSError:
        pass
assert seen, "nothing of the host was readable"
print(seen)
"""
SOCKET_CALLER = """
import socket
with socket.socket(socket.AF_UNIX) as s:
    s.connect({path!r})
    s.sendall(b"escaped")
"""
# 3. System V shared memory: 1 MiB, never removed
SHM_MAKER = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
assert libc.shmget(0, 1 << 20, 0o1000 | 0o600) >= 0  # IPC_PRIVATE, IPC_CREAT
"""
# 4. a user namespace of its own (then it could mount an uncapped tmpfs)
NESTED_USERNS = """
import ctypes
assert ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0, "CLONE_NEWUSER refused"
"""
# 5, 6. spinners that leave the process group
SPINNERS = """
import os
for _ in range({n}):
    if os.fork() == 0:
        os.setsid()
        break
while True:
    pass
"""
NEIGHBOUR = "assert sum(i * i for i in range(15_000_000)) > 0\n"  # ~1 s of CPU
# 7. what crashed sandbox.run without namespaces
REAL_TIME_SIGNAL = "import os, signal\nos.kill(os.getpid(), signal.SIGRTMIN + 2)\n"
DEEP_TREE = "import os\nfor _ in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\n"
# 9. forging the pass: the marker from its own file and constants; the same from atexit
# after failing; and blind pokes at every file descriptor
FIND_MARKERS = """
import atexit, os, re, sys
def own_text():
    try:
        return open("program.py").read()
    except OSError:
        return ""
found = set(re.findall(r"sandbox-ok-[0-9a-f]+", own_text()))
for const in sys._getframe().f_code.co_consts:
    if isinstance(const, (bytes, str)):
        found |= set(re.findall(r"sandbox-ok-[0-9a-f]+", str(const)))
def show():
    print("\\n" + "\\n".join(found), flush=True)
"""
FORGER = FIND_MARKERS + "show()\nos._exit(0)\n"
ATEXIT_FORGER = FIND_MARKERS + (
    "atexit.register(lambda: (show(), os._exit(0)))\nassert False, 'the tests fail'\n"
)
BLIND_FORGER = """
import os
taken = b""
for fd in range(3, 12):
    try:
        taken += os.read(fd, 64)
    except OSError:
        pass
for fd in range(3, 12):
    try:
        os.write(fd, taken or b"0" * 32)
    except OSError:
        pass
os._exit(0)
"""
# the two holes shared with the official HumanEval harness (documented, not closed)
ALWAYS_EQUAL = """
class Anything:
    def __eq__(self, other):
        return True
def add(a, b):
    return Anything()
assert add(1, 2) == 4
"""
TRACER = """
import dis, sys
def skip_asserts(frame, event, arg):
    if event == "line":
        asserts = {i.positions.lineno for i in dis.get_instructions(frame.f_code)
                   if i.opname == "LOAD_ASSERTION_ERROR"}
        line = frame.f_lineno
        while line in asserts:  # the jump's landing line gets no event of its own
            line += 1
        if line != frame.f_lineno:
            frame.f_lineno = line
    return skip_asserts
sys.settrace(skip_asserts)
sys._getframe().f_trace = skip_asserts
def add(a, b):
    return 0
assert add(1, 2) == 3
assert add(2, 2) == 4
done = True
"""


@needs_root
def test_1_a_planted_link_never_makes_root_write_a_host_file(tmp_path):
    """Without namespaces (all programs see the host's /tmp): links planted in every
    sandbox folder the planter can see; root writes nothing through them."""
    target = tmp_path / "host.txt"
    target.write_text("keep")
    pattern = os.path.join(tempfile.gettempdir(), "floranna-sandbox*", "")
    programs = [PLANTER.format(pattern=pattern, target=str(target))] + ["pass"] * 12
    results = sandbox.run(programs, timeout_s=10, workers=2, namespaces=False)
    assert all(r.passed for r in results[1:]), results
    assert target.read_text() == "keep"
    assert target.stat().st_uid == 0


@needs_namespaces
@needs_root  # a socket in /run
def test_2_host_files_and_path_sockets_are_out_of_reach(tmp_path):
    data = os.environ.get("FLORANNA_DATA_DIR", str(REPO.parent / "shared" / "data"))
    paths = [sandbox.__file__, str(REPO), data, "/run", "/home", "/var", "/etc/passwd"]
    # where D-Bus and journald live; not /tmp, which the old private /tmp already hid
    folder = pathlib.Path(tempfile.mkdtemp(prefix="sandbox-socket-", dir="/run"))
    try:
        folder.chmod(0o755)
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(folder / "host.sock"))
            (folder / "host.sock").chmod(0o777)
            server.listen()
            reader, caller = sandbox.run(
                [READER.format(paths=paths), SOCKET_CALLER.format(path=str(folder / "host.sock"))],
                timeout_s=TIMEOUT_S,
            )
            server.setblocking(False)
            with pytest.raises(BlockingIOError):  # no connection is waiting
                server.accept()
    finally:
        (folder / "host.sock").unlink(missing_ok=True)
        folder.rmdir()
    assert_failed_in_time(reader, "nothing of the host was readable")
    assert_failed_in_time(caller, "FileNotFoundError")


def _shm_segments(uids) -> int:
    lines = pathlib.Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return sum(int(line.split()[7]) in uids for line in lines)  # the creator's uid


@needs_namespaces
@needs_root
def test_3_system_v_shared_memory_dies_with_the_program():
    before = _shm_segments(sandbox_uids())
    (result,) = sandbox.run([SHM_MAKER], timeout_s=TIMEOUT_S)
    assert result.passed, result  # it made its segment, in its own IPC namespace
    assert _shm_segments(sandbox_uids()) == before


@needs_namespaces
def test_4_no_user_namespace_inside():
    (result,) = sandbox.run([NESTED_USERNS], timeout_s=TIMEOUT_S)
    assert_failed_in_time(result, "CLONE_NEWUSER refused")


def _launchers(caller: int) -> list[dict]:
    """The specs of the launchers whose parent is `caller`."""
    specs = []
    for entry in pathlib.Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"PPid:\t{caller}\n" in (entry / "status").read_text():
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                specs += [
                    s for a in argv if a.startswith(b"{") and "program" in (s := json.loads(a))
                ]
        except (OSError, ValueError):
            continue
    return specs


@needs_root
@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "refused"])
def test_5_a_killed_caller_leaves_nothing_by_the_next_start(namespaces):
    program = SPINNERS.format(n=3)
    run = f"sandbox.run([{program!r}], timeout_s=60, namespaces={namespaces})"
    caller = subprocess.Popen([sys.executable, "-c", f"from floranna_jax import sandbox; {run}"],
                              cwd=REPO)  # fmt: skip
    deadline = time.monotonic() + 30
    while not (specs := _launchers(caller.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    uid = specs[0]["uid"]
    while len(processes_of({uid})) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    caller.kill()
    caller.wait()
    if namespaces:  # launcher, program and its pid namespace die with the caller
        assert wait_for_no_more_than(0, {uid}) == 0
    next_start = "from floranna_jax import sandbox; sandbox.run(['pass'])"
    subprocess.run([sys.executable, "-c", next_start], cwd=REPO, check=True)
    assert wait_for_no_more_than(0, {uid}) == 0
    assert not (pathlib.Path(specs[0]["program"]).parent / "work").exists()


@needs_root
def test_6_cpu_hogs_do_not_time_out_a_correct_neighbour():
    hog, neighbour = sandbox.run([SPINNERS.format(n=16), NEIGHBOUR], timeout_s=3.0, workers=2)
    assert not hog.passed and "timeout" in hog.reason, hog
    assert neighbour.passed, neighbour


def test_7_nothing_a_program_does_raises_without_namespaces():
    rt_signal, deep = sandbox.run([REAL_TIME_SIGNAL, DEEP_TREE], timeout_s=TIMEOUT_S,
                                  namespaces=False)  # fmt: skip
    assert not rt_signal.passed and rt_signal.reason == f"signal {signal.SIGRTMIN + 2}"
    assert deep.passed, deep  # it did nothing wrong; its tree is gone with its slot
    assert glob.glob(str(sandbox_slots.base() / "slot-*" / "work" / "d")) == []


def test_8_the_code_task_refuses_a_weak_sandbox_unless_told(monkeypatch):
    monkeypatch.setattr(sandbox, "protections", lambda: ("rlimits", "own_user"))
    config = config_file("code.py", "smoke")
    with pytest.raises(ConfigError, match=r"^config field eval.code_allow_weak_sandbox: .*"
                       r"network_namespace.*code_allow_weak_sandbox=True$"):  # fmt: skip
        config_check.validate(config)
    config = config_file("code.py", "smoke", **{"eval.code_allow_weak_sandbox": True})
    config_check.validate(config)
    config_check.validate(config_file("gsm8k.py", "smoke"))  # runs no code: not asked


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "refused"])
def test_9_the_pass_cannot_be_forged(namespaces):
    forged = sandbox.run([FORGER, ATEXIT_FORGER, BLIND_FORGER], timeout_s=TIMEOUT_S,
                         namespaces=namespaces)  # fmt: skip
    for result in forged:  # each exits 0, as the old marker check wanted
        assert not result.passed and result.reason.endswith("(no proof)"), result


def test_9_the_holes_shared_with_the_official_harness_stay_documented():
    """An object equal to everything and a line tracer pass here as in HumanEval's own
    harness; the sandbox's docstring says so. If one stops passing, update the docstring."""
    assert all(r.passed for r in sandbox.run([ALWAYS_EQUAL, TRACER], timeout_s=TIMEOUT_S))
    assert "__eq__" in sandbox.__doc__ and "settrace" in sandbox.__doc__
