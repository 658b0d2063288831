"""Official GLUE metrics in numpy: accuracy, F1, Matthews correlation, Pearson, Spearman.

    metrics.compute("mrpc", predictions, labels)   # {"accuracy": ..., "f1": ...}
    metrics.main("cola")                           # "matthews_correlation"

Classification metrics are functions of the confusion matrix, so they merge across batches,
clients or hosts by adding confusion matrices (`confusion`, then `from_confusion`). Pearson
merges through `moments` (sums); Spearman needs the full prediction arrays (ranks are global).
One set of rows, such as a client's held-out rows, has sufficient statistics for every
metric (`stats`, then `from_stats`): its confusion counts, or for regression the centred
`pearson_terms` of its values and of their ranks within those rows (Spearman of those rows;
Spearman of several clients' rows pooled does not follow from them).
Degenerate cases follow scikit-learn: F1 and MCC are 0.0 when undefined; Pearson and Spearman
are NaN when either side is constant.
"""

import numpy as np

from floranna_jax.data import glue

METRICS = {
    "cola": ("matthews_correlation", "accuracy"),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "qqp": ("f1", "accuracy"),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
}


def main(task: str) -> str:
    """Name of the metric that ranks runs on `task` (a key of `compute`'s result)."""
    return glue.get_task(task).main_metric


def _class_ids(predictions: np.ndarray) -> np.ndarray:
    """Class ids [N] from ids [N] or logits [N, K] (argmax)."""
    predictions = np.asarray(predictions)
    if predictions.ndim == 2:
        return predictions.argmax(-1)
    return predictions.astype(np.int64)


def confusion(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Confusion counts int64 [K, K]: row = true label, column = predicted class.

    predictions: class ids [N] or logits [N, K]; labels: ids [N]. Sum these to merge.
    """
    pred, true = _class_ids(predictions), np.asarray(labels).astype(np.int64)
    if pred.shape != true.shape:
        raise ValueError(f"predictions {pred.shape} and labels {true.shape} differ in shape")
    for name, ids in (("predictions", pred), ("labels", true)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_labels):
            raise ValueError(f"{name} hold ids outside 0..{num_labels - 1}")
    flat = np.bincount(true * num_labels + pred, minlength=num_labels * num_labels)
    return flat.reshape(num_labels, num_labels)


def accuracy(cm: np.ndarray) -> float:
    """Fraction correct from confusion counts [K, K]."""
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 0.0


def f1(cm: np.ndarray, positive: int = 1) -> float:
    """Binary F1 of class `positive` from confusion counts [K, K]: 2 TP / (2 TP + FP + FN)."""
    tp = cm[positive, positive]
    denom = 2 * tp + (cm[:, positive].sum() - tp) + (cm[positive, :].sum() - tp)
    return float(2 * tp / denom) if denom else 0.0


def matthews_correlation(cm: np.ndarray) -> float:
    """Matthews correlation (multi-class R_K of Gorodkin 2004; the usual MCC for K = 2).

    MCC = (c s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)), c correct,
    s total, p_k predicted and t_k true counts of class k.
    """
    cm = cm.astype(np.float64)
    s, c = cm.sum(), np.trace(cm)
    p, t = cm.sum(0), cm.sum(1)
    denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - p @ t) / denom) if denom else 0.0


def moments(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Sufficient statistics of Pearson, float64 [6]: n, sum x, sum y, sum xx, sum yy, sum xy.

    Add them to merge; `pearson_from_moments` finishes. Exact enough for scores in [0, 5].
    """
    x = np.asarray(predictions, np.float64).reshape(-1)
    y = np.asarray(labels, np.float64).reshape(-1)
    return np.array([x.size, x.sum(), y.sum(), x @ x, y @ y, x @ y])


def pearson_from_moments(m: np.ndarray) -> float:
    """Pearson r from summed `moments` [6]."""
    n, sx, sy, sxx, syy, sxy = m
    cov = n * sxy - sx * sy
    var = (n * sxx - sx * sx) * (n * syy - sy * sy)
    return float(cov / np.sqrt(var)) if var > 0 else float("nan")


