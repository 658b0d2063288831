"""Tests of the workdir lock (floranna_jax/workdir_lock.py): one holder at a time, named by
pid; a dead holder's lock taken over; nothing left behind; uncreatable folders named."""

import os
import subprocess
import sys

import pytest

from floranna_jax import workdir_lock
from floranna_jax.errors import ConfigError


def test_a_held_workdir_names_its_holder(tmp_path):
    with workdir_lock.hold(str(tmp_path)):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
        # flock belongs to an open file: a second opening conflicts, even in this process.
        with pytest.raises(ConfigError, match=rf"another run \(pid {os.getpid()}\) is using it"):
            with workdir_lock.hold(str(tmp_path)):
                pass
    assert not (tmp_path / ".lock").exists()
    with workdir_lock.hold(str(tmp_path)):  # released: free again
        pass


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    (tmp_path / ".lock").write_text(dead.stdout)  # the file a killed run left
    with workdir_lock.hold(str(tmp_path)):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


def test_created_folders_go_when_left_empty(tmp_path):
    with workdir_lock.hold(str(tmp_path / "a" / "b")):
        assert (tmp_path / "a" / "b").is_dir()
    assert not (tmp_path / "a").exists()  # a run stopped early leaves no trace
    with workdir_lock.hold(str(tmp_path / "a" / "b")):
        (tmp_path / "a" / "b" / "metrics.jsonl").write_text("{}\n")
    assert os.listdir(tmp_path / "a" / "b") == ["metrics.jsonl"]


def test_only_process_0_locks(tmp_path):
    with workdir_lock.hold(str(tmp_path)), workdir_lock.hold(str(tmp_path), primary=False):
        pass


@pytest.mark.parametrize("under", ["/proc", "a_file"])
def test_a_workdir_that_cannot_be_created_is_named(tmp_path, under):
    (tmp_path / "a_file").write_text("keep me\n")
    workdir = os.path.join(under if under == "/proc" else str(tmp_path / under), "x", "run")
    with pytest.raises(ConfigError, match=f"--workdir {workdir}: cannot create or lock it"):
        with workdir_lock.hold(workdir):
            pass
    assert (tmp_path / "a_file").read_text() == "keep me\n"
