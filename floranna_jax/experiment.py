"""Build what a run needs from its config: the model, the data and the partition.

``build(config, key)`` returns an :class:`Experiment`. Nothing here trains; failures to
reach the hub or read local files become one ``ConfigError`` saying how to point the run
at local files instead.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from floranna_jax import models, partition
from floranna_jax.config_check import ConfigError
from floranna_jax.data import glue, synthetic

OFFLINE_HINT = (
    "offline? point at local files: --config.model.path=<folder from "
    "shared/tools/fetch_models.sh> --config.data.dir=<GLUE folder with SST-2/train.tsv ...>"
)


class Experiment(NamedTuple):
    """task: data.glue.TaskInfo; model: models Model; train / validation: numpy arrays
    ``{"input_ids", "attention_mask", "token_type_ids": [N, L], "label": [N]}``;
    part: partition.Partition (train / holdout row indices of each client)."""

    task: Any
    model: Any
    train: dict[str, np.ndarray]
    validation: dict[str, np.ndarray]
    part: partition.Partition


def lora_spec(config) -> Any:
    c = config.lora
    return models.LoraSpec(
        rank=c.rank, alpha=c.alpha, rslora=c.rslora, targets=tuple(c.targets), dropout=c.dropout
    )


def build_model(config, num_labels: int, key: jax.Array) -> Any:
    """The model with fresh adapters and head; pretrained from model.path or tiny random."""
    kwargs = dict(
        num_labels=num_labels, lora=lora_spec(config), key=key,
        compute_dtype=jnp.dtype(config.model.compute_dtype),
    )  # fmt: skip
    if config.model.source == "random":
        return models.build_random(models.tiny_config(config.model.model_type), **kwargs)
    try:
        return models.load_pretrained(os.path.expanduser(config.model.path), **kwargs)
    except ValueError as e:  # e.g. an unsupported model_type or a checkpoint mismatch
        raise ConfigError(f"config field model.path: {config.model.path!r}: {e}") from e
    except (OSError, RuntimeError) as e:
        raise ConfigError(
            f"config field model.path: cannot load {config.model.path!r}: "
            f"{type(e).__name__}: {_first_line(e)}; {OFFLINE_HINT}"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def load_data(config, task) -> tuple[dict, dict]:
    """(train, validation) arrays: a GLUE task tokenized by the model's tokenizer, or
    synthetic tokens (validation drawn with seed + 1)."""
    c = config.data
    if c.source == "synthetic":
        kw = dict(seq_len=c.max_length, vocab_size=c.vocab_size, num_labels=max(task.num_labels, 2))
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
        splits = glue.load(c.task, tokenizer=tokenizer, data_dir=data_dir, max_length=c.max_length)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"config field data.dir: {_first_line(e)}; {OFFLINE_HINT}") from e
    return splits["train"], splits["validation"]


def build(config, key: jax.Array) -> Experiment:
    """Data first (cheap to fail), then the partition, then the model (``key`` inits it)."""
    task = glue.get_task(config.data.task)
    train, validation = load_data(config, task)
    p = config.partition
    extra = {"classes_per_client": p.classes_per_client} if p.scheme == "k_classes" else {}
    part = partition.split(
        train["label"], p.num_clients, scheme=p.scheme, seed=config.train.seed, alpha=p.alpha,
        holdout_fraction=p.holdout_fraction, **extra,
    )  # fmt: skip
    model = build_model(config, task.num_labels, key)
    return Experiment(task, model, train, validation, part)
