"""Evaluation of a run: the global model on the validation split, and each sampled
client's locally trained model on its own held-out split (METHOD.md: report both).

Both run a jitted forward over fixed-size padded batches, so each compiles once per run:
``global`` over ``[b_eval, ...]`` chunks of the validation split, ``local`` vmapped over the
``U`` sampled clients with ``[U, b_local, ...]`` chunks of their held-out rows (as many
chunks as the largest held-out split among the sampled clients needs; shorter ones are
padded). ``max_local_examples`` caps each client's held-out rows (the first ones of its
split, which the partition shuffled), so the local evaluation's cost does not grow with
the largest client. Scores come from ``data.metrics.compute`` on the real rows only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from floranna_jax.data import metrics as task_metrics

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class Evaluator(NamedTuple):
    """``global_eval(base, trainable) -> {metric: float}`` on the validation split;
    ``local_eval(base, trainable_U, client_ids) -> {metric: mean over clients}``."""

    global_eval: Any
    local_eval: Any


def _inputs(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: arrays[k] for k in INPUT_KEYS if k in arrays}


def _padded(arrays: dict[str, np.ndarray], rows: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """``arrays[rows]`` padded with row 0 to ``size`` rows."""
    take = np.zeros(size, np.int64)
    take[: len(rows)] = rows
    return {k: v[take] for k, v in arrays.items()}


def _predictions(logits: np.ndarray, is_regression: bool) -> np.ndarray:
    return logits[..., 0] if is_regression else logits.argmax(-1)


def make_evaluator(
    model,
    task: str,
    is_regression: bool,
    validation: dict[str, np.ndarray],
    train: dict[str, np.ndarray],
    holdout_index: list[np.ndarray],
    *,
    batch_size: int,
    clients_per_round: int,
    max_local_examples: int = 0,
) -> Evaluator:
    """Evaluators over ``validation`` (global) and ``train[holdout_index[u]]`` (local).

    ``batch_size``: rows per global forward; the local forward takes
    ``max(1, batch_size // clients_per_round)`` rows of each of the ``U`` clients at once.
    ``max_local_examples``: at most this many held-out rows per client (0: all).
    """
    predict = jax.jit(lambda base, trainable, batch: model.apply(base, trainable, batch))
    predict_U = jax.jit(jax.vmap(lambda base, t, batch: model.apply(base, t, batch),
                                 in_axes=(None, 0, 0)))  # fmt: skip
    val_inputs, val_labels = _inputs(validation), np.asarray(validation["label"])
    n_val = len(val_labels)
    local_rows = max(1, batch_size // clients_per_round)
    if max_local_examples:
        holdout_index = [h[:max_local_examples] for h in holdout_index]
    train_inputs, train_labels = _inputs(train), np.asarray(train["label"])

    def global_eval(base, trainable) -> dict[str, float]:
        logits = []
        for start in range(0, n_val, batch_size):
            rows = np.arange(start, min(start + batch_size, n_val))
            batch = _padded(val_inputs, rows, batch_size)
            logits.append(np.asarray(predict(base, trainable, batch))[: len(rows)])
        preds = _predictions(np.concatenate(logits).astype(np.float32), is_regression)
        return task_metrics.compute(task, preds, val_labels)

    def local_eval(base, trainable_U, client_ids) -> dict[str, float]:
        index = [holdout_index[int(u)] for u in client_ids]
        local_size = -(-max([len(h) for h in index] + [1]) // local_rows) * local_rows
        stacked = [_padded(train_inputs, rows, local_size) for rows in index]
        batches = {k: np.stack([s[k] for s in stacked]) for k in train_inputs}
        logits = []
        for start in range(0, local_size, local_rows):
            chunk = {k: v[:, start : start + local_rows] for k, v in batches.items()}
            logits.append(np.asarray(predict_U(base, trainable_U, chunk)))
        logits = np.concatenate(logits, axis=1).astype(np.float32)
        scores = [
            task_metrics.compute(
                task, _predictions(logits[u, : len(rows)], is_regression), train_labels[rows]
            )  # fmt: skip
            for u, rows in enumerate(index)
            if len(rows)
        ]
        if not scores:
            return {}
        return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}

    return Evaluator(global_eval, local_eval)
