"""Config validation: every field of configs/glue.py checked before anything is built.

``validate(config)`` raises one ``ConfigError`` (a ``ValueError``) whose message names
the field, the bad value and the valid values (launch.py prints it as a single line).
It also returns the hyperparameters the chosen estimator accepts (``server_hparams``):
the fields of ``config.server`` other than ``name`` that are parameters of
``make_<name>``.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from floranna_jax import clients, models, partition, rounds, server
from floranna_jax.data import glue

MODEL_SOURCES = ("pretrained", "random")
DATA_SOURCES = ("glue", "synthetic")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A bad config value; the message names the field and the valid values."""


def _fail(field: str, message: str) -> None:
    raise ConfigError(f"config field {field}: {message}")


def _choice(config, field: str, valid) -> None:
    value = _get(config, field)
    if value not in valid:
        _fail(field, f"unknown value {value!r}; valid: {', '.join(map(str, valid))}")


def _get(config, field: str) -> Any:
    section, name = field.split(".")
    return config[section][name]


def _int(config, field: str, minimum: int = 1) -> None:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        _fail(field, f"must be {kind}, got {value!r}")


def _number(config, field: str, low: float, high: float | None = None, *, open_low=True) -> None:
    value = _get(config, field)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (value > low if open_low else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"{'>' if open_low else '>='} {low}" + ("" if high is None else f" and < {high}")
        _fail(field, f"must be a number {bound}, got {value!r}")


def looks_local(path: str) -> bool:
    """A path (rather than a hub id): exists, absolute, or starts with '.' or '~'."""
    return os.path.exists(path) or os.path.isabs(path) or path.startswith((".", "~"))


def _paths(config) -> None:
    path = config.model.path
    if config.model.source == "pretrained":
        if not path:
            _fail("model.path", "is empty; give a hub id (FacebookAI/roberta-base) or a folder")
        if looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
            _fail("model.path", f"no such folder {path!r} (a local HF model folder or a hub id)")
    if config.data.dir and not os.path.isdir(os.path.expanduser(config.data.dir)):
        _fail("data.dir", f"no such folder {config.data.dir!r} (the GLUE folder: SST-2/train.tsv)")
    if config.data.source == "glue" and config.model.source != "pretrained":
        _fail(
            "data.source", "'glue' needs a tokenizer: use model.source='pretrained' with model.path"
        )


def server_hparams(config) -> dict[str, Any]:
    """The ``config.server`` fields that ``make_<server.name>`` accepts."""
    params = inspect.signature(server.ESTIMATORS[config.server.name]).parameters
    return {k: config.server[k] for k in config.server if k != "name" and k in params}


def validate(config) -> dict[str, Any]:
    """Raise ``ConfigError`` naming the first bad field; return the estimator's hparams."""
    _choice(config, "model.source", MODEL_SOURCES)
    _choice(config, "model.model_type", tuple(models.FAMILIES))
    _choice(config, "model.compute_dtype", COMPUTE_DTYPES)
    _int(config, "lora.rank")
    _number(config, "lora.alpha", 0.0)
    _number(config, "lora.dropout", 0.0, 1.0, open_low=False)
    if not config.lora.targets or not all(isinstance(t, str) and t for t in config.lora.targets):
        _fail(
            "lora.targets", f"must be a non-empty tuple of layer names, got {config.lora.targets!r}"
        )
    _choice(config, "data.source", DATA_SOURCES)
    try:
        task = glue.get_task(config.data.task)
    except ValueError as e:
        _fail("data.task", str(e))
    if config.data.source == "synthetic" and task.is_regression:
        _fail("data.task", f"{task.name!r} is a regression task; synthetic data is classification")
    for field in ("data.max_length", "data.num_train_examples", "data.num_eval_examples"):
        _int(config, field)
    _int(config, "data.vocab_size", 8)
    _choice(config, "partition.scheme", tuple(partition.SCHEMES))
    _int(config, "partition.num_clients")
    _number(config, "partition.alpha", 0.0)
    _int(config, "partition.classes_per_client")
    _number(config, "partition.holdout_fraction", 0.0, 1.0, open_low=False)
    _choice(config, "client.optimizer", tuple(clients.OPTIMIZERS))
    _number(config, "client.learning_rate", 0.0)
    _number(config, "client.weight_decay", 0.0, open_low=False)
    _int(config, "client.local_steps")
    _int(config, "client.batch_size")
    _choice(config, "server.name", tuple(server.ESTIMATORS))
    _int(config, "train.seed", 0)
    _int(config, "train.num_rounds")
    _int(config, "train.clients_per_round")
    if config.train.clients_per_round > config.partition.num_clients:
        _fail("train.clients_per_round", f"{config.train.clients_per_round} exceeds "
              f"partition.num_clients={config.partition.num_clients}")  # fmt: skip
    _choice(config, "train.client_mode", clients.MODES)
    _int(config, "train.clients_per_chunk", 0)
    if config.train.clients_per_chunk and config.train.shard_clients:
        _fail("train.clients_per_chunk", "chunks run on one device; set it to 0 to shard clients")
    _int(config, "ckpt.every_rounds", 0)
    _int(config, "ckpt.keep")
    _int(config, "eval.every_rounds")
    _int(config, "eval.batch_size")
    _int(config, "eval.max_local_examples", 0)
    bad = [c for c in config.server.compare if c not in rounds.COMPARISONS]
    if bad:
        _fail("server.compare", f"unknown {bad}; valid: {', '.join(rounds.COMPARISONS)}")
    _paths(config)
    hparams = server_hparams(config)
    try:  # the factory checks its hyperparameters' values; it compiles nothing
        server.ESTIMATORS[config.server.name](**hparams)
    except (ValueError, TypeError) as e:
        _fail(f"server.{config.server.name}", str(e))
    return hparams
