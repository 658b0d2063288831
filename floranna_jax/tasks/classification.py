"""Classification and regression on fixed-length token rows: GLUE, and synthetic tokens.

Data (``load``): ``data.source="glue"`` reads a GLUE task from the hub or a local folder in
the GLUE layout (``data.dir``) and tokenizes it with the model's tokenizer;
``"synthetic"`` draws learnable random tokens (:mod:`floranna_jax.data.synthetic`). Rows:
``{"input_ids", "attention_mask", "token_type_ids": int32 [N, L], "label": [N]}``.

Loss: the mean cross-entropy (squared error for regression) over the real rows of a
batch. Evaluation: a jitted forward over fixed-size padded batches, so each compiles once
per run: global over ``[b_eval, ...]`` chunks of the validation split, local vmapped over
the ``U`` sampled clients with ``[U, b_local, ...]`` chunks of their held-out rows (as
many chunks as the largest held-out split among the sampled clients needs).
``eval.max_local_examples`` caps each client's held-out rows (the first ones of its split,
which the partition shuffled). Scores: the official GLUE metrics
(:mod:`floranna_jax.data.metrics`) on the real rows only.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from floranna_jax.data import glue, synthetic
from floranna_jax.data import metrics as task_metrics
from floranna_jax.errors import ConfigError
from floranna_jax.tasks.task import Arrays, Evaluator, Task

NAMES = tuple(glue.TASKS)
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
OFFLINE_HINT = (
    "offline? point at local files: --config.model.path=<folder from "
    "shared/tools/fetch_models.sh> --config.data.dir=<GLUE folder with SST-2/train.tsv ...>"
)


def knows(name: str) -> bool:
    try:
        glue.get_task(name)
    except ValueError:
        return False
    return True


def make(name: str) -> Task:
    """The task ``name`` (a GLUE task; aliases such as "SST-2" or "mnli" accepted)."""
    info = glue.get_task(name)

    def load(config) -> tuple[Arrays, Arrays]:
        return load_data(config, info)

    def make_loss(model):
        return loss_fn(model, info.is_regression)

    def make_evaluator(model, train, validation, holdout_index, config) -> Evaluator:
        return evaluator(model, info, train, validation, holdout_index, config)

    return Task(info.name, info.main_metric, info.num_labels, load, make_loss, make_evaluator)


# ----------------------------------------------------------------------------- data


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_data(config, info: glue.TaskInfo) -> tuple[Arrays, Arrays]:
    """(train, validation) arrays: a GLUE task tokenized by the model's tokenizer, or
    synthetic tokens (validation drawn with seed + 1)."""
    c = config.data
    if c.source == "synthetic":
        kw = dict(seq_len=c.max_length, vocab_size=c.vocab_size, num_labels=max(info.num_labels, 2))
        train = synthetic.make(c.num_train_examples, seed=config.train.seed, **kw)
        val = synthetic.make(c.num_eval_examples, seed=config.train.seed + 1, **kw)
        return train, val
    try:
        tokenizer = glue.load_tokenizer(os.path.expanduser(config.model.path))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"config field model.path: cannot load a tokenizer from {config.model.path!r}: "
            f"{_first_line(e)}; {OFFLINE_HINT}"
        ) from e
    data_dir = os.path.expanduser(c.dir) if c.dir else None
    try:
        splits = glue.load(info.name, tokenizer=tokenizer, data_dir=data_dir,
                           max_length=c.max_length)  # fmt: skip
    except ValueError as e:  # a malformed file: the message names the file and the line
        raise ConfigError(_first_line(e)) from e
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"config field data.dir: {_first_line(e)}; {OFFLINE_HINT}") from e
    return splits["train"], splits["validation"]


# ----------------------------------------------------------------------------- loss


def loss_fn(model, is_regression: bool):
    """``loss_fn(base, trainable, batch, dropout_key)``: mean cross-entropy (MSE for
    regression) over the real examples of ``batch`` (``batch["mask"]: [b]``)."""

    def loss(base, trainable, batch, dropout_key):
        logits = model.apply(base, trainable, batch, deterministic=False, dropout_key=dropout_key)
        logits = logits.astype(jnp.float32)
        if is_regression:
            per_example = (logits[:, 0] - batch["label"].astype(jnp.float32)) ** 2
        else:
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        mask = batch["mask"].astype(jnp.float32)
        return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return loss


# ----------------------------------------------------------------------------- evaluation


def _inputs(arrays: Arrays) -> Arrays:
    return {k: arrays[k] for k in INPUT_KEYS if k in arrays}


def _padded(arrays: Arrays, rows: np.ndarray, size: int) -> Arrays:
    """``arrays[rows]`` padded with row 0 to ``size`` rows."""
    take = np.zeros(size, np.int64)
    take[: len(rows)] = rows
    return {k: v[take] for k, v in arrays.items()}


def _predictions(logits: np.ndarray, is_regression: bool) -> np.ndarray:
    return logits[..., 0] if is_regression else logits.argmax(-1)


def evaluator(model, info: glue.TaskInfo, train: Arrays, validation: Arrays,
              holdout_index: list[np.ndarray], config) -> Evaluator:  # fmt: skip
    """Evaluators over ``validation`` (global) and ``train[holdout_index[u]]`` (local).

    ``eval.batch_size``: rows per global forward; the local forward takes
    ``max(1, batch_size // clients_per_round)`` rows of each of the ``U`` clients at once.
    ``eval.max_local_examples``: at most this many held-out rows per client (0: all).
    """
    batch_size, cap = config.eval.batch_size, config.eval.max_local_examples
    predict = jax.jit(lambda base, trainable, batch: model.apply(base, trainable, batch))
    predict_U = jax.jit(jax.vmap(lambda base, t, batch: model.apply(base, t, batch),
                                 in_axes=(None, 0, 0)))  # fmt: skip
    val_inputs, val_labels = _inputs(validation), np.asarray(validation["label"])
    n_val = len(val_labels)
    local_rows = max(1, batch_size // config.train.clients_per_round)
    if cap:
        holdout_index = [h[:cap] for h in holdout_index]
    train_inputs, train_labels = _inputs(train), np.asarray(train["label"])

    def global_eval(base, trainable) -> dict[str, float]:
        logits = []
        for start in range(0, n_val, batch_size):
            rows = np.arange(start, min(start + batch_size, n_val))
            batch = _padded(val_inputs, rows, batch_size)
            logits.append(np.asarray(predict(base, trainable, batch))[: len(rows)])
        preds = _predictions(np.concatenate(logits).astype(np.float32), info.is_regression)
        return task_metrics.compute(info.name, preds, val_labels)

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
            task_metrics.compute(info.name, _predictions(logits[u, : len(rows)],
                                                         info.is_regression), train_labels[rows])
            for u, rows in enumerate(index)
            if len(rows)
        ]  # fmt: skip
        if not scores:
            return {}
        return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}

    return Evaluator(global_eval, local_eval)
