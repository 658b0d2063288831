"""Methods and tasks are plug-ins: the round and the run loop name neither, and a new
stateful method is one factory and one dict entry."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest
from smoke_setup import REPO, shared_compilation, smoke_config

from floranna_jax import experiment, keys, server, tasks, train
from floranna_jax.errors import ConfigError
from floranna_jax.server import common, fedit
from floranna_jax.server.method import make_method


@pytest.mark.parametrize("module", ["rounds.py", "train.py"])
def test_round_and_loop_name_no_method_and_no_task(module):
    text = (REPO / "floranna_jax" / module).read_text()
    names = [*server.ESTIMATORS, *tasks.names(), "glue", "synthetic"]
    found = [n for n in names if re.search(rf"\b{re.escape(n)}\b", text, re.IGNORECASE)]
    assert found == [], f"{module} names {found}"


def test_the_check_sees_a_method_name(tmp_path):  # the check above can fail
    text = pathlib.Path(REPO / "floranna_jax" / "server" / "fedsa.py").read_text()
    assert re.search(r"\bfedsa\b", text, re.IGNORECASE)


def _counting_method():
    """A stateful method in a few lines: FedIT's average, plus a per-client count of the
    rounds each client took part in."""

    def init(lora, num_clients):
        return {"rounds": jnp.zeros((num_clients,), jnp.int32)}

    def apply(state, aggregate: common.Aggregate, client_ids, uploads):
        return aggregate.lora, {"rounds": state["rounds"].at[client_ids].add(1)}

    return make_method(fedit.average, common.fedit_bytes, init=init, apply=apply)


def test_a_new_stateful_method_is_one_dict_entry(monkeypatch):
    monkeypatch.setitem(server.ESTIMATORS, "counting", _counting_method)
    with shared_compilation():
        run = train.build(smoke_config(**{"server.name": "counting"}))
        state, out1 = run.round_fn(run.state)
        state, out2 = run.round_fn(state)
    want = np.zeros(4, np.int32)
    for ids in (out1.client_ids, out2.client_ids):
        want[ids] += 1
    np.testing.assert_array_equal(state.method["rounds"], want)
    assert np.isfinite(out2.metrics["server/rho_rel"])


def test_a_task_without_labels_splits_iid_and_refuses_label_schemes(monkeypatch):
    """Generation tasks have no labels: iid and quantity split them; dirichlet is an error."""
    task = tasks.get("sst2")

    def load(config):
        train, validation = task.load(config)
        return {k: v for k, v in train.items() if k != "label"}, validation

    monkeypatch.setattr(tasks, "get", lambda name: task._replace(load=load))
    config = smoke_config(**{"partition.scheme": "iid"})
    exp = experiment.build(config, keys.model_key(0))
    assert "label" not in exp.train
    sizes = [len(t) + len(h) for t, h in zip(exp.part.train, exp.part.holdout, strict=True)]
    assert sum(sizes) == len(exp.train["input_ids"]) and max(sizes) - min(sizes) <= 1
    with pytest.raises(ConfigError, match=r"partition.scheme: 'dirichlet' splits by label"):
        experiment.build(smoke_config(**{"partition.scheme": "dirichlet"}), keys.model_key(0))
