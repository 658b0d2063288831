"""The client side of a Flower federation: the project's ``local_update`` on local data.

A SuperNode names its data in its node config (``data-path``, a file written by
:mod:`floranna_jax.flower.shards` or by the site itself); the file says which client of
the federation it is. Three message types:

- ``query``: reply ``{"client": {"client-id"}}`` so the server can map client ids to
  nodes.
- ``train``: the round number (0-based rounds done), the run's packing row length
  (``row-length``, 0: padded; the server decides it, ``packing.Rows``), the start adapter
  and head (without the method's ``private`` leaves) and, for methods that merge into the
  frozen weight, the whole ``base_delta`` so far. The client builds the model from the
  experiment config (the same seed, hence the same base and initial adapter as the
  server), fills its private leaves from its own state (initially the model's), folds the
  delta into its base, and runs ``rounds.train_clients`` on its own rows: the very
  batches, dropout keys and steps the in-process round would give it. It replies with its
  trained shared leaves and ``{"loss", "steps", "examples", "num-examples", "train-s"}``
  (``train-s``: the seconds this ClientApp spent on the message), and keeps its
  private leaves, and the model it trained with that round's delta, in the node's context
  state.
- ``evaluate``: the row length and a model (all its leaves, and the base delta), or none:
  then the model the client trained last. The client scores it on its held-out rows with
  the task's evaluator and replies with the sufficient statistics (``stats``:
  ``Evaluator.local_stats``, counts and sums; never a row).
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from floranna_jax import (
    config_check,
    experiment,
    keys,
    merged_base,
    packing,
    privacy,
    rounds,
    runners,
    server,
    tasks,
    train,
)
from floranna_jax.errors import ConfigError
from floranna_jax.flower import runconfig, shards, wire

app = ClientApp()


def _shard(context: Context) -> shards.Shard:
    path = context.node_config.get("data-path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"node config data-path: must name this client's data file, got {path!r}")
    return shards.load(path)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client of the federation this node is."""
    info = ConfigRecord({"client-id": _shard(context).client_id})
    return Message(RecordDict({"client": info}), reply_to=msg)


class Job(NamedTuple):
    """What a client builds from the experiment config: the method (for its frozen and
    private leaves), the model (same seed: same base and initial adapter as the server),
    the runner of ``local_update``, the client optimizer and ``base_for``
    (``merged_base.make``: the frozen base with a method's merges; each message handler
    asks it for its base and drops it, as its contract requires)."""

    config: Any
    method: server.Method
    model: Any
    runner: Any
    opt: Any
    base_for: Any


@functools.lru_cache(maxsize=1)
def build_job(experiment_json: str) -> Job:
    """The client's :class:`Job`, built once per process and experiment (a runtime that
    keeps the process, like Flower's simulation, compiles ``local_update`` once)."""
    config = runconfig.parse_experiment(experiment_json)
    method = privacy.wrap(
        config, server.make(config.server.name, **config_check.server_hparams(config))
    )
    task = tasks.get(config.data.task)
    model = experiment.build_model(config, task.num_labels, keys.model_key(config.train.seed))
    runner, opt = train.make_runner(config, task.make_loss(model), method, one_client=True)
    return Job(config, method, model, runner, opt, merged_base.make(model))


def _client_id(msg: Message, shard: shards.Shard) -> int:
    """This node's client, the one the server addressed (else ``ConfigError``)."""
    asked = int(msg.content["config"]["client-id"])
    if asked != shard.client_id:
        raise ConfigError(f"node config data-path: holds client {shard.client_id}, the server "
                          f"asked for client {asked}")  # fmt: skip
    return asked


def _row_length(msg: Message) -> int | None:
    return int(msg.content["config"]["row-length"]) or None


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    """One round of ``local_update`` from the received start on this client's data."""
    t0 = time.perf_counter()
    job = build_job(context.run_config.get("experiment"))
    config, method, model = job.config, job.method, job.model
    shard = _shard(context)
    u, n = _client_id(msg, shard), shards.num_examples(shard)

    received = wire.from_record(msg.content["start"])
    own = wire.from_record(context.state["private"]) if "private" in context.state else {}
    start = runners.broadcast(wire.fill(model.trainable, {**own, **received}), 1)
    delta = msg.content["base"] if "base" in msg.content else ArrayRecord()
    base = job.base_for(wire.from_record(delta))

    root = jax.random.key_data(keys.root(config.train.seed))
    rkey = keys.round_key(root, int(msg.content["config"]["round"]))
    T = _row_length(msg)
    layout = packing.layout(shard.train, T) if T else None
    out = rounds.train_clients(
        job.runner, base, start, rounds.fresh_opt_state(job.opt, start), rkey, np.asarray([u]),
        shard.train, {u: np.arange(n)}, config.client.local_steps, config.client.batch_size,
        layout, train.micro_batches(config),
    )  # fmt: skip
    # What leaves this client: the method's upload transform (server.dp clips it here).
    trained = jax.tree.map(lambda x: np.asarray(x[0]), method.upload(start, out.trainable))

    context.state["private"] = wire.to_record(trained, method.private)
    # The model this client trained (before its upload transform) and the base it trained
    # on: what it scores when the server asks for its own model, as a run in process does.
    context.state["trained"] = wire.to_record(jax.tree.map(lambda x: x[0], out.trainable),
                                              lambda path: True)  # fmt: skip
    context.state["trained-base"] = wire.pack(wire.from_record(delta))  # a copy, not the message's
    metrics = {"loss": float(out.loss[0]), "steps": int(out.steps[0]),
               "examples": float(out.examples[0]), "num-examples": n,
               "train-s": time.perf_counter() - t0}  # fmt: skip
    content = {
        "update": wire.to_record(trained, lambda path: not method.private(path)),
        "metrics": MetricRecord(metrics),
    }
    return Message(RecordDict(content), reply_to=msg)


# A node's process serves one shard; the tests' one process serves every client's.
@functools.lru_cache(maxsize=8)
def local_evaluator(experiment_json: str, data_path: str, row_length: int | None):
    """The task's evaluator of this client's held-out rows (no validation split), packing
    in rows of the run's ``row_length``; built once per process, shard and layout."""
    job, shard = build_job(experiment_json), shards.load(data_path)
    holdout = [np.arange(len(next(iter(shard.holdout.values()))))]
    task = tasks.get(job.config.data.task)
    rows = packing.Rows(row_length, None)
    return task.make_evaluator(job.model, shard.holdout, None, holdout, job.config, rows)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """This client's sufficient statistics of a model on its held-out rows."""
    experiment_json = context.run_config.get("experiment")
    job, shard = build_job(experiment_json), _shard(context)
    _client_id(msg, shard)
    if "model" in msg.content:  # the server's model, e.g. the global one before round 1
        tree, delta = msg.content["model"], msg.content.get("base", ArrayRecord())
    elif "trained" in context.state:  # the model this client trained last
        tree, delta = context.state["trained"], context.state["trained-base"]
    else:
        raise ConfigError("evaluate: the server asked for this client's own model before it "
                          "trained one")  # fmt: skip
    trainable = runners.broadcast(wire.fill(job.model.trainable, wire.from_record(tree)), 1)
    base = job.base_for(wire.from_record(delta))
    evaluator = local_evaluator(experiment_json, context.node_config["data-path"],
                                _row_length(msg))  # fmt: skip
    (stats,) = evaluator.local_stats(base, trainable, np.arange(1))
    return Message(RecordDict({"stats": wire.pack(stats)}), reply_to=msg)
