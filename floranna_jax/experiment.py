"""Build what a run needs from its config: the task, its data, the partition, the model.

``build(config, key)`` returns an :class:`Experiment`. Nothing here trains; failures to
reach the hub or read local files become one ``ConfigError`` naming the field or file
(and, for the hub, how to point the run at local files instead).
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from floranna_jax import models, packing, partition, peft_folder, tasks
from floranna_jax.errors import BadValue, ConfigError, first_line
from floranna_jax.models import quant
from floranna_jax.tasks.classification import OFFLINE_HINT


class Experiment(NamedTuple):
    """task: tasks.Task; model: models.Model; train / validation: the task's numpy arrays
    ``{key: [N, ...]}``; part: partition.Partition (train / holdout rows of each client);
    rows: packing.Rows, the run's packing layout (decided here, once)."""

    task: tasks.Task
    model: Any
    train: dict[str, np.ndarray]
    validation: dict[str, np.ndarray]
    part: partition.Partition
    rows: packing.Rows


def lora_spec(config) -> models.LoraSpec:
    c = config.lora
    return models.LoraSpec(
        rank=c.rank, alpha=c.alpha, rslora=c.rslora, targets=tuple(c.targets), dropout=c.dropout
    )


def build_model(config, num_labels: int, key: jax.Array, abstract: bool = False,
                sharding=None) -> Any:  # fmt: skip
    """The model with fresh adapters and head, or those of ``lora.init_from``; pretrained
    from model.path or tiny random, its base in ``model.base_dtype``. ``model.remat``
    (decoder configs only) reaches the decoder family. ``abstract``: the base as shapes
    only (``models.build_abstract``), read from the folder's config.json alone: no weight is
    read or made. ``sharding``: where a pretrained base loads, tensor by tensor
    (``models.load_pretrained``)."""
    kwargs = dict(
        num_labels=num_labels, lora=lora_spec(config), key=key,
        compute_dtype=jnp.dtype(config.model.compute_dtype),
        base_dtype=models.resolve_base_dtype(config.model.base_dtype),
    )  # fmt: skip
    if "remat" in config.model:
        kwargs["remat"] = config.model.remat
    if config.model.source == "random":
        build = models.build_abstract if abstract else models.build_random
        model = build(models.tiny_config(config.model.model_type), **kwargs)
    else:
        model = _load_pretrained(config, kwargs, abstract, sharding)
    if config.model.get("quantize"):
        model = _quantize(config, model, abstract)
    if config.lora.get("init_from"):
        model = _init_from(config, model, num_labels)
    return model


def _quantize(config, model, abstract: bool):
    """``model`` with its decoder projections quantized by ``model.quantize`` (decoder
    configs only; :mod:`floranna_jax.models.quant`), once built or loaded; an abstract
    base gets the quantized shapes."""
    quantize = functools.partial(quant.quantize_base, method=config.model.quantize)
    try:
        return model._replace(base=jax.eval_shape(quantize, model.base) if abstract
                              else quantize(model.base))  # fmt: skip
    except BadValue as e:  # no decoder layers, or an NF4 kernel whose d_in is not 64 k
        raise ConfigError(f"config field model.{e.param}: {e.message}") from e


def _init_from(config, model, num_labels: int):
    """``model`` with the adapters (and saved head) of the PEFT folder ``lora.init_from``."""
    try:
        trainable = peft_folder.read(config.lora.init_from, model, lora_spec(config), num_labels)
    except BadValue as e:  # a setting that differs, or a folder that is not such an adapter
        raise ConfigError(f"config field lora.{e.param}: {e.message}") from e
    return model._replace(trainable=trainable)


def _load_pretrained(config, kwargs: dict, abstract: bool = False, sharding=None):
    try:
        if abstract:
            path = os.path.expanduser(config.model.path)
            folder = models.loading.resolve_folder(path, weights=False)
            return models.build_abstract(models.loading.read_config(folder), **kwargs)
        path = os.path.expanduser(config.model.path)
        return models.load_pretrained(path, sharding=sharding, **kwargs)
    except BadValue as e:  # the checkpoint's family does not know a LoRA setting
        raise ConfigError(f"config field lora.{e.param}: {e.message}") from e
    except ValueError as e:  # e.g. an unsupported model_type or a checkpoint mismatch
        raise ConfigError(f"config field model.path: {config.model.path!r}: {e}") from e
    except (OSError, RuntimeError) as e:
        raise ConfigError(
            f"config field model.path: cannot load {config.model.path!r}: "
            f"{type(e).__name__}: {first_line(e)}; {OFFLINE_HINT}"
        ) from e


def split_labels(train: dict[str, np.ndarray]) -> np.ndarray:
    """What partitions split on: the labels, or one class for a task without labels."""
    if "label" in train:
        return train["label"]
    return np.zeros(len(next(iter(train.values()))), np.int64)


def load_data(config) -> tuple[tasks.Task, dict, dict, partition.Partition]:
    """``(task, train, validation, part)``: the task's data and its client split."""
    task = tasks.get(config.data.task)
    train, validation = task.load(config)
    p = config.partition
    extra = {"classes_per_client": p.classes_per_client} if p.scheme == "k_classes" else {}
    if p.scheme not in partition.LABEL_FREE and "label" not in train:
        raise ConfigError(
            f"config field partition.scheme: {p.scheme!r} splits by label and task "
            f"{task.name} has none; use one of {', '.join(partition.LABEL_FREE)}"
        )
    try:
        part = partition.split(
            split_labels(train), p.num_clients, scheme=p.scheme, seed=config.train.seed,
            alpha=p.alpha, holdout_fraction=p.holdout_fraction, **extra,
        )  # fmt: skip
    except BadValue as e:
        raise ConfigError(f"config field partition.{e.param}: {e.message}") from e
    except ValueError as e:  # what only the data decides: too few examples or classes
        raise ConfigError(f"config section partition: {e}") from e
    return task, train, validation, part


def build(config, key: jax.Array, abstract: bool = False, sharding=None) -> Experiment:
    """Data first (cheap to fail), then the partition, then the model (``key`` inits it;
    ``abstract``: its base as shapes only; ``sharding``: where a pretrained base loads; see
    :func:`build_model`)."""
    task, train, validation, part = load_data(config)
    model = build_model(config, task.num_labels, key, abstract, sharding)
    packed_batch = config.client.micro_batch_size or config.client.batch_size  # examples a pack
    rows = packing.decide(config.data.packing, train, validation,
                          packed_batch if config.data.get("dense_rows") else None)  # fmt: skip
    return Experiment(task, model, train, validation, part, rows)
