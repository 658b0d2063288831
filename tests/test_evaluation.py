"""The classification task's evaluators (floranna_jax/tasks/classification.py) against a
plain per-example forward, with packed and with padded rows."""

import jax
import numpy as np
import pytest
from smoke_setup import shared_compilation, smoke_config

from floranna_jax import runners, train
from floranna_jax.data import glue, metrics
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


def _perturbed(trainable, n: int, seed: int):
    """``n`` copies of ``trainable`` with distinct heads, so a mix-up between clients shows."""
    trainable_U = runners.broadcast(trainable, n)
    head = trainable_U["head"]["classifier"]
    head["kernel"] = head["kernel"] + jax.random.normal(jax.random.key(seed), head["kernel"].shape)
    return trainable_U


@pytest.mark.parametrize("cap", [0, 5])
def test_local_eval_is_the_mean_of_per_client_scores(run, packed, cap):
    exp = run.exp
    ids = np.asarray([0, 1, 2])  # held-out sizes 1, 18 and 6: one, several and a partial chunk
    trainable_U = _perturbed(exp.model.trainable, len(ids), seed=0)
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


def _stats_alone(exp, make_evaluator, train_arrays, config, trainable_U, ids):
    """Each client's ``local_stats`` from an evaluator of its own (``make_evaluator``, the
    task's signature), as a Flower client computes them: its held-out rows of
    ``train_arrays`` alone, the run's packing rows, no validation split."""
    stats, cap = [], config.eval.max_local_examples
    for i, u in enumerate(ids):
        held = {k: v[exp.part.holdout[u]] for k, v in train_arrays.items()}
        alone = make_evaluator(exp.model, held, None, [np.arange(len(held["label"]))], config,
                               exp.rows._replace(validation=None))  # fmt: skip
        assert alone.global_eval is None
        one = jax.tree.map(lambda x, i=i: x[i : i + 1], trainable_U)
        (s,) = alone.local_stats(exp.model.base, one, np.arange(1))
        assert metrics.stats_rows(s) == len(exp.part.holdout[u][: cap or None])  # each row once
        stats.append(s)
    return stats


def test_clients_scored_alone_merge_into_the_in_process_local_metric(run, packed):
    """Federated evaluation: each client scores its own held-out rows in an evaluator of
    its own and sends confusion counts; ``combine`` of them is the in-process
    ``local_eval`` of all the clients at once."""
    exp = run.exp
    ids = np.asarray([0, 1, 2])
    trainable_U = _perturbed(exp.model.trainable, len(ids), seed=1)
    config = smoke_config(**{"eval.batch_size": 8, "train.clients_per_round": len(ids),
                              "data.packing": packed})  # fmt: skip
    ev = exp.task.make_evaluator(exp.model, exp.train, exp.validation, exp.part.holdout, config,
                                 exp.rows)  # fmt: skip
    want = ev.local_eval(exp.model.base, trainable_U, ids)
    got = ev.combine(_stats_alone(exp, exp.task.make_evaluator, exp.train, config, trainable_U,
                                  ids))  # fmt: skip
    assert set(got) == set(want) == {"accuracy"}
    # Accuracy is a ratio of counts: a row scored twice, missed, mixed up or predicted
    # otherwise (another batch shape turning a near-tie) changes it by 1/54 at least.
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)


def test_regression_clients_scored_alone_merge_into_the_in_process_local_metric(run, packed):
    """STS-B's evaluator (its labels: scores in [0, 5] on the synthetic rows; the score is the
    tiny model's first logit): each client's Pearson terms of its scores and of their ranks
    give the in-process local Pearson and Spearman, which equal the metrics computed on each
    client's rows directly."""
    exp, cap = run.exp, 7
    stsb = glue.get_task("stsb")
    scores = np.random.default_rng(0).uniform(0, 5, len(exp.train["label"])).astype(np.float32)
    arrays = exp.train | {"label": np.round(scores * 4) / 4}  # ties, as STS-B's own labels

    def make_evaluator(model, train_, validation, holdout, config, rows):
        return classification.evaluator(model, stsb, train_, validation, holdout, config, rows)

    # A client of one held-out row has no correlation (NaN, in process too): clients of more.
    ids = np.asarray([u for u, h in enumerate(exp.part.holdout) if len(h) > 2])
    assert len(ids) >= 2
    trainable_U = _perturbed(exp.model.trainable, len(ids), seed=2)
    config = smoke_config(**{"eval.batch_size": 8, "train.clients_per_round": len(ids),
                              "eval.max_local_examples": cap, "data.packing": packed})  # fmt: skip
    ev = make_evaluator(exp.model, arrays, None, exp.part.holdout, config, exp.rows)
    want = ev.local_eval(exp.model.base, trainable_U, ids)
    got = ev.combine(_stats_alone(exp, make_evaluator, arrays, config, trainable_U, ids))
    assert set(got) == set(want) == {"pearson", "spearman"}
    direct = []
    for i, u in enumerate(ids):
        rows = exp.part.holdout[u][:cap]
        batch = {k: arrays[k][rows] for k in classification.INPUT_KEYS if k in arrays}
        one = jax.tree.map(lambda x, i=i: x[i], trainable_U)
        predicted = np.asarray(exp.model.apply(exp.model.base, one, batch))[:, 0]
        direct.append(metrics.compute("stsb", predicted, arrays["label"][rows]))
    assert np.all(np.isfinite(list(want.values())))
    for k in want:
        # Alone, in process and direct, a client's rows meet in batches of other shapes
        # (float32 sums in another order): scores differ by ~1e-7, correlations of 7 rows
        # by ~1e-6.
        assert got[k] == pytest.approx(want[k], abs=1e-5)
        assert want[k] == pytest.approx(np.mean([d[k] for d in direct]), abs=1e-5)
