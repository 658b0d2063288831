"""The classification task's evaluators (floranna_jax/tasks/classification.py) against a
plain per-example forward, with packed and with padded rows."""

import jax
import numpy as np
import pytest
from smoke_setup import shared_compilation, smoke_config

from floranna_jax import clients, train
from floranna_jax.data import metrics
from floranna_jax.tasks import classification


@pytest.fixture(scope="module", params=[True, False], ids=["packed", "padded"])
def packed(request):
    return request.param


@pytest.fixture(scope="module")
def run(packed):
    # Synthetic rows hold L/2 to L tokens: packed, two or three share a row of 48.
    with shared_compilation():
        yield train.build(smoke_config(**{"data.max_length": 48, "data.packing": packed}))


def _direct_accuracy(model, base, trainable, arrays, rows):
    batch = {k: arrays[k][rows] for k in classification.INPUT_KEYS if k in arrays}
    preds = np.asarray(model.apply(base, trainable, batch)).argmax(-1)
    return metrics.compute("sst2", preds, arrays["label"][rows])["accuracy"]


@pytest.mark.parametrize("cap", [0, 5])
def test_local_eval_is_the_mean_of_per_client_scores(run, packed, cap):
    exp = run.exp
    ids = np.asarray([0, 1, 2])  # held-out sizes 1, 18 and 6: one, several and a partial chunk
    # Distinct models per client, so a mix-up between clients would show.
    trainable_U = clients.broadcast(exp.model.trainable, len(ids))
    head = trainable_U["head"]["classifier"]
    head["kernel"] = head["kernel"] + jax.random.normal(jax.random.key(0), head["kernel"].shape)
    config = smoke_config(**{"eval.batch_size": 8, "train.clients_per_round": len(ids),
                              "eval.max_local_examples": cap, "data.packing": packed})  # fmt: skip
    ev = exp.task.make_evaluator(exp.model, exp.train, exp.validation, exp.part.holdout, config)
    got = ev.local_eval(exp.model.base, trainable_U, ids)["accuracy"]
    want = []
    for i, u in enumerate(ids):
        rows = exp.part.holdout[u][:cap] if cap else exp.part.holdout[u]
        one = jax.tree.map(lambda x, i=i: x[i], trainable_U)
        want.append(_direct_accuracy(exp.model, exp.model.base, one, exp.train, rows))
    # Accuracy is a ratio of counts: any row scored twice, missed or mixed up changes it.
    assert got == pytest.approx(float(np.mean(want)), abs=1e-12)


def test_global_eval_covers_every_validation_row(run, packed):
    exp = run.exp
    config = smoke_config(**{"eval.batch_size": 7, "train.clients_per_round": 3,
                              "data.packing": packed})  # fmt: skip
    ev = exp.task.make_evaluator(exp.model, exp.train, exp.validation, exp.part.holdout, config)
    got = ev.global_eval(exp.model.base, exp.model.trainable)["accuracy"]
    rows = np.arange(len(exp.validation["label"]))
    want = _direct_accuracy(exp.model, exp.model.base, exp.model.trainable, exp.validation, rows)
    assert got == pytest.approx(want, abs=1e-12)


def test_clients_scored_alone_merge_into_the_in_process_local_metric(run, packed):
    """Federated evaluation: each client scores its own held-out rows in an evaluator of
    its own (as a Flower client does: its rows alone, the run's packing rows, no
    validation split) and sends confusion counts; ``combine`` of them is the in-process
    ``local_eval`` of all the clients at once."""
    exp = run.exp
    ids = np.asarray([0, 1, 2])
    trainable_U = clients.broadcast(exp.model.trainable, len(ids))
    head = trainable_U["head"]["classifier"]
    head["kernel"] = head["kernel"] + jax.random.normal(jax.random.key(1), head["kernel"].shape)
    config = smoke_config(**{"eval.batch_size": 8, "train.clients_per_round": len(ids),
                              "data.packing": packed})  # fmt: skip
    ev = exp.task.make_evaluator(exp.model, exp.train, exp.validation, exp.part.holdout, config,
                                 exp.rows)  # fmt: skip
    want = ev.local_eval(exp.model.base, trainable_U, ids)
    stats = []
    for i, u in enumerate(ids):
        held = {k: v[exp.part.holdout[u]] for k, v in exp.train.items()}
        alone = exp.task.make_evaluator(exp.model, held, None, [np.arange(len(held["label"]))],
                                        config, exp.rows._replace(validation=None))  # fmt: skip
        assert alone.global_eval is None
        one = jax.tree.map(lambda x, i=i: x[i : i + 1], trainable_U)
        (s,) = alone.local_stats(exp.model.base, one, np.arange(1))
        assert int(s["confusion"].sum()) == len(exp.part.holdout[u])  # every row, once
        stats.append(s)
    got = ev.combine(stats)
    assert set(got) == set(want) == {"accuracy"}
    # Accuracy is a ratio of counts: a row scored twice, missed, mixed up or predicted
    # otherwise (another batch shape turning a near-tie) changes it by 1/54 at least.
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
