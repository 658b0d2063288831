"""The classification task's evaluators (floranna_jax/tasks/classification.py) against a
plain per-example forward."""

import jax
import numpy as np
import pytest
from smoke_setup import shared_compilation, smoke_config

from floranna_jax import clients, train
from floranna_jax.data import metrics
from floranna_jax.tasks import classification


@pytest.fixture(scope="module", params=[16, 48], ids=["one_bucket", "three_buckets"])
def run(request):
    # Synthetic rows hold L/2 to L tokens: at L = 48 the evaluator cuts batches to 32 or 48.
    with shared_compilation():
        yield train.build(smoke_config(**{"data.max_length": request.param}))


def _direct_accuracy(model, base, trainable, arrays, rows):
    batch = {k: arrays[k][rows] for k in classification.INPUT_KEYS if k in arrays}
    preds = np.asarray(model.apply(base, trainable, batch)).argmax(-1)
    return metrics.compute("sst2", preds, arrays["label"][rows])["accuracy"]


@pytest.mark.parametrize("cap", [0, 5])
def test_local_eval_is_the_mean_of_per_client_scores(run, cap):
    exp = run.exp
    ids = np.asarray([0, 1, 2])  # held-out sizes 1, 18 and 6: one, several and a partial chunk
    # Distinct models per client, so a mix-up between clients would show.
    trainable_U = clients.broadcast(exp.model.trainable, len(ids))
    head = trainable_U["head"]["classifier"]
    head["kernel"] = head["kernel"] + jax.random.normal(jax.random.key(0), head["kernel"].shape)
    config = smoke_config(**{"eval.batch_size": 8, "train.clients_per_round": len(ids),
                              "eval.max_local_examples": cap,
                              "data.max_length": exp.train["input_ids"].shape[1]})  # fmt: skip
    ev = exp.task.make_evaluator(exp.model, exp.train, exp.validation, exp.part.holdout, config)
    got = ev.local_eval(exp.model.base, trainable_U, ids)["accuracy"]
    want = []
    for i, u in enumerate(ids):
        rows = exp.part.holdout[u][:cap] if cap else exp.part.holdout[u]
        one = jax.tree.map(lambda x, i=i: x[i], trainable_U)
        want.append(_direct_accuracy(exp.model, exp.model.base, one, exp.train, rows))
    # Accuracy is a ratio of counts: any row scored twice, missed or mixed up changes it.
    assert got == pytest.approx(float(np.mean(want)), abs=1e-12)


def test_global_eval_covers_every_validation_row(run):
    exp = run.exp
    config = smoke_config(**{"eval.batch_size": 7, "train.clients_per_round": 3,
                              "data.max_length": exp.validation["input_ids"].shape[1]})  # fmt: skip
    ev = exp.task.make_evaluator(exp.model, exp.train, exp.validation, exp.part.holdout, config)
    got = ev.global_eval(exp.model.base, exp.model.trainable)["accuracy"]
    rows = np.arange(len(exp.validation["label"]))
    want = _direct_accuracy(exp.model, exp.model.base, exp.model.trainable, exp.validation, rows)
    assert got == pytest.approx(want, abs=1e-12)


def test_cut_rows_give_the_logits_of_full_rows(run):
    """A row's logits do not depend on the padding after it: the bucketed forward equals
    the fully padded one."""
    exp = run.exp
    arrays = {k: exp.validation[k] for k in classification.INPUT_KEYS}
    need = classification.token_lengths(arrays)
    full = arrays["input_ids"].shape[1]
    assert need.min() < full  # some padding to cut
    L = classification.bucket(int(need[:8].max()), full)
    assert L >= need[:8].max()
    whole = exp.model.apply(
        exp.model.base, exp.model.trainable, {k: v[:8] for k, v in arrays.items()}
    )
    cut = exp.model.apply(exp.model.base, exp.model.trainable,
                          {k: v[:8, :L] for k, v in arrays.items()})  # fmt: skip
    # Masked keys get exactly zero attention weight; only the matmul shapes differ.
    np.testing.assert_allclose(np.asarray(cut), np.asarray(whole), rtol=1e-5, atol=1e-5)


def test_token_lengths_and_buckets():
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(classification.token_lengths({"attention_mask": mask}), [2, 4, 1])
    assert [classification.bucket(n, 40) for n in (1, 16, 17, 33, 40)] == [16, 16, 32, 40, 40]
