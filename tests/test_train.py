"""Tests of the run loop (floranna_jax/train.py): the smoke config end to end, and one
round of every estimator with the method state it must keep."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from smoke_setup import shared_compilation, smoke_config

from floranna_jax import reporting, server, train


@pytest.fixture(autouse=True, scope="module")
def _shared_compilation():
    with shared_compilation():
        yield


ROW_KEYS = (
    "server/rho", "server/rho_rel", "server/rho_svd", "comm/bytes_up_total",
    "comm/bytes_down_total", "time/clients_s", "time/server_s", "time/eval_s",
    "eval/global/accuracy", "eval/local/accuracy", "eval/gap/accuracy",
)  # fmt: skip
ESTIMATORS = ("fedit", "ffa", "fedsa", "flora", "fedex", "svd", "floranna")


def test_smoke_config_runs_end_to_end(tmp_path):
    config = smoke_config(**{"server.name": "floranna"})
    summary = train.run(config, str(tmp_path))
    rows = reporting.read_rows(tmp_path / reporting.METRICS_FILE)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert np.isfinite(row["train/loss"])
        for key in ROW_KEYS:
            assert key in row, key
    assert rows[1]["comm/bytes_up_total"] > rows[0]["comm/bytes_up_total"] > 0
    for name in ("summary.md", "metric.png", "rho_rel.png", "config.json", "partition.png"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").iterdir())
    assert "global accuracy" in summary and summary in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["server"]["name"] == "floranna"


def test_every_estimator_is_listed():
    assert set(ESTIMATORS) <= set(server.ESTIMATORS)


@pytest.mark.parametrize(
    "name, extra", [(n, {}) for n in ESTIMATORS] + [("floranna", {"server.combine": "deltas"})]
)
def test_one_round_of_each_estimator(name, extra, tmp_path):
    config = smoke_config(**{"server.name": name, **extra})
    run = train.build(config, str(tmp_path))
    state, out = run.round_fn(run.state)
    assert int(state.round) == 1 and np.isfinite(out.metrics["train/loss"])
    assert np.isfinite(out.metrics["server/rho_rel"])
    ids = out.client_ids
    if name == "ffa":  # A never moves: frozen on clients and kept by the server
        for layer, f in state.lora.items():
            np.testing.assert_array_equal(f["A"], run.state.lora[layer]["A"])
    if name == "fedsa":  # one personal B per client: trained ones distinct, others untouched
        for B in state.personal_B.values():
            assert B.shape[0] == config.partition.num_clients
            trained = np.asarray(B[ids])
            assert all(np.abs(b).max() > 0 for b in trained)
            assert not np.array_equal(trained[0], trained[1])
            others = np.setdiff1d(np.arange(B.shape[0]), ids)
            np.testing.assert_array_equal(B[others], 0.0)
    else:
        assert state.personal_B == {}
    if name in ("flora", "fedex"):  # the frozen base moves by the merged deltas
        assert state.base_delta and all(
            float(jnp.abs(d).max()) > 0 for d in state.base_delta.values()
        )
        glob = run.evaluator.global_eval(
            train.rounds.make_effective_base(run.exp.model)(run.exp.model.base, state.base_delta),
            {"lora": state.lora, "head": state.head},
        )
        assert 0.0 <= glob["accuracy"] <= 1.0
    else:
        assert state.base_delta == {}
    head_moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.head, run.state.head)
    assert any(jax.tree.leaves(head_moved))


def test_compare_runs_other_estimators_on_the_same_uploads(tmp_path):
    labels = ("fedit", "svd", "floranna_layer", "floranna_model")
    config = smoke_config(**{"server.name": "fedit", "server.compare": labels})
    run = train.build(config, str(tmp_path))
    _, out = run.round_fn(run.state)
    m = {label: out.metrics[f"compare/{label}/rho_rel"] for label in labels}
    # The run's own estimator and its comparison see the same factors: the same number.
    np.testing.assert_allclose(m["fedit"], out.metrics["server/rho_rel"], rtol=1e-6)
    # The rank-r optimum bounds everything; FLoRA-NA starts at FedIT and keeps its best;
    # per-layer weights contain the shared ones. Float32 slack for each.
    assert m["svd"] <= min(m.values()) * (1 + 1e-5)
    assert m["floranna_model"] <= m["fedit"] * (1 + 1e-6)
    assert m["floranna_layer"] <= m["floranna_model"] * (1 + 1e-6)
