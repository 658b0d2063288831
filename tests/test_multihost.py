"""Tests of multi-process runs (floranna_jax/distributed.py): two processes on localhost, each
with 2 fake CPU devices, train the smoke config through launch.py as one run
(``dist.mode=explicit``). The run is stopped after round 1 and restarted on both processes;
it ends where one process with 4 fake devices ends after 2 uninterrupted rounds, and only
process 0 writes the metrics rows."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from smoke_setup import REPO, XLA_CACHE, smoke_config

from floranna_jax import checkpoint, config_check, reporting, train


def _env(devices: int) -> dict[str, str]:
    # The persistent cache lets the restarted processes reuse the first ones' programs.
    return dict(
        os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=str(XLA_CACHE), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )  # fmt: skip


def _launch(workdir, rounds: int, devices: int, *overrides: str) -> subprocess.Popen:
    # No per-step bar: its host callback would keep the clients' program out of the cache.
    command = [
        sys.executable, "launch.py", "--config=configs/glue.py:smoke", f"--workdir={workdir}",
        f"--config.train.num_rounds={rounds}", "--config.train.step_progress=False", *overrides,
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=REPO, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _two_processes(workdir, rounds: int, *overrides: str) -> list[subprocess.Popen]:
    with socket.socket() as s:  # a free port for process 0's coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    dist = ["--config.dist.mode=explicit", f"--config.dist.coordinator_address=localhost:{port}",
            "--config.dist.num_processes=2", *overrides]  # fmt: skip
    return [_launch(workdir, rounds, 2, *dist, f"--config.dist.process_id={i}") for i in (0, 1)]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    """Each process's stdout, once all exit 0 (the others are killed if one fails)."""
    try:
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=400)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
        return outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _final_state(workdir):
    run = train.build(smoke_config())
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", 1, 2)
    state = ckpt.restore(run.state)
    ckpt.close()
    return state


def _summary(stdout: str) -> list[str]:
    """The summary table a process prints, without its wall times."""
    return [line for line in stdout.splitlines() if line.startswith("|") and "time" not in line]


@pytest.mark.slow
def test_two_processes_resumed_equal_one_process_on_four_devices(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _finish([_launch(one, 2, 4, "--config.train.shard_clients=True"), *_two_processes(two, 1)])
    assert [r["round"] for r in reporting.read_rows(two / reporting.METRICS_FILE)] == [1]
    outs = _finish(_two_processes(two, 2))  # both stopped after round 1, restarted to round 2

    a, b = _final_state(one), _final_state(two)
    assert int(a.round) == int(b.round) == 2
    assert jax.tree.structure(a) == jax.tree.structure(b)
    diff = max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    print(f"max abs diff, 2 processes x 2 devices (resumed) vs 1 x 4: {diff:.3g}")
    # The same clients and steps; the one-process server step runs on uploads sharded over
    # 4 devices, the two-process one on gathered uploads: float32 summation order only.
    assert diff < 1e-5
    rows = reporting.read_rows(two / reporting.METRICS_FILE)
    assert [r["round"] for r in rows] == [1, 2]  # one writer: no row twice
    ref = reporting.read_rows(one / reporting.METRICS_FILE)
    assert [r["train/examples"] for r in rows] == [r["train/examples"] for r in ref]
    np.testing.assert_allclose(
        [r["train/loss"] for r in rows], [r["train/loss"] for r in ref], rtol=1e-5
    )
    # Every process ends with the same global state, so prints the same table.
    assert _summary(outs[0]) == _summary(outs[1]) and len(_summary(outs[0])) > 5


def _max_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in pairs)  # fmt: skip


@pytest.mark.slow
def test_two_processes_with_a_split_base_equal_one_process(tmp_path):
    # The base split 2 ways over each process's 2 devices (2 x 2 mesh: clients x model),
    # clients over the processes, against one process splitting it over 2 of its 4 devices.
    one, two = tmp_path / "one", tmp_path / "two"
    split = "--config.train.model_shards=2"
    _finish([_launch(one, 1, 4, split), *_two_processes(two, 1, split)])
    a, b = _final_state(one), _final_state(two)
    assert int(a.round) == int(b.round) == 1
    diff = _max_diff(a, b)
    print(f"max abs diff, 2 processes x 2 devices vs 1 x 4, base split 2 ways: {diff:.3g}")
    assert diff < 1e-5
    rows, ref = (reporting.read_rows(w / reporting.METRICS_FILE) for w in (two, one))
    assert [r["round"] for r in rows] == [1]
    keys = [k for k in ref[0] if k.startswith(("eval/", "train/loss"))]
    assert keys  # the evaluation ran on the split base too, on every process
    np.testing.assert_allclose([rows[0][k] for k in keys], [ref[0][k] for k in keys], rtol=1e-5)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mode", "pod", r"config field dist\.mode: unknown value 'pod'; valid: off, auto"),
        ("coordinator_address", "localhost", r"dist\.coordinator_address: must be host:port"),
        ("process_id", 2, r"config field dist\.process_id: must be an integer in \[0, 1\]"),
    ],
)
def test_bad_dist_field_is_named(field, value, message):
    config = smoke_config(**{"dist.mode": "explicit", "dist.coordinator_address": "h:1",
                             "dist.num_processes": 2, f"dist.{field}": value})  # fmt: skip
    with pytest.raises(config_check.ConfigError, match=message):
        config_check.validate(config)
