"""Tests of round checkpoints (floranna_jax/checkpoint.py): save then restore is bit-exact,
and a run stopped after round 2 and resumed in a fresh call ends exactly where an
uninterrupted 4-round run ends (parameters, method state and metrics rows)."""

import errno
import os
import pathlib

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from smoke_setup import shared_compilation, smoke_config

from floranna_jax import checkpoint, config_check, errors, reporting, rounds, server, train


@pytest.fixture(autouse=True, scope="module")
def _shared_compilation():
    with shared_compilation():
        yield


def _assert_states_equal(a: rounds.RoundState, b: rounds.RoundState) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit-exact, no tolerance


def test_save_restore_is_bit_exact(tmp_path):
    key = jax.random.key(1)
    trainable = {
        "lora": {"l0": {"A": jax.random.normal(key, (2, 5)), "B": jax.random.normal(key, (3, 2))}},
        "head": {"kernel": jax.random.uniform(key, (5, 2))},
    }
    opt = optax.adamw(1e-2)
    state = rounds.init_state(7, trainable, server.make("fedsa"), 4, opt=opt)
    state = state._replace(round=np.asarray(3, np.int64), bytes_up=np.asarray(2**40 + 1, np.int64))
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", every_rounds=3, keep=2)
    assert ckpt.restore(state) is None
    assert ckpt.save(state)
    fresh = rounds.init_state(0, jax.tree.map(np.zeros_like, trainable), server.make("fedsa"),
                              4, opt=opt)  # fmt: skip
    restored = ckpt.restore(fresh)
    assert isinstance(restored, rounds.RoundState) and ckpt.latest_round() == 3
    _assert_states_equal(restored, state)
    assert int(restored.bytes_up) == 2**40 + 1
    ckpt.close()


def _rows(workdir):
    return [
        {k: v for k, v in r.items() if not k.startswith("time/")}
        for r in reporting.read_rows(workdir / reporting.METRICS_FILE)
    ]


def _final_state(config, workdir):
    run = train.build(config)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", 1, 2)
    state = ckpt.restore(run.state)
    ckpt.close()
    return state


# FedSA with persistent optimizer states exercises every part of the round state; FedIT
# under DP-FedAvg (server.dp) a wrapped method whose noise key lives in the method state;
# FedEx a base merged in place round after round (merged_base), evaluated every round.
RESUMED = {
    "fedex": {"server.name": "fedex", "eval.every_rounds": 1},
    "fedsa": {"server.name": "fedsa", "client.persistent_opt_state": True},
    "fedit_dp": {"server.name": "fedit", "privacy.clip_norm": 0.5, "privacy.noise_multiplier": 1.0},
}


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_resumed_run_equals_uninterrupted_run(tmp_path, name):
    fields = {**RESUMED[name], "ckpt.every_rounds": 2}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.run(smoke_config(**fields, **{"train.num_rounds": 4}), str(straight))
    train.run(smoke_config(**fields, **{"train.num_rounds": 2}), str(resumed))
    assert [r["round"] for r in _rows(resumed)] == [1, 2]
    train.run(smoke_config(**fields, **{"train.num_rounds": 4}), str(resumed))  # fresh call

    config = smoke_config(**fields, **{"train.num_rounds": 4})
    a, b = _final_state(config, straight), _final_state(config, resumed)
    assert int(a.round) == int(b.round) == 4
    _assert_states_equal(a, b)
    assert _rows(straight) == _rows(resumed)
    assert [r["round"] for r in _rows(resumed)] == [1, 2, 3, 4]
    if name == "fedit_dp":  # the noise really ran, and epsilon grows with the rounds
        eps = [r["privacy/epsilon"] for r in _rows(resumed)]
        assert all(r["server/dp_noise_std"] == pytest.approx(0.5 / 3) for r in _rows(resumed))
        assert eps == sorted(eps) and eps[0] < eps[-1]


def test_resume_refuses_another_experiment(tmp_path):
    train.run(smoke_config(**{"train.num_rounds": 1, "server.name": "fedit"}), str(tmp_path))
    other = smoke_config(**{"train.num_rounds": 2, "server.name": "fedsa"})
    with pytest.raises(config_check.ConfigError, match=r"server\.name"):
        train.run(other, str(tmp_path))


def _snapshot(folder):
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(folder)
        for f in files
    }