def pearson_terms(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """float64 [4] of two arrays [N]: n and the centred sums sum xx, sum yy, sum xy (x and y
    less their means, for accuracy): what `pearson_from_terms` needs."""
    x = np.asarray(x, np.float64).reshape(-1)
    y = np.asarray(y, np.float64).reshape(-1)
    if not x.size:
        return np.zeros(4)
    x, y = x - x.mean(), y - y.mean()
    return np.array([x.size, x @ x, y @ y, x @ y])


def pearson_from_terms(terms: np.ndarray) -> float:
    """Pearson r from `pearson_terms` [4]; NaN when either side is constant."""
    _, sxx, syy, sxy = terms
    denom = np.sqrt(sxx * syy)
    return float(sxy / denom) if denom > 0 else float("nan")


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two float arrays [N] (centred first, for accuracy)."""
    return pearson_from_terms(pearson_terms(x, y))


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..N of `x` [N], ties given their average rank (scipy.stats.rankdata 'average')."""
    x = np.asarray(x).reshape(-1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of the last member of each distinct value
    return (last - (counts - 1) / 2.0)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of [N] arrays: Pearson of the average ranks."""
    return pearson(rankdata(x), rankdata(y))


def stats(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The sufficient statistics of one set of rows (`compute`'s arguments) for `task`'s
    metrics: ``{"confusion": [K, K]}``, or for regression ``{"pearson": [4], "spearman":
    [4]}``, the `pearson_terms` of the values and of their ranks. `from_stats` finishes."""
    info = glue.get_task(task)
    if not info.is_regression:
        return {"confusion": confusion(predictions, labels, info.num_labels)}
    x = np.asarray(predictions, np.float64).reshape(-1)
    y = np.asarray(labels, np.float64).reshape(-1)
    return {"pearson": pearson_terms(x, y),
            "spearman": pearson_terms(rankdata(x), rankdata(y))}  # fmt: skip


def stats_rows(s: dict[str, np.ndarray]) -> int:
    """How many rows `stats` ``s`` were computed on."""
    return int(np.sum(s["confusion"])) if "confusion" in s else int(s["pearson"][0])


def from_stats(task: str, s: dict[str, np.ndarray]) -> dict[str, float]:
    """`compute`'s metrics of the rows whose `stats` are ``s``."""
    if "confusion" in s:
        return from_confusion(task, np.asarray(s["confusion"]))
    return {name: pearson_from_terms(np.asarray(s[name])) for name in ("pearson", "spearman")}


def from_confusion(task: str, cm: np.ndarray) -> dict[str, float]:
    """Metrics of a classification task from (merged) confusion counts [K, K]."""
    info = glue.get_task(task)
    if info.is_regression:
        raise ValueError(f"{info.name} is a regression task: use compute() on the full arrays")
    fns = {"accuracy": accuracy, "f1": f1, "matthews_correlation": matthews_correlation}
    return {name: fns[name](cm) for name in METRICS[info.name]}


def compute(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Official metrics of `task` on full arrays.

    predictions: class ids [N] or logits [N, K]; for stsb float scores [N] (or [N, 1]).
    labels: int ids [N]; for stsb float scores [N]. Returns {metric name: value}, e.g.
    {"f1": .., "accuracy": ..} for mrpc; `main(task)` names the one that ranks runs.
    """
    info = glue.get_task(task)
    if info.is_regression:
        x = np.asarray(predictions, np.float64).reshape(-1)
        y = np.asarray(labels, np.float64).reshape(-1)
        if x.shape != y.shape:
            raise ValueError(f"predictions {x.shape} and labels {y.shape} differ in shape")
        return {"pearson": pearson(x, y), "spearman": spearman(x, y)}
    return from_confusion(task, confusion(predictions, labels, info.num_labels))
