"""Classification and regression on fixed-length token rows: GLUE, and synthetic tokens.

Data (``load``): ``data.source="glue"`` reads a GLUE task from the hub or a local folder in
the GLUE layout (``data.dir``) and tokenizes it with the model's tokenizer;
``"synthetic"`` draws learnable random tokens (:mod:`floranna_jax.data.synthetic`). Rows:
``{"input_ids", "attention_mask", "token_type_ids": int32 [N, L], "label": [N]}``.

Loss: the mean cross-entropy (squared error for regression) over the real rows of a
batch, padded or packed alike (the model reads one logit row per example). Evaluation: a
jitted forward, global over batches of ``eval.batch_size`` validation rows, local vmapped
over the ``U`` sampled clients with chunks of their held-out rows (as many chunks as the
largest held-out split among the sampled clients needs); the rows of a forward are packed
like training batches when ``data.packing`` (:mod:`floranna_jax.packing`), with the run's
row lengths. Federated: a client's sufficient statistics are its confusion counts, or for
regression the centred sums of Pearson of its values and of their ranks (its Spearman).
``eval.max_local_examples`` caps each client's held-out rows (the first ones of its split,
which the partition shuffled). Scores: the official GLUE metrics
(:mod:`floranna_jax.data.metrics`) on the real rows only.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from floranna_jax import packing
from floranna_jax.data import glue, synthetic
from floranna_jax.data import metrics as task_metrics
from floranna_jax.errors import BadValue, ConfigError, first_line
from floranna_jax.tasks.task import Arrays, Evaluator, Program, Task

NAMES = tuple(glue.TASKS)
SOURCES = ("glue", "synthetic")
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

    def make_evaluator(model, train, validation, holdout_index, config, rows=None) -> Evaluator:
        return evaluator(model, info, train, validation, holdout_index, config, rows)

    return Task(info.name, info.main_metric, info.num_labels, load, make_loss, make_evaluator,
                functools.partial(check, info))  # fmt: skip


def check(info: glue.TaskInfo, config) -> None:
    """Raise ``BadValue`` (param: ``section.field``) for a bad data field of the task."""
    c = config.data
    if c.source not in SOURCES:
        raise BadValue("data.source", f"unknown value {c.source!r}; valid: {', '.join(SOURCES)}")
    if c.source == "synthetic" and info.num_labels < 2:
        raise BadValue("data.task", f"{info.name!r} is a regression task; synthetic data is "
                       "classification")  # fmt: skip
    for field, low in (("max_length", 1), ("num_train_examples", 1), ("num_eval_examples", 1),
                       ("vocab_size", 8)):  # fmt: skip
        value = c[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            kind = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise BadValue(f"data.{field}", f"must be {kind}, got {value!r}")
    if c.dir and not os.path.isdir(os.path.expanduser(c.dir)):
        raise BadValue("data.dir", f"no such folder {c.dir!r} (the GLUE folder: SST-2/train.tsv)")
    if c.source == "glue" and config.model.source != "pretrained":
        raise BadValue("data.source", "'glue' needs a tokenizer: use model.source='pretrained' "
                       "with model.path")  # fmt: skip


# ----------------------------------------------------------------------------- data


def _first_line(e: BaseException) -> str:
    return first_line(e) or type(e).__name__


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
    """``loss_fn(base, trainable, batch, dropout_key) -> (loss, examples)``: mean
    cross-entropy (MSE for regression) over the real examples of ``batch``
    (``batch["mask"]: [b]``) and their number."""

    def loss(base, trainable, batch, dropout_key):
        logits = model.apply(base, trainable, batch, deterministic=False, dropout_key=dropout_key)
        logits = logits.astype(jnp.float32)
        if is_regression:
            per_example = (logits[:, 0] - batch["label"].astype(jnp.float32)) ** 2
        else:
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        mask = batch["mask"].astype(jnp.float32)
        examples = jnp.sum(mask)
        return jnp.sum(per_example * mask) / jnp.maximum(examples, 1.0), examples

    return loss


# ----------------------------------------------------------------------------- evaluation


def _inputs(arrays: Arrays) -> Arrays:
    return {k: arrays[k] for k in INPUT_KEYS if k in arrays}


def _predictions(logits: np.ndarray, is_regression: bool) -> np.ndarray:
    return logits[..., 0] if is_regression else logits.argmax(-1)


def _chunks(rows: list[np.ndarray], size: int,
            lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``take [len(rows), n, size]`` and ``real``: each list of rows dealt into ``n`` chunks
    of at most ``size`` (``n`` for the longest list; the free places hold row 0, not real).

    Without ``lengths`` the chunks are consecutive slices. With the rows' token ``lengths``
    (packed evaluation) the rows are dealt longest first, back and forth over the chunks,
    so that every chunk holds about as many tokens: one row count fits them all with
    little spare (packing fills 0.89 instead of 0.77 of SST-2 dev's token slots, 0.81
    instead of 0.61 of ten clients' held-out rows)."""
    n = max(1, -(-max(len(r) for r in rows) // size))
    take, real = np.zeros((len(rows), n, size), np.int64), np.zeros((len(rows), n, size), bool)
    for i, r in enumerate(rows):
        k = np.arange(len(r))
        if lengths is None:
            chunk, place = k // size, k % size
        else:
            r = r[np.argsort(-lengths[r], kind="stable")]
            place, j = k // n, k % n
            chunk = np.where(place % 2 == 0, j, n - 1 - j)  # place < size: len(r) <= n * size
        take[i, chunk, place], real[i, chunk, place] = r, True
    return take, real


def evaluator(model, info: glue.TaskInfo, train: Arrays, validation: Arrays | None,
              holdout_index: list[np.ndarray], config,
              rows: packing.Rows | None = None) -> Evaluator:  # fmt: skip
    """Evaluators over ``validation`` (global; none when it is ``None``) and
    ``train[holdout_index[u]]`` (local).

    ``eval.batch_size``: rows per global forward; the local forward takes
    ``max(1, batch_size // clients_per_round)`` rows of each of the ``U`` clients at once.
    ``eval.max_local_examples``: at most this many held-out rows per client (0: all).
    With ``rows`` (the run's ``packing.Rows``) not ``None`` the rows of a forward share rows
    of tokens (:mod:`floranna_jax.packing`): no compute on padding, one row count per call
    (the global evaluation compiles once per run). Each client reports its sufficient
    statistics (``local_stats``: confusion counts, or for regression Pearson's centred sums
    of its values and of their ranks among its rows), which ``combine`` turns into the mean
    of the clients' scores.
    """
    batch_size, cap = config.eval.batch_size, config.eval.max_local_examples
    rows = rows or packing.decide(config.data.packing, train, validation)
    predict = jax.jit(lambda base, trainable, batch: model.apply(base, trainable, batch))
    predict_U = jax.jit(jax.vmap(lambda base, t, batch: model.apply(base, t, batch),
                                 in_axes=(None, 0, 0)))  # fmt: skip
    local_rows = max(1, batch_size // config.train.clients_per_round)
    train_inputs, train_labels = _inputs(train), np.asarray(train["label"])
    train_layout = packing.layout(train_inputs, rows.train) if rows.train else None
    train_lengths = train_layout[0] if train_layout else None  # token lengths: chunks by tokens
    holdout_index = [h[:cap] if cap else h for h in holdout_index]

    def local_batches(client_ids):
        index = [holdout_index[int(u)] for u in client_ids]
        take, real = _chunks(index, local_rows, train_lengths)  # [U, n, local_rows]
        U, n = take.shape[:2]
        flat = packing.batches(train_inputs, take.reshape(U * n, -1), real.reshape(U * n, -1),
                               train_layout)  # fmt: skip
        return take, real, {k: v.reshape(U, n, *v.shape[1:]) for k, v in flat.items()}

    def scored(base, trainable_U, client_ids) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(predictions, labels)`` of each client's held-out rows."""
        take, real, batches = local_batches(client_ids)
        U, n = take.shape[:2]
        logits = [
            np.asarray(predict_U(base, trainable_U, {k: v[:, i] for k, v in batches.items()}))
            for i in range(n)
        ]
        logits = np.concatenate(logits, axis=1).astype(np.float32)  # [U, n * local_rows, C]
        take, real = take.reshape(U, -1), real.reshape(U, -1)
        return [(_predictions(logits[u][real[u]], info.is_regression),
                 train_labels[take[u][real[u]]]) for u in range(U)]  # fmt: skip

    def local_stats(base, trainable_U, client_ids) -> list[dict[str, np.ndarray]]:
        """Each client's sufficient statistics on its held-out rows (``metrics.stats``:
        confusion counts ``[K, K]``; regression: centred sums ``[4]`` of its values and of
        their ranks among its rows)."""
        return [task_metrics.stats(info.name, p, y)
                for p, y in scored(base, trainable_U, client_ids)]  # fmt: skip

    def combine(stats: list[dict[str, np.ndarray]]) -> dict[str, float]:
        """The mean over clients with held-out rows of each one's scores from its stats."""
        return _mean([task_metrics.from_stats(info.name, s)
                      for s in stats if task_metrics.stats_rows(s)])  # fmt: skip

    def local_eval(base, trainable_U, client_ids) -> dict[str, float]:
        return combine(local_stats(base, trainable_U, client_ids))

    global_eval, global_programs = None, lambda base, trainable: []
    if validation is not None:
        global_eval, global_programs = _global(predict, info, validation, rows.validation,
                                               batch_size)  # fmt: skip

    def programs(base, trainable_U) -> list[Program]:
        """The global forward (``eval.batch_size`` rows) and the local one (``U`` clients'
        rows at once), at the shapes of the validation split and of clients ``0..U-1``."""
        trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                 trainable_U)  # fmt: skip
        out = global_programs(base, trainable)
        if config.eval.local:
            U = len(jax.tree.leaves(trainable_U)[0])
            take, _, batches = local_batches(np.arange(U))
            first = {k: _shape(v[:, 0]) for k, v in batches.items()}
            out.append(Program("predict clients", predict_U, (base, trainable_U, first),
                               take.shape[1]))  # fmt: skip
        return out

    return Evaluator(global_eval, local_eval, local_stats, combine, programs)


def _mean(scores: list[dict[str, float]]) -> dict[str, float]:
    if not scores:
        return {}
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def _global(predict, info: glue.TaskInfo, validation: Arrays, T: int | None, batch_size: int):
    """``(global_eval, programs)`` over the ``validation`` split, packed in rows of ``T``."""
    val_inputs, val_labels = _inputs(validation), np.asarray(validation["label"])
    val_layout = packing.layout(val_inputs, T) if T else None
    val_lengths = val_layout[0] if val_layout else None

    def global_batches():
        take, real = _chunks([np.arange(len(val_labels))], batch_size, val_lengths)
        return take, real, packing.batches(val_inputs, take[0], real[0], val_layout)

    def global_eval(base, trainable, record=None) -> dict[str, float]:  # record: no text here
        take, real, batches = global_batches()
        logits = [
            np.asarray(predict(base, trainable, {k: v[i] for k, v in batches.items()}))
            for i in range(take.shape[1])
        ]
        logits = np.concatenate(logits).astype(np.float32)[real[0].reshape(-1)]
        preds = _predictions(logits, info.is_regression)
        return task_metrics.compute(info.name, preds, val_labels[take[0][real[0]]])

    def programs(base, trainable) -> list[Program]:
        take, _, batches = global_batches()
        first = {k: _shape(v[0]) for k, v in batches.items()}
        return [Program("predict", predict, (base, trainable, first), take.shape[1])]

    return global_eval, programs


def _shape(x: np.ndarray) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
