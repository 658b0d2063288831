"""The clients of a run over Flower: ``transport.Clients`` whose every client is a node.

``make(grid, config, opts, exp, method, evaluator)`` asks every node which client it is
(``query``), then serves ``train.run``'s round loop:

    train:    one ``train`` message per sampled client: its start without the method's
              private leaves, the run's packing row length, and the method's whole
              ``base_delta`` when it merges into W0. Replies pass ``wire.check_reply``;
              the accepted uploads get their private leaves from the start, their weights
              from the clients' ``num-examples``.
    evaluate: one ``evaluate`` message per client: the model to score (the global one,
              all its leaves, and the base delta), or none (each client scores the model it
              trained last, on the base it trained on). Each replies with its sufficient
              statistics on its held-out rows (``tasks.Evaluator.local_stats``: counts and
              sums, never rows), which the task's ``combine`` turns into the local metric
              an in-process run reports.

Faults: a client that does not answer within ``round-timeout-s`` (a killed SuperNode, a
raising ClientApp) is asked again ``retries`` times, then the round goes on without it; an
upload with a missing leaf, another shape or rank, another dtype or a non-finite value or
loss is rejected. Both are logged with the client and the reason, and counted in the
round's row (``flower/clients_missing``, ``flower/clients_rejected``). Fewer than
``min-replies`` accepted uploads stop the run with a ``RoundError``; nothing of that round
is saved. The row's ``flower/bytes_*_per_client`` are measured on the actual messages,
beside the method's formula (``server/bytes_up``, ``server/bytes_down``).
"""

from __future__ import annotations

import os
import time
from logging import INFO, WARNING
from typing import NamedTuple

import jax
import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from floranna_jax import runners, transport
from floranna_jax.errors import ConfigError, RoundError
from floranna_jax.flower import wire


def make(grid: Grid, config, opts, exp, method, evaluator) -> transport.Clients:
    """The run's clients over ``grid`` (``train.build``'s ``make_clients``, with the
    Flower-specific ``grid``, ``config`` and ``opts``, ``runconfig.Options``, bound)."""
    if config.client.persistent_opt_state:
        raise ConfigError("config field client.persistent_opt_state: not supported over Flower")
    _check_resumable(config, opts.workdir, exp.model.trainable, method)
    nodes = connect(grid, config.partition.num_clients, opts.connect_timeout_s)
    row_length = exp.rows.train or 0  # decided once, by the run: every client packs with it

    def shared(path):
        return not method.private(path)

    def train(start: transport.Start) -> transport.Uploads:
        number, ids = start.number, [int(u) for u in start.ids]
        starts = {u: jax.tree.map(lambda x, i=i: np.asarray(x[i]), start.trainable)
                  for i, u in enumerate(ids)}  # fmt: skip
        base = wire.to_record(start.delta, lambda path: True) if start.delta else None

        def message(u: int) -> Message:
            settings = {"round": number - 1, "client-id": u, "row-length": row_length}
            content = {"start": wire.to_record(starts[u], shared),
                       "config": ConfigRecord(settings)}  # fmt: skip
            if base is not None:
                content["base"] = base
            return Message(RecordDict(content), dst_node_id=nodes[u],
                           message_type=MessageType.TRAIN)  # fmt: skip

        expected = {k: v for k, v in wire.leaves(starts[ids[0]]).items()
                    if shared(wire.split(k))}  # fmt: skip
        got = collect(grid, nodes, f"round {number}", ids, message,
                      lambda content: wire.check_reply(content, expected), opts)  # fmt: skip
        return _uploads(number, ids, starts, got, opts)

    def evaluate(ids, trainable, delta) -> dict[str, float]:
        ids = [int(u) for u in ids]
        given = {} if trainable is None else {
            u: wire.to_record(jax.tree.map(lambda x, i=i: np.asarray(x[i]), trainable),
                              lambda path: True)
            for i, u in enumerate(ids)
        }  # fmt: skip
        delta_record = wire.to_record(delta, lambda path: True) if delta else None

        def message(u: int) -> Message:
            content = {"config": ConfigRecord({"client-id": u, "row-length": row_length})}
            if trainable is not None:
                content["model"] = given[u]
                if delta_record is not None:
                    content["base"] = delta_record
            return Message(RecordDict(content), dst_node_id=nodes[u],
                           message_type=MessageType.EVALUATE)  # fmt: skip

        got = collect(grid, nodes, "evaluation", ids, message, wire.check_stats, opts)
        if got.missing or got.rejected:
            log(WARNING, "evaluation: scored clients %s of %s", sorted(got.accepted), ids)
        stats = [wire.from_record(got.accepted[u].content["stats"]) for u in sorted(got.accepted)]
        return evaluator.combine(stats)

    return transport.Clients(train, evaluate)


