"""The server side of a Flower federation: any method of ``server.ESTIMATORS``, by name.

The server holds what an in-process run's server holds (``rounds.RoundState``: global
adapter, head, the method's state, key, round, byte counters) and runs the same pieces of
:mod:`floranna_jax.rounds` in the same order; only the clients' half travels:

    connect: ask every node (``query``) which client it is
    round:   rounds.plan -> rounds.start_trainable -> one ``train`` message per sampled
             client (its start without the method's private leaves, plus the method's
             whole base_delta when it merges into W0) -> replies, checked by
             wire.check_update -> rounds.server_step on the accepted uploads, their private
             leaves filled from the start, weights p_u = n_u / sum n renormalized over them

Faults: a client that does not answer within ``round-timeout-s`` (a killed SuperNode, a
raising ClientApp) is asked again ``retries`` times, then the round goes on without it; an
upload with a missing leaf, another shape or rank, another dtype or a non-finite value or
loss is rejected. Both are logged with the client and the reason, and counted in the
round's row (``flower/clients_missing``, ``flower/clients_rejected``). Fewer than
``min-replies`` accepted uploads stop the run with a ``RoundError``; nothing of that round
is saved. Each round writes one row to ``workdir/metrics.jsonl`` with the bytes measured on
the actual messages (``flower/bytes_*_per_client``) beside the method's formula
(``server/bytes_up``, ``server/bytes_down``), and a checkpoint every ``ckpt.every_rounds``.
"""

from __future__ import annotations

import os
import time
from logging import INFO, WARNING
from typing import NamedTuple

import jax
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from floranna_jax import (
    checkpoint,
    clients,
    config_check,
    experiment,
    keys,
    reporting,
    rounds,
    server,
    tasks,
)
from floranna_jax.errors import ConfigError, RoundError
from floranna_jax.flower import runconfig, wire

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Connect the clients, then run ``train.num_rounds`` rounds (resuming a checkpoint)."""
    opts = runconfig.options(context.run_config)
    config = runconfig.experiment(context.run_config)
    hparams = config_check.validate(config)
    if config.client.persistent_opt_state:
        raise ConfigError("config field client.persistent_opt_state: not supported over Flower")
    server_ = server.build(config.server.name, **hparams)
    seed, num_clients = config.train.seed, config.partition.num_clients
    task = tasks.get(config.data.task)
    model = experiment.build_model(config, task.num_labels, keys.model_key(seed))
    state = rounds.init_state(seed, model.trainable, server_.method, num_clients)
    ckpt = checkpoint.Checkpointer(
        os.path.join(opts.workdir, "checkpoints"), config.ckpt.every_rounds, config.ckpt.keep
    )
    state = ckpt.restore(state) or state
    reporter = reporting.Reporter(opts.workdir, start_round=int(state.round),
                                  num_rounds=config.train.num_rounds,
                                  main_metric=task.main_metric)  # fmt: skip
    nodes = connect(grid, num_clients, opts.connect_timeout_s)
    while int(state.round) < config.train.num_rounds:
        state, row = run_round(grid, nodes, server_, state, config, opts)
        reporter.write(row)
        ckpt.save(state)
    ckpt.save(state, force=True)
    ckpt.close()
    reporter.finish(f"{config.server.name} on {task.name} over Flower")


def connect(grid: Grid, num_clients: int, timeout_s: float) -> dict[int, int]:
    """``{client id: node id}`` of the nodes that answered a ``query`` before ``timeout_s``;
    clients left out count as not answering in every round."""
    nodes: dict[int, int] = {}
    asked: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(nodes) < num_clients:
        new = [n for n in grid.get_node_ids() if n not in asked]
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if not new:
            time.sleep(min(1.0, left))
            continue
        asked.update(new)
        query = [
            Message(RecordDict({}), dst_node_id=n, message_type=MessageType.QUERY) for n in new
        ]
        for reply in exchange(grid, query, left):
            if reply.has_error():
                log(WARNING, "node %d: query failed: %s", reply.metadata.src_node_id,
                    reply.error.reason)  # fmt: skip
                continue
            nodes[int(reply.content["client"]["client-id"])] = reply.metadata.src_node_id
    absent = sorted(set(range(num_clients)) - set(nodes))
    log(INFO, "connected clients %s%s", sorted(nodes), f"; absent: {absent}" if absent else "")
    return nodes


POLL_S = 0.1  # between asks for replies; Grid.send_and_receive waits 3 s


def exchange(grid: Grid, messages: list[Message], timeout_s: float) -> list[Message]:
    """Send ``messages`` and return the replies that arrive within ``timeout_s``: Flower's
    ``send_and_receive``, polling every ``POLL_S`` so that a round does not wait up to 3 s
    for replies already there."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(POLL_S)
    return replies


class Collected(NamedTuple):
    """A round's replies: accepted ones ``{u: Message}``, the clients rejected by the gate
    or missing (no node, no reply, a failed ClientApp), bytes sent ``{u: int}``."""

    accepted: dict[int, Message]
    rejected: list[int]
    missing: list[int]
    down: dict[int, int]