def test_failed_resume_leaves_the_workdir_as_it_was(tmp_path):
    fields = {"server.name": "fedit", "ckpt.every_rounds": 1}
    train.run(smoke_config(**fields, **{"train.num_rounds": 1}), str(tmp_path))
    # Damage the checkpoint's array data: the config matches, the restore itself fails.
    for d, _, files in os.walk(tmp_path / "checkpoints" / "1" / "default"):
        for f in files:
            if f != "commit_success.txt":
                pathlib.Path(d, f).write_bytes(b"torn")
    before = _snapshot(tmp_path)
    with pytest.raises(config_check.ConfigError, match=r"checkpoints: cannot resume from round 1"):
        train.run(smoke_config(**fields, **{"train.num_rounds": 3}), str(tmp_path))
    assert _snapshot(tmp_path) == before  # config.json included: the right command still works


def test_nonfinite_aggregate_stops_before_its_checkpoint(tmp_path, monkeypatch):
    serve = server.serve

    def poisoned(method):  # round 2's global B of one layer turns NaN
        real = serve(method)
        calls = []

        def aggregate(uploads, weights, state=None):
            agg = real.aggregate(uploads, weights, state)
            calls.append(1)
            if len(calls) == 2:
                layer = sorted(agg.lora)[1]
                agg.lora[layer]["B"] = agg.lora[layer]["B"].at[0, 0].set(float("nan"))
            return agg

        return server.Server(real.method, aggregate)

    monkeypatch.setattr(server, "serve", poisoned)
    config = smoke_config(**{"server.name": "fedit", "ckpt.every_rounds": 1,
                             "train.num_rounds": 3})  # fmt: skip
    with pytest.raises(errors.RoundError, match=r"round 2: .*global adapter.*layer_0/attention/"):
        train.run(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    assert [r["round"] for r in reporting.read_rows(tmp_path / reporting.METRICS_FILE)] == [1]


def test_resume_without_config_json_refuses(tmp_path):
    train.run(smoke_config(**{"train.num_rounds": 1}), str(tmp_path))
    os.remove(tmp_path / "config.json")  # the only record of which run the checkpoint holds
    before = _snapshot(tmp_path)
    other = smoke_config(**{"train.num_rounds": 2, "client.learning_rate": 0.5})
    with pytest.raises(config_check.ConfigError, match=r"config\.json: missing.*put config"):
        train.run(other, str(tmp_path))
    assert _snapshot(tmp_path) == before


def _enospc(path=None):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def _full_disk_at(monkeypatch, moment: str) -> None:
    """The disk fills at ``moment``: the write of config.json, the metrics row of round 2,
    or the checkpoint of round 2 (Orbax reports it as a ValueError)."""
    if moment == "checkpoint":
        save = ocp.CheckpointManager.save

        def failing_save(self, step, *args, **kwargs):
            if step == 2:
                raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left")
            return save(self, step, *args, **kwargs)

        monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
        return
    name, mode = ("config.json", "w") if moment == "config" else ("metrics.jsonl", "a")
    real_open, calls = open, []

    def failing_open(file, *args, **kwargs):  # config.json, or where it is written first
        base = os.path.basename(str(file))
        if base in (name, name + ".tmp") and (args or [kwargs.get("mode")])[0] == mode:
            calls.append(file)
            if len(calls) == (1 if moment == "config" else 2):
                raise _enospc(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)


FULL_DISK_FIELDS = {"server.name": "fedit", "ckpt.every_rounds": 1}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The workdir of the smoke run that never met a full disk."""
    workdir = tmp_path_factory.mktemp("straight")
    train.run(smoke_config(**FULL_DISK_FIELDS), str(workdir))
    return workdir


@pytest.mark.parametrize("moment", ["config", "metrics_row", "checkpoint"])
def test_a_full_disk_is_one_error_and_the_run_resumes(tmp_path, monkeypatch, moment, straight):
    config = smoke_config(**FULL_DISK_FIELDS)
    workdir = tmp_path / "full"
    with monkeypatch.context() as m:
        _full_disk_at(m, moment)
        with pytest.raises(errors.WriteError, match="cannot write .*run the same command again"):
            train.run(config, str(workdir))
    assert not (workdir / ".lock").exists()
    train.run(config, str(workdir))  # the disk has room again
    assert _rows(workdir) == _rows(straight)
    _assert_states_equal(_final_state(config, workdir), _final_state(config, straight))