def _check_resumable(config, workdir: str, trainable, method) -> None:
    """A method whose clients train leaves of their own (FedSA's ``B``) keeps them in each
    node's state of one Flower run, which a new run starts empty: resuming a checkpoint
    would restart them, so it raises ``ConfigError``."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
        return
    own = [k for k in wire.leaves(trainable)
           if method.private(wire.split(k)) and not method.frozen(wire.split(k))]  # fmt: skip
    if own:
        raise ConfigError(
            f"{ckpt_dir}: cannot resume {config.server.name} over Flower: its clients keep "
            f"their own {own[0]} (and the like) in the node state of one Flower run only, so a "
            "resumed run would restart them; use another workdir"
        )


def _uploads(number, ids, starts, got, opts) -> transport.Uploads:
    """The accepted replies of round ``number`` as ``transport.Uploads``; fewer than
    ``opts.min_replies`` raise ``RoundError``."""
    ok = sorted(got.accepted)
    if len(ok) < opts.min_replies:
        raise RoundError(f"round {number}: {len(ok)} accepted uploads (clients {ok}), "
                         f"fewer than min-replies={opts.min_replies}")  # fmt: skip
    if len(ok) < len(ids):
        log(WARNING, "round %d: aggregating clients %s of %s, weights renormalized over them",
            number, ok, ids)  # fmt: skip
    replies = [got.accepted[u] for u in ok]
    uploads = [wire.fill(starts[u], wire.from_record(r.content["update"]))
               for u, r in zip(ok, replies, strict=True)]  # fmt: skip
    m = {k: np.asarray([r.content["metrics"][k] for r in replies], np.float64)
         for k in ("loss", "steps", "examples", "num-examples")}  # fmt: skip
    return transport.Uploads(
        np.asarray(ok, np.int64), runners.stack(uploads), {}, m["loss"], m["steps"],
        m["examples"], m["num-examples"], _flower_metrics(got, replies), None,
    )  # fmt: skip


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


def _flower_metrics(got: Collected, replies: list[Message]) -> dict[str, float]:
    """Clients aggregated, rejected and missing; bytes per aggregated client, measured on
    the messages (all of an upload, and its LoRA arrays alone); the longest of the
    aggregated clients' own seconds on their message (``train-s``: the round's time less
    it is what the transport cost)."""
    return {
        "flower/client_train_s_max": max(float(r.content["metrics"]["train-s"]) for r in replies),
        "flower/clients_aggregated": float(len(replies)),
        "flower/clients_rejected": float(len(got.rejected)),
        "flower/clients_missing": float(len(got.missing)),
        "flower/bytes_up_per_client": float(np.mean([wire.message_bytes(r) for r in replies])),
        "flower/lora_bytes_up_per_client": float(
            np.mean([wire.record_bytes(r.content["update"], "lora") for r in replies])
        ),
        "flower/bytes_down_per_client": float(np.mean([got.down[u] for u in got.accepted])),
    }


def collect(grid, nodes, label, ids, message, check, opts) -> Collected:
    """Send ``message(u)`` to every client ``u`` of ``ids`` that has a node and gate the
    replies (``check(content)``: why a reply is rejected, or ``""``); ``label`` (``"round
    3"``) starts every line logged. A client that does not answer in
    ``opts.round_timeout_s`` or whose ClientApp fails is asked again, ``opts.retries``
    times; a rejected reply is not (the same inputs would give it again)."""
    pending = [u for u in ids if u in nodes]
    if len(pending) < len(ids):
        log(WARNING, "%s: clients %s have no node", label, sorted(set(ids) - set(nodes)))
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
                      else check(reply.content))  # fmt: skip
            if not reason:
                accepted[u] = reply
            elif reply.has_error():
                log(WARNING, "%s: client %d: %s", label, u, reason)
            else:
                log(WARNING, "%s: client %d rejected: %s", label, u, reason)
                rejected.append(u)
        pending = [u for u in pending if u not in accepted and u not in rejected]
        if not pending:
            break
        log(WARNING, "%s: no reply from clients %s (attempt %d of %d)", label, pending,
            attempt + 1, opts.retries + 1)  # fmt: skip
    missing = sorted(set(ids) - set(accepted) - set(rejected))
    return Collected(accepted, sorted(rejected), missing, down)
