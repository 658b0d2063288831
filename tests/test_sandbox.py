"""The sandbox: real reference solutions pass; hostile programs fail within the timeout and
harm nothing (a sentinel file survives, nothing new appears, no connection is made, no
process is left behind).

Each attack is written to PASS if it succeeds, so "it failed" means "it was stopped".
"""

import os
import pathlib
import random
import socket
import sys
import tempfile

import pytest
from sandbox_cases import (
    TIMEOUT_S,
    assert_failed_in_time,
    processes_of,
    sandbox_uids,
    wait_for_no_more_than,
)

from floranna_jax import sandbox, sandbox_slots
from floranna_jax.data import code

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")

MBPP_SLOW = {"MBPP/123"}  # its reference takes ~10 s of pure Python (amicable numbers < 10^4)

INFINITE_LOOP = "while True:\n    pass\n"
FORK_BOMB = """
import os
import pwd
while True:
    try:
        if os.fork() == 0:
            os.setsid()  # try to leave the process group that the timeout kills
    except OSError:
        pass
"""
MEMORY_HOG = (
    "chunks = []\nwhile True:\n    chunks.append(bytearray(512 << 20))  # touched: zeroed\n"
)
DISK_FILLER = "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (256 << 20))\n"
EARLY_EXIT = "import sys\nsys.exit(0)\nraise AssertionError('the tests would fail')\n"
HARD_EXIT = "import os\nos._exit(0)\n"
READS_STDIN = "input()\n"


def _writer(paths_to_write: list[str], paths_to_delete: list[str]) -> str:
    """A program that exits 0 (passes) if it wrote or deleted ANY of the paths."""
    return f"""
import os
import pwd
done = []
for path in {paths_to_write!r}:
    try:
        with open(path, "w") as f:
            f.write("escaped")
        done.append(path)
    except OSError:
        pass
for path in {paths_to_delete!r}:
    try:
        os.remove(path)
        done.append(path)
    except OSError:
        pass
if not done:
    raise SystemExit(1)
"""


def test_humaneval_canonical_solutions_all_pass(humaneval_dir):
    problems = code.read_humaneval(data_dir=humaneval_dir)
    assert len(problems) == 164
    results = sandbox.run([code.program(p, p.solution) for p in problems], timeout_s=30, workers=4)
    failed = [(p.task_id, r.reason) for p, r in zip(problems, results, strict=True) if not r.passed]
    assert failed == []


def test_mbpp_reference_sample_passes(mbpp_dir):
    problems = [p for p in code.read_mbpp("test", data_dir=mbpp_dir) if p.task_id not in MBPP_SLOW]
    with_setup = [p for p in problems if p.setup.strip()]  # task 367 builds a tree first
    assert with_setup
    sample = with_setup + random.Random(0).sample(problems, 50 - len(with_setup))
    results = sandbox.run([code.program(p, p.solution) for p in sample], timeout_s=30, workers=4)
    failed = [(p.task_id, r.reason) for p, r in zip(sample, results, strict=True) if not r.passed]
    assert failed == []


def test_wrong_programs_fail_with_their_reason():
    ok, wrong, crash, syntax = sandbox.run(
        ["assert sorted([2, 1]) == [1, 2]", "assert 1 + 1 == 3", "1 / 0", "def f(:\n"],
        timeout_s=TIMEOUT_S,
    )
    assert ok.passed and ok.reason == "passed"
    assert not wrong.passed and wrong.reason == "exit 1: AssertionError"
    assert not crash.passed and crash.reason.endswith("ZeroDivisionError: division by zero")
    assert not syntax.passed and "SyntaxError" in syntax.reason


def test_what_the_program_sees():
    """The protections reported are the protections in force."""
    active = sandbox.protections()
    checks = ["import os, sys", "assert sys.stdin is None  # closed, not empty"]
    checks.append("assert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'LC_CTYPE'}")
    if "own_user" in active:
        low, high = sandbox_slots.BASE_ID, sandbox_slots.BASE_ID + sandbox_slots.MAX_SLOTS
        checks.append(f"assert {low} <= os.getuid() == os.geteuid() < {high}")
        checks.append("assert os.getgroups() == []")
    if "private_tmp" in active:
        checks.append("assert os.getcwd() == '/tmp/work' and os.listdir('/tmp') == ['work']")
    if "minimal_root" in active:
        top = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc"}
        checks.append(f"assert set(os.listdir('/')) - {top!r} <= {{'tmp', 'root', 'opt'}}")
        checks.append("assert sorted(os.listdir('/etc')) <= ['ld.so.cache', 'localtime']")
    if "private_proc" in active:
        checks.append("assert [p for p in os.listdir('/proc') if p.isdigit()] == ['1']")
    if "network_namespace" in active:
        checks.append("assert [n for _, n in __import__('socket').if_nameindex()] == ['lo']")
    (result,) = sandbox.run(["\n".join(checks)], timeout_s=TIMEOUT_S)
    assert result.passed, result
    assert set(active) <= set(sandbox.PROTECTIONS) and "rlimits" in active


