"""The client side of a Flower federation: the project's ``local_update`` on local data.

A SuperNode names its data in its node config (``data-path``, a file written by
:mod:`floranna_jax.flower.shards` or by the site itself); the file says which client of
the federation it is. Two message types:

- ``query``: reply ``{"client": {"client-id", "num-examples"}}`` so the server can map
  client ids to nodes and weight clients by ``n_u``.
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
    """Which client this node is and how many training examples it holds."""
    shard = _shard(context)
    info = {"client-id": shard.client_id, "num-examples": shards.num_examples(shard)}
    return Message(RecordDict({"client": ConfigRecord(info)}), reply_to=msg)


@app.train()
def train_(msg: Message, context: Context) -> Message:
    """One round of ``local_update`` from the received start on this client's data."""
    config = runconfig.experiment(context.run_config)
    shard = _shard(context)
    u = shard.client_id
    method = server.make(config.server.name, **config_check.validate(config))
    task = tasks.get(config.data.task)
    model = experiment.build_model(config, task.num_labels, keys.model_key(config.train.seed))
    runner, opt = train.make_runner(config, task.make_loss(model), method)

    received = wire.from_record(msg.content["start"])
    own = wire.from_record(context.state["private"]) if "private" in context.state else {}
    start = clients.broadcast(wire.fill(model.trainable, {**own, **received}), 1)
    delta = wire.from_record(msg.content["base"]) if "base" in msg.content else {}
    base = rounds.make_effective_base(model)(model.base, delta)

    c, n = config.client, shards.num_examples(shard)
    root = jax.random.key_data(keys.root(config.train.seed))
    rkey = keys.round_key(root, int(msg.content["config"]["round"]))
    layout = packing.layout(shard.train) if config.data.packing else None
    out = rounds.train_clients(
        runner, base, start, rounds.fresh_opt_state(opt, start), rkey, np.asarray([u]),
        shard.train, {u: np.arange(n)}, c.local_steps, c.batch_size, layout,
    )  # fmt: skip
    trained = jax.tree.map(lambda x: np.asarray(x[0]), out.trainable)

    context.state["private"] = wire.to_record(trained, method.private)
    metrics = {"loss": float(out.loss[0]), "steps": int(out.steps[0]),
               "examples": float(out.examples[0]), "num-examples": n}  # fmt: skip
    content = {
        "update": wire.to_record(trained, lambda path: not method.private(path)),
        "metrics": MetricRecord(metrics),
    }
    return Message(RecordDict(content), reply_to=msg)
