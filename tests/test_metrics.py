"""GLUE metrics against values worked out by hand (and scipy where it has the same function)."""

import numpy as np
import pytest

from floranna_jax.data import metrics

# preds/labels below: TP = 2, TN = 2, FP = 1, FN = 1.
PRED = np.array([1, 1, 0, 1, 0, 0])
TRUE = np.array([1, 0, 0, 1, 1, 0])


def test_accuracy_and_f1_by_hand():
    out = metrics.compute("mrpc", PRED, TRUE)
    assert out == pytest.approx({"f1": 4 / 6, "accuracy": 4 / 6})  # F1 = 2TP/(2TP+FP+FN)
    out = metrics.compute("qqp", np.array([0, 0, 0]), np.array([0, 1, 1]))
    assert out == pytest.approx({"f1": 0.0, "accuracy": 1 / 3})  # no predicted positive


def test_matthews_by_hand():
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(81) = 1/3
    out = metrics.compute("cola", PRED, TRUE)
    assert out["matthews_correlation"] == pytest.approx(1 / 3)
    assert metrics.compute("cola", TRUE, TRUE)["matthews_correlation"] == pytest.approx(1.0)
    assert metrics.compute("cola", 1 - TRUE, TRUE)["matthews_correlation"] == pytest.approx(-1.0)
    constant = metrics.compute("cola", np.ones(6, int), TRUE)["matthews_correlation"]
    assert constant == 0.0  # undefined: scikit-learn's convention


def test_matthews_equals_binary_formula_on_random_data():
    rng = np.random.default_rng(0)
    pred, true = rng.integers(0, 2, 1000), rng.integers(0, 2, 1000)
    tp, tn = np.sum((pred == 1) & (true == 1)), np.sum((pred == 0) & (true == 0))
    fp, fn = np.sum((pred == 1) & (true == 0)), np.sum((pred == 0) & (true == 1))
    want = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    cm = metrics.confusion(pred, true, 2)
    assert metrics.matthews_correlation(cm) == pytest.approx(want, rel=1e-12)


def test_pearson_and_spearman_with_ties_by_hand():
    # centred x = [-1, 0, 1], y = [-1, 1, 0]: cov 1, variances 2 and 2 -> r = 1/2
    assert metrics.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]: 4.5 / sqrt(4.5 * 5)
    assert metrics.rankdata([1, 2, 2, 3]).tolist() == [1, 2.5, 2.5, 4]
    assert metrics.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    out = metrics.compute("stsb", np.array([[1.0], [2.0], [2.0], [3.0]]), [1, 3, 2, 4])
    assert out["spearman"] == pytest.approx(4.5 / np.sqrt(22.5))
    assert np.isnan(metrics.compute("stsb", np.ones(4), [1, 3, 2, 4])["pearson"])


def test_against_scipy_with_many_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 6, 300) / 2.0, rng.normal(size=300).round(1)
    np.testing.assert_allclose(metrics.rankdata(x), stats.rankdata(x))
    out = metrics.compute("stsb", x, y)
    # float64 sums of 300 terms: agreement to ~1e-12 is expected.
    assert out["pearson"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert out["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_merging_chunks_equals_full_arrays():
    rng = np.random.default_rng(2)
    logits, labels = rng.normal(size=(100, 3)), rng.integers(0, 3, 100)
    full = metrics.compute("mnli_matched", logits, labels)
    assert full["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    cm = sum(
        metrics.confusion(logits[i : i + 30], labels[i : i + 30], 3) for i in range(0, 100, 30)
    )
    assert metrics.from_confusion("mnli", cm) == full
    x, y = rng.normal(size=100), rng.normal(size=100)
    merged = metrics.moments(x[:40], y[:40]) + metrics.moments(x[40:], y[40:])
    assert metrics.pearson_from_moments(merged) == pytest.approx(metrics.pearson(x, y), abs=1e-12)


@pytest.mark.parametrize("task", ["stsb", "cola", "mrpc"])
def test_sufficient_stats_of_a_set_of_rows_give_its_metrics(task):
    """What a client sends (``stats``) gives what it would compute on its rows, to the bit
    (the same arithmetic), ties, constant predictions (NaN) and no rows included."""
    rng = np.random.default_rng(3)
    regression = task == "stsb"
    y = np.round(rng.uniform(0, 5, 40) * 4) / 4 if regression else rng.integers(0, 2, 40)
    if regression:  # float32 scores, ties (rounded), a constant
        preds = [rng.normal(2.5, 1.0, 40).astype(np.float32),
                 np.round(y + rng.normal(0, 1, 40)), np.full(40, 2.5)]  # fmt: skip
    else:  # logits, and one class only
        preds = [rng.normal(size=(40, 2)), np.ones(40, int)]
    for p in preds:
        s = metrics.stats(task, p, y)
        assert metrics.stats_rows(s) == 40
        got, want = metrics.from_stats(task, s), metrics.compute(task, p, y)
        assert got.keys() == want.keys()
        np.testing.assert_array_equal(list(got.values()), list(want.values()))  # NaN == NaN
    none = metrics.stats(task, np.zeros(0), np.zeros(0, int))
    assert metrics.stats_rows(none) == 0


def test_main_metric_names_a_computed_key():
    assert metrics.main("cola") == "matthews_correlation"
    assert metrics.main("STS-B") == "pearson"
    assert metrics.main("mrpc") == "f1"
    for task in metrics.METRICS:
        assert metrics.main(task) in metrics.METRICS[task]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.compute("sst2", np.zeros(3, int), np.zeros(4, int))
    with pytest.raises(ValueError, match="outside 0..1"):
        metrics.compute("sst2", np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="valid tasks"):
        metrics.compute("squad", np.zeros(3), np.zeros(3))