def test_attacks_fail_in_time_and_harm_nothing(tmp_path):
    """Infinite loop, memory hog, disk filler, early exits, stdin, network, files outside."""
    (tmp_path / "sentinel.txt").write_text("keep")
    before_files = sorted(os.listdir(tmp_path))
    shared = pathlib.Path(tempfile.mkdtemp(prefix="sandbox-test-"))  # one anyone may write
    try:
        shared.chmod(0o777)
        (shared / "sentinel.txt").write_text("keep")
        (shared / "sentinel.txt").chmod(0o666)
        writes = [str(tmp_path / "new.txt"), str(shared / "new.txt")]
        deletes = [str(tmp_path / "sentinel.txt"), str(shared / "sentinel.txt")]
        with socket.socket() as server, socket.socket(socket.AF_UNIX) as unix_server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            unix_name = f"\0floranna-sandbox-test-{os.getpid()}"
            unix_server.bind(unix_name)
            unix_server.listen()
            network = f"""
import socket
with socket.create_connection(("127.0.0.1", {server.getsockname()[1]}), timeout=2) as s:
    s.sendall(b"escaped")
"""
            unix = f"""
with __import__('socket').socket(__import__('socket').AF_UNIX) as s:
    s.connect({unix_name!r})
    s.sendall(b"escaped")
"""
            programs = [INFINITE_LOOP, MEMORY_HOG, DISK_FILLER, EARLY_EXIT, HARD_EXIT,
                        READS_STDIN, network, unix, _writer(writes, deletes),
                        _writer(["/tmp/sandbox-escape.txt"], [])]  # fmt: skip
            results = sandbox.run(programs, timeout_s=TIMEOUT_S, workers=4)
            server.setblocking(False)
            unix_server.setblocking(False)
            for listener in (server, unix_server):
                with pytest.raises(BlockingIOError):  # no connection is waiting
                    listener.accept()
        loop, memory, disk, early, hard, stdin, net, unix_net, writer, tmp_writer = results
        active = set(loop.protections)
        assert_failed_in_time(loop, "timeout after")
        assert_failed_in_time(memory, "MemoryError")
        assert_failed_in_time(disk, "File too large")
        assert_failed_in_time(early, "no proof")
        assert_failed_in_time(hard, "no proof")
        assert_failed_in_time(stdin, "lost sys.stdin")
        if "network_namespace" in active:
            assert_failed_in_time(net, "Network is unreachable")
            assert_failed_in_time(unix_net)
        assert_failed_in_time(writer)
        assert sorted(os.listdir(tmp_path)) == before_files
        assert (tmp_path / "sentinel.txt").read_text() == "keep"
        if {"private_tmp", "read_only_root"} & active:
            assert os.listdir(shared) == ["sentinel.txt"]
            assert (shared / "sentinel.txt").read_text() == "keep"
        if "private_tmp" in active:  # writing its own /tmp is allowed; ours stays clean
            assert tmp_writer.passed and not os.path.exists("/tmp/sandbox-escape.txt")
    finally:
        for leftover in ("new.txt", "sentinel.txt"):
            (shared / leftover).unlink(missing_ok=True)
        shared.rmdir()
        if os.path.exists("/tmp/sandbox-escape.txt") and os.stat("/tmp/sandbox-escape.txt").st_uid:
            os.remove("/tmp/sandbox-escape.txt")  # only one the sandbox user wrote


def test_fork_bomb_is_bounded_and_cleaned_up():
    before = len(processes_of(sandbox_uids()))
    bomb, *beside = sandbox.run([FORK_BOMB] + ["assert True"] * 3, timeout_s=TIMEOUT_S, workers=4)
    assert_failed_in_time(bomb, "timeout")
    assert all(r.passed for r in beside), beside  # started next to it (retried if need be)
    left = wait_for_no_more_than(before, sandbox_uids())
    assert left <= before, "bomb processes outlived the timeout"


def test_without_namespaces_the_limits_still_hold(tmp_path):
    """What a kernel that refuses namespaces gives: rlimits (and a user of its own as root)."""
    (tmp_path / "sentinel.txt").write_text("keep")
    writer = _writer([str(tmp_path / "new.txt")], [str(tmp_path / "sentinel.txt")])
    results = sandbox.run(
        [INFINITE_LOOP, MEMORY_HOG, EARLY_EXIT, writer, "print('fine')"],
        timeout_s=TIMEOUT_S,
        namespaces=False,
    )
    loop, memory, early, wrote, fine = results
    assert not {"network_namespace", "mount_namespace", "pid_namespace"} & set(fine.protections)
    assert "rlimits" in fine.protections and fine.passed, fine
    assert_failed_in_time(loop, "timeout")
    assert_failed_in_time(memory, "MemoryError")
    assert_failed_in_time(early, "no proof")
    if "own_user" in fine.protections:
        assert_failed_in_time(wrote)
        assert os.listdir(tmp_path) == ["sentinel.txt"]


def test_no_python_for_the_sandbox_user_is_a_clear_error(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("only root switches to the sandbox user")
    sandbox.default_python.cache_clear()
    monkeypatch.setattr(sandbox, "_runnable_by_others", lambda path: False)
    try:
        with pytest.raises(RuntimeError, match="no Python interpreter the sandbox's users"):
            sandbox.default_python()
    finally:
        sandbox.default_python.cache_clear()
