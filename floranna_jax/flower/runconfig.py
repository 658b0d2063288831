"""The Flower run config, read and checked: the experiment and the server's fault policy.

The keys and their defaults live in one place, the app's ``flower_app/pyproject.toml``
(``[tool.flwr.app.config]``); ``flwr run --run-config`` overrides them. Every key reaches
both apps, so a bad value stops the run with one line naming the key.

    experiment         the experiment ConfigDict as JSON (``configs/*.py`` plus overrides)
    workdir            server: folder for metrics.jsonl and checkpoints/
    round-timeout-s    server: seconds to wait for the sampled clients' replies
    retries            server: times a client that did not answer is asked again
    min-replies        server: fewer accepted uploads than this stop the run
    connect-timeout-s  server: seconds to wait for every client to connect at the start
"""

from __future__ import annotations

import json
from typing import NamedTuple

import ml_collections

from floranna_jax.errors import ConfigError


class Options(NamedTuple):
    """The server's side of the run config (see the module docstring)."""

    workdir: str
    round_timeout_s: float
    retries: int
    min_replies: int
    connect_timeout_s: float


def _value(run_config, key: str, kind: type, minimum: float):
    value = run_config.get(key)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, kind | int) or value < minimum:
        raise ConfigError(
            f"run config {key}: must be a {kind.__name__} >= {minimum}, got {value!r}"
        )
    return kind(value)


def options(run_config) -> Options:
    """The server's options; a missing or bad key raises ``ConfigError`` naming it."""
    workdir = run_config.get("workdir")
    if not isinstance(workdir, str) or not workdir:
        raise ConfigError(
            f"run config workdir: must name a folder for the results, got {workdir!r}"
        )
    return Options(
        workdir=workdir,
        round_timeout_s=_value(run_config, "round-timeout-s", float, 1.0),
        retries=_value(run_config, "retries", int, 0),
        min_replies=_value(run_config, "min-replies", int, 1),
        connect_timeout_s=_value(run_config, "connect-timeout-s", float, 0.0),
    )


def experiment(run_config) -> ml_collections.ConfigDict:
    """The experiment config (locked) from the run config's ``experiment`` JSON."""
    return parse_experiment(run_config.get("experiment"))


def parse_experiment(text) -> ml_collections.ConfigDict:
    """The experiment config (locked) from its JSON ``text``."""
    try:
        fields = json.loads(text)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"run config experiment: not an experiment config as JSON ({e})") from e
    if not isinstance(fields, dict) or "server" not in fields:
        raise ConfigError("run config experiment: not an experiment config (no server section)")
    return ml_collections.ConfigDict(fields).lock()