def run_round(grid, nodes, server_, state, config, opts) -> tuple[rounds.RoundState, dict]:
    """One round over the network; ``(state after it, its metrics row)``."""
    number, t0 = int(state.round) + 1, time.perf_counter()
    method = server_.method
    rkey, ids = rounds.plan(state, config.partition.num_clients, config.train.clients_per_round)
    start = rounds.start_trainable(state, method, rkey, ids)
    starts = {int(u): jax.tree.map(lambda x, i=i: np.asarray(x[i]), start)
              for i, u in enumerate(ids)}  # fmt: skip
    delta = method.base_delta(state.method)
    base = wire.to_record(delta, lambda path: True) if delta else None

    def shared(path):
        return not method.private(path)

    def message(u: int) -> Message:
        content = {"start": wire.to_record(starts[u], shared),
                   "config": ConfigRecord({"round": int(state.round), "client-id": u})}  # fmt: skip
        if base is not None:
            content["base"] = base
        return Message(RecordDict(content), dst_node_id=nodes[u],
                       message_type=MessageType.TRAIN)  # fmt: skip

    expected = {k: v for k, v in wire.leaves(starts[int(ids[0])]).items() if shared(wire.split(k))}
    got = collect(grid, nodes, number, [int(u) for u in ids], message, expected, opts)
    ok = sorted(got.accepted)
    if len(ok) < opts.min_replies:
        raise RoundError(f"round {number}: {len(ok)} accepted uploads (clients {ok}), "
                         f"fewer than min-replies={opts.min_replies}")  # fmt: skip
    if len(ok) < len(ids):
        log(WARNING, "round %d: aggregating clients %s of %s, weights renormalized over them",
            number, ok, ids.tolist())  # fmt: skip
    replies = [got.accepted[u] for u in ok]
    uploads = [wire.fill(starts[u], wire.from_record(r.content["update"]))
               for u, r in zip(ok, replies, strict=True)]  # fmt: skip
    metrics = {k: np.asarray([r.content["metrics"][k] for r in replies], np.float64)
               for k in ("loss", "steps", "examples", "num-examples")}  # fmt: skip
    t1 = time.perf_counter()
    new_state, agg = rounds.server_step(
        number, state, server_, np.asarray(ok, np.int64),
        rounds.client_weights(metrics["num-examples"]), clients.stack(uploads), {},
    )  # fmt: skip
    return new_state, {
        "round": number,
        **rounds.train_metrics(metrics["loss"], metrics["steps"], metrics["examples"]),
        **rounds.server_metrics(agg.metrics),
        "comm/bytes_up_total": float(new_state.bytes_up),
        "comm/bytes_down_total": float(new_state.bytes_down),
        **_flower_metrics(got, replies),
        "time/clients_s": t1 - t0,
        "time/server_s": time.perf_counter() - t1,
    }


def _flower_metrics(got: Collected, replies: list[Message]) -> dict[str, float]:
    """Clients aggregated, rejected and missing; bytes per aggregated client, measured on
    the messages (all of an upload, and its LoRA arrays alone)."""
    return {
        "flower/clients_aggregated": float(len(replies)),
        "flower/clients_rejected": float(len(got.rejected)),
        "flower/clients_missing": float(len(got.missing)),
        "flower/bytes_up_per_client": float(np.mean([wire.message_bytes(r) for r in replies])),
        "flower/lora_bytes_up_per_client": float(
            np.mean([wire.record_bytes(r.content["update"], "lora") for r in replies])
        ),
        "flower/bytes_down_per_client": float(np.mean([got.down[u] for u in got.accepted])),
    }


def collect(grid, nodes, number, ids, message, expected, opts) -> Collected:
    """Send ``message(u)`` to every client ``u`` of ``ids`` that has a node and gate the
    replies (``wire.check_reply`` against ``expected``). A client that does not answer in
    ``opts.round_timeout_s`` or whose ClientApp fails is asked again, ``opts.retries``
    times; a rejected upload is not (the same inputs would give it again)."""
    pending = [u for u in ids if u in nodes]
    if len(pending) < len(ids):
        log(WARNING, "round %d: clients %s have no node", number, sorted(set(ids) - set(nodes)))
    accepted, rejected, down = {}, [], {}
    for attempt in range(opts.retries + 1):
        sent = {u: message(u) for u in pending}
        down |= {u: wire.message_bytes(m) for u, m in sent.items()}
        replies = exchange(grid, list(sent.values()), opts.round_timeout_s)
        # Sending stamps each message's id; an error reply may come from the SuperLink.
        client_of = {m.metadata.message_id: u for u, m in sent.items()}
        for reply in replies:
            u = client_of[reply.metadata.reply_to_message_id]
            reason = ("error reply: " + reply.error.reason if reply.has_error()
                      else wire.check_reply(reply.content, expected))  # fmt: skip
            if not reason:
                accepted[u] = reply
            elif reply.has_error():
                log(WARNING, "round %d: client %d: %s", number, u, reason)
            else:
                log(WARNING, "round %d: client %d rejected: %s", number, u, reason)
                rejected.append(u)
        pending = [u for u in pending if u not in accepted and u not in rejected]
        if not pending:
            break
        log(WARNING, "round %d: no reply from clients %s (attempt %d of %d)", number, pending,
            attempt + 1, opts.retries + 1)  # fmt: skip
    missing = sorted(set(ids) - set(accepted) - set(rejected))
    return Collected(accepted, sorted(rejected), missing, down)
