"""The client side of a Flower federation: the project's ``local_update`` on local data.

A SuperNode names its data in its node config (``data-path``, a file written by
:mod:`floranna_jax.flower.shards` or by the site itself); the file says which client of
the federation it is. Two message types:

- ``query``: reply ``{"client": {"client-id"}}`` so the server can map client ids to
  nodes.
- ``train``: the round number (0-based rounds done), the start adapter and head (without
  the method's ``private`` leaves) and, for methods that merge into the frozen weight, the
  whole ``base_delta`` so far. The client builds the model from the experiment config (the
  same seed, hence the same base and initial adapter as the server), fills its private
  leaves from its own state (initially the model's), folds the delta into its base, and
  runs ``rounds.train_clients`` on its own rows: the very batches, dropout keys and steps
  the in-process round would give it. It replies with its trained shared leaves and
  ``{"loss", "steps", "examples", "num-examples"}``, and keeps its private leaves in the
  node's context state for its next round.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from floranna_jax import (
    clients,
    config_check,
    experiment,
    keys,
    packing,
    privacy,
    rounds,
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
    the runner of ``local_update``, the client optimizer and ``effective_base``
    (``rounds.make_effective_base``: folds a method's merges into the frozen base)."""

    config: Any
    method: server.Method
    model: Any
    runner: Any
    opt: Any
    effective_base: Any


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
    return Job(config, method, model, runner, opt, rounds.make_effective_base(model))


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    """One round of ``local_update`` from the received start on this client's data."""
    job = build_job(context.run_config.get("experiment"))
    config, method, model = job.config, job.method, job.model
    shard = _shard(context)
    u, n = shard.client_id, shards.num_examples(shard)
    if int(msg.content["config"]["client-id"]) != u:
        raise ConfigError(f"node config data-path: holds client {u}, the server asked for "
                          f"client {msg.content['config']['client-id']}")  # fmt: skip

    received = wire.from_record(msg.content["start"])
    own = wire.from_record(context.state["private"]) if "private" in context.state else {}
    start = clients.broadcast(wire.fill(model.trainable, {**own, **received}), 1)
    delta = wire.from_record(msg.content["base"]) if "base" in msg.content else {}
    base = job.effective_base(model.base, delta)

    root = jax.random.key_data(keys.root(config.train.seed))
    rkey = keys.round_key(root, int(msg.content["config"]["round"]))
    micro, b = train.micro_batches(config), config.client.batch_size
    # Dense rows: the length chosen from this client's own examples (a server holds none).
    packed_batch = b // micro if config.data.dense_rows else None
    layout = packing.layout(shard.train, packed_batch) if config.data.packing else None
    out = rounds.train_clients(
        job.runner, base, start, rounds.fresh_opt_state(job.opt, start), rkey, np.asarray([u]),
        shard.train, {u: np.arange(n)}, config.client.local_steps, b, layout, micro,
    )  # fmt: skip
    # What leaves this client: the method's upload transform (server.dp clips it here).
    trained = jax.tree.map(lambda x: np.asarray(x[0]), method.upload(start, out.trainable))

    context.state["private"] = wire.to_record(trained, method.private)
    metrics = {"loss": float(out.loss[0]), "steps": int(out.steps[0]),
               "examples": float(out.examples[0]), "num-examples": n}  # fmt: skip
    content = {
        "update": wire.to_record(trained, lambda path: not method.private(path)),
        "metrics": MetricRecord(metrics),
    }
    return Message(RecordDict(content), reply_to=msg)
