"""What a task provides to a run, and every task by name.

A task owns its data, its loss, its evaluation and its metrics; the round and the run
loop know none of them. A task kind is one module with ``NAMES`` (the task names it
serves) and ``make(name) -> Task``, plus one entry in :data:`KINDS`.

    task = tasks.get(config.data.task)
    train, validation = task.load(config)          # numpy arrays {key: [N, ...]}
    loss_fn = task.make_loss(model)                # (base, trainable, batch, key) -> (loss, weight)
    evaluator = task.make_evaluator(model, train, validation, holdout_index, config, rows)
    evaluator.global_eval(base, trainable, record=None) -> {metric: float}
    evaluator.local_eval(base, trainable_U, client_ids) -> {metric: mean over clients}
    evaluator.combine(evaluator.local_stats(base, trainable_U, client_ids))  # the same
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

Arrays = dict[str, np.ndarray]
# In arrays of some rows of a task's training split (a client's shard), each row's index in
# that split: a task that keeps its texts out of the arrays (generation) reads them by it.
ROW_KEY = "row"


class Program(NamedTuple):
    """A compiled step of a run, as a plan sees it: ``fn`` (jitted), the arguments it runs
    with (arrays or ``jax.ShapeDtypeStruct``: ``fn.trace(*args)`` compiles it ahead of
    time), how many times it runs per round (or per evaluation), and how many iterations
    its ``while`` loops take at most (decoding: the new tokens; a FLOP count needs it)."""

    name: str
    fn: Callable[..., Any]
    args: tuple
    calls: int
    loop_trips: int = 1


class Evaluator(NamedTuple):
    """``global_eval(base, trainable, record=None) -> {metric: float}`` on the validation
    split (a task that generates text passes ``record`` a list of dicts, its first
    generations, when given one; others ignore it);
    ``local_eval(base, trainable_U, client_ids) -> {metric: mean over clients}`` of each
    sampled client's own model on its held-out rows; ``programs(base, trainable_U) ->
    [Program]``: the evaluation's compiled steps at the shapes they run with (one
    evaluation, global and local; ``trainable_U``: ``[U, ...]`` stacked trees).

    Federated evaluation, which every task provides:
    ``local_stats(base, trainable_U, client_ids) -> [{name: array}]``, each client's
    sufficient statistics (counts and sums: what a Flower client sends back, never its
    rows), and ``combine(stats) -> {metric: float}``, which turns any clients' statistics
    into what ``local_eval`` reports for them. ``global_eval`` is ``None`` without a
    validation split."""

    global_eval: Callable[..., dict[str, float]] | None
    local_eval: Callable[..., dict[str, float]]
    local_stats: Callable[..., list[dict[str, np.ndarray]]]
    combine: Callable[[list[dict[str, np.ndarray]]], dict[str, float]]
    programs: Callable[..., list[Program]] = lambda base, trainable_U: []


class Task(NamedTuple):
    """One task of a run.

    name: canonical name.  main_metric: the metric that ranks runs (a key of the evaluator's
    result).  num_labels: outputs of the model's head (1 for regression).
    load: ``config -> (train, validation)``, numpy arrays ``{key: [N, ...]}`` with equal
      ``N`` per split; ``train["label"]`` (if any) is what label-based partitions split on.
      Raises ``errors.ConfigError`` naming the file, line or field on bad input.
    make_loss: ``model -> loss_fn(base, trainable, batch, dropout_key) -> (loss, weight)``:
      the mean training loss over the real rows of ``batch`` (``batch["mask"]: [b]``) and
      what it averages over (real examples, or tokens), which does not depend on the
      parameters; micro-batches (``clients.make_local_update``) weigh their means by it.
    make_evaluator: ``(model, train, validation, holdout_index, config, rows=None) ->
      Evaluator``; ``holdout_index[u]``: client ``u``'s held-out rows of ``train`` (whose
      :data:`ROW_KEY` array, if any, gives their indices in the task's training split);
      ``validation``: ``None`` for an evaluator of clients only; ``config``: the run's
      config (section ``eval`` and ``train.clients_per_round``); ``rows``: the run's
      ``packing.Rows`` (default: ``packing.decide`` of these splits).
    check: ``config -> None``: raises ``errors.BadValue`` whose ``param`` is the
      ``section.field`` of the first bad field the task reads (its data source, its own
      ``data.*`` and ``eval.*`` fields); ``config_check`` calls it before anything is built.
    loss_metric: a continuous metric of the evaluator that moves before ``main_metric`` does
      at small scale (generation: ``answer_loss``), shown beside it in the summary; "": none.
    """

    name: str
    main_metric: str
    num_labels: int
    load: Callable[[Any], tuple[Arrays, Arrays]]
    make_loss: Callable[[Any], Callable[..., Any]]
    make_evaluator: Callable[..., Evaluator]
    check: Callable[[Any], None] = lambda config: None
    loss_metric: str = ""
