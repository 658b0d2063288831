"""How a run reaches its clients: one interface, clients in this process or over Flower.

    clients = transport.in_process(...)                  # or flower.transport.make(...)
    uploads = clients.train(Start(...))                  # the sampled clients train
    metrics = clients.evaluate(ids, trainable, delta)    # they evaluate on held-out rows

``rounds.make_round`` calls ``train`` once a round and ``train.run`` calls ``evaluate``, so
the round loop, its metrics rows, its evaluation, summary, plots, checkpoints and resume
are the same whichever implementation the run holds. Two exist: :func:`in_process` here
(``rounds.train_clients`` on stacked clients, the task's evaluator on their rows) and
:func:`floranna_jax.flower.transport.make` (one Flower message per client, each trains and
evaluates on its own data file and sends back its upload or its sufficient statistics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from floranna_jax import packing, rounds

PyTree = Any


class Start(NamedTuple):
    """What the sampled clients of round ``number`` (1-based) train from: its key ``rkey``,
    their ids ``[U]``, start trees ``{"lora", "head"}`` ``[U, ...]`` and optimizer states
    ``[U, ...]``, and ``delta``, what the method has merged into the frozen base so far
    (``Method.base_delta``, ``{}`` for most methods)."""

    number: int
    rkey: Any
    ids: np.ndarray
    trainable: PyTree
    opt_state: PyTree
    delta: PyTree


class Uploads(NamedTuple):
    """What came back: the clients ``ids`` ``[U']`` whose uploads count (all sampled ones
    in process; over Flower those that answered and passed the gate), their uploads
    (``Method.upload`` of what they trained) and optimizer states ``[U', ...]``, mean loss,
    real steps, real examples and training sizes (the weights ``p_u``), each ``[U']``, and
    the transport's own row fields (``flower/*``). ``trained``: the trees the clients
    trained, where this process holds them (``None`` over Flower: each client keeps its
    own)."""

    ids: np.ndarray
    trainable: PyTree
    opt_state: PyTree
    loss: np.ndarray
    steps: np.ndarray
    examples: np.ndarray
    sizes: np.ndarray
    metrics: dict[str, float]
    trained: PyTree | None


class Clients(NamedTuple):
    """The clients of a run.

    train:    ``(Start) -> Uploads``; raises ``RoundError`` when the round cannot go on.
    evaluate: ``(ids, trainable, delta) -> {metric: mean over clients}``: clients ``ids``
              score ``trainable`` ``[U, ...]`` on the frozen base plus the method's
              ``delta`` (the delta a round's clients trained on, or the state's) on their
              held-out rows; ``trainable`` ``None``: each its own model of the round it
              just trained, on the base it trained on.
    """

    train: Callable[[Start], Uploads]
    evaluate: Callable[..., dict[str, float]]


def in_process(
    *, base_for: Callable, runner: Callable, evaluator, method, arrays: dict[str, np.ndarray],
    train_index: list[np.ndarray], local_steps: int, batch_size: int, row_length: int | None,
    micro_batches: int = 1,
) -> Clients:  # fmt: skip
    """Clients in this process: ``runner`` (``runners.make_runner``) trains them all at
    once on their rows ``arrays[train_index[u]]`` (``rounds.train_clients``); a non-finite
    loss or upload raises ``RoundError``. ``row_length``: the run's ``packing.Rows.train``
    (``None``: padded). ``evaluator``: the task's; ``evaluate`` is its ``local_eval``.
    ``base_for(delta)``: the frozen base with a method's merges (``merged_base.make``),
    asked right before each use and never kept, as its contract requires."""
    layout = packing.layout(arrays, row_length) if row_length else None
    sizes = np.asarray([len(i) for i in train_index], np.float64)

    def train(start: Start) -> Uploads:
        out = rounds.train_clients(
            runner, base_for(start.delta), start.trainable, start.opt_state, start.rkey,
            start.ids, arrays, train_index, local_steps, batch_size, layout, micro_batches,
        )  # fmt: skip
        uploads = method.upload(start.trainable, out.trainable)  # what leaves the clients
        rounds.check_uploads(start.number, start.ids, out.loss, uploads)
        return Uploads(start.ids, uploads, out.opt_state, out.loss, out.steps, out.examples,
                       sizes[start.ids], {}, out.trainable)  # fmt: skip

    def evaluate(ids, trainable, delta) -> dict[str, float]:
        return evaluator.local_eval(base_for(delta), trainable, ids)

    return Clients(train, evaluate)
