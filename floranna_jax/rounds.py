"""One federated round: sample clients, build their batches, train them, aggregate.

``round_fn = make_round(...)``; ``state, out = round_fn(state)`` runs round
``state.round + 1`` (1-based, as in ``metrics.jsonl``) and returns the state after it. The
heavy parts are compiled once for the whole run: the client runner (``runners.make_runner``,
one jit over ``[U, S, b, ...]``), the base merge and the server step (``server.build``);
the rest is host-side bookkeeping. The round itself is not one jit on purpose: batches
are gathered from host numpy (clients differ in size), and the finiteness checks run
eagerly between the phases so that a failure names the round, the client and the layer.

The round knows no method, no task and no transport: the clients are reached through
``transport.Clients`` (in this process or over Flower). What a method does to the state
(frozen factors, personal factors, merges into the base, history) lives in
``RoundState.method`` and the method's pure functions (:mod:`floranna_jax.server.method`);
what the loss is lives in the runner the caller built from the task. Every key comes from
:mod:`floranna_jax.keys`.

Batches: a client shuffles its training indices and takes the first ``S * b`` of them
(``S`` local steps, ``b`` examples each); a client with fewer examples goes on with a
fresh shuffle (epochs), so every step of a client with data is a full, real step and
no compute is spent on masked steps. Only a client without data (and the padding of the
clients axis) has ``step_mask`` ``[U, S]`` zero, which changes nothing. Tokens are packed (the
``b`` examples of a step share ``R`` rows, :mod:`floranna_jax.packing`) or padded. The
trainable head is averaged with weights ``p_u = n_u / sum n`` (client training sizes)
by every method (``Method.aggregate_head``; DP-FedAvg, ``server.dp``, weighs clients
equally and adds noise). What leaves the clients is ``Method.upload`` of what they trained,
applied where they train (``transport``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from floranna_jax import distributed, keys, packing, runners, server, transport
from floranna_jax.errors import RoundError

PyTree = Any


class RoundState(NamedTuple):
    """Everything that changes between rounds (and therefore everything a checkpoint holds).

    round: int64 scalar, rounds completed.  key: uint32 key data of the root key.
    lora: global factors ``{layer: {"A": [r, d_in], "B": [d_out, r]}}``.  head: global head.
    method: the method's state (``server.Method.init``), ``{}`` for stateless methods.
    opt_state: ``[N, ...]`` client optimizer states if persistent, else ``{}``.
    bytes_up, bytes_down: int64 scalars, cumulative communication.
    """

    round: np.ndarray
    key: np.ndarray
    lora: PyTree
    head: PyTree
    method: PyTree
    opt_state: PyTree
    bytes_up: np.ndarray
    bytes_down: np.ndarray


class RoundOutput(NamedTuple):
    """What a round reports: ids ``[U]`` of the clients it aggregated, their trained
    trainable trees ``[U, ...]`` (``None`` where the clients keep them: over Flower), the
    ``delta`` of the base they trained on (``Method.base_delta`` at the round's start; the
    base itself is rebuilt from it, :mod:`floranna_jax.merged_base`), and host metrics."""

    client_ids: np.ndarray
    trainable: PyTree
    delta: PyTree
    metrics: dict[str, float]


def init_state(
    seed: int, trainable: PyTree, method: server.Method, num_clients: int, opt=None,
    abstract: bool = False,
) -> RoundState:  # fmt: skip
    """Round-0 state from the freshly built model's trainable tree ``{"lora", "head"}``.

    ``opt``: the client optimizer when optimizer states persist across rounds, else None.
    ``abstract``: the method's state and the optimizer states as ``jax.ShapeDtypeStruct``
    (a plan: the dense merges of a 70B model are never allocated).
    """
    make = jax.eval_shape if abstract else (lambda f, x: f(x))
    opt_state = {}
    if opt is not None:
        opt_state = make(lambda t: runners.broadcast(opt.init(t), num_clients), trainable)
    return RoundState(
        round=np.asarray(0, np.int64),
        key=np.asarray(jax.random.key_data(keys.root(seed))),
        lora=trainable["lora"],
        head=trainable["head"],
        method=make(lambda lora: method.init(lora, num_clients), trainable["lora"]),
        opt_state=opt_state,
        bytes_up=np.asarray(0, np.int64),
        bytes_down=np.asarray(0, np.int64),
    )


def sample_clients(rkey: jax.Array, num_clients: int, clients_per_round: int) -> np.ndarray:
    """``clients_per_round`` distinct ids, sorted, drawn from the round's sampling key."""
    perm = jax.random.permutation(keys.sample_key(rkey), num_clients)
    return np.sort(np.asarray(perm)[:clients_per_round])


def client_order(
    index: np.ndarray, data_key: jax.Array, steps: int, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """One client's examples ``take [S, b]`` and ``real [S, b]`` (False only for a client
    without data: row 0, padding). The examples come in epochs: a permutation of ``index``
    drawn from ``data_key``, then a fresh one, and so on until ``S * b`` are taken, so a
    client with any data never runs a masked step (each epoch sees every example once)."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(data_key)).tolist())
    index = np.asarray(index, np.int64)
    need = steps * batch
    if len(index) == 0:
        return np.zeros((steps, batch), np.int64), np.zeros((steps, batch), bool)
    epochs = [rng.permutation(index) for _ in range(-(-need // len(index)))]
    take = np.concatenate(epochs)[:need]
    return take.reshape(steps, batch), np.ones((steps, batch), bool)


def client_batches(
    rkey: jax.Array,
    ids: np.ndarray,
    arrays,
    train_index,
    steps: int,
    batch: int,
    packed: tuple[np.ndarray, int] | None = None,
    micro: int = 1,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Batches ``[U, S, ...]`` and ``step_mask [U, S]`` of the sampled clients, each
    client's examples drawn by :func:`client_order` from its data key; padded, or with
    ``packed = (token lengths, T)`` packed in rows of ``T`` tokens, one row count for the
    whole round (:func:`packing.batches`). ``micro > 1``: each step's ``b`` examples as
    ``micro`` micro-batches ``[U, S, micro, b / micro, ...]``, each packed on its own, so
    an example never spans two micro-batches."""
    orders = [
        client_order(train_index[u], keys.data_key(keys.client_key(rkey, u)), steps, batch)
        for u in ids
    ]
    take, real = (np.concatenate([o[i] for o in orders]) for i in (0, 1))  # [U * S, b]
    lead = (len(ids), steps) if micro == 1 else (len(ids), steps, micro)
    take, real = take.reshape(-1, batch // micro), real.reshape(-1, batch // micro)
    flat = packing.batches(arrays, take, real, packed)
    if packed is not None:  # each process packs its own clients: all take the most rows
        flat = packing.pad_rows(flat, distributed.max_over_processes(packing.rows(flat)))
    out = {k: v.reshape(*lead, *v.shape[1:]) for k, v in flat.items()}
    return out, out["mask"].reshape(len(ids), steps, -1).max(axis=2)


def first_nonfinite(tree: PyTree, stacked: bool = True) -> tuple[int, str] | None:
    """``(client, leaf path)`` of the first non-finite entry of a stacked ``[U, ...]`` tree
    (``stacked=False``: of a plain tree, client 0)."""
    if not stacked:
        tree = jax.tree.map(lambda x: jnp.asarray(x)[None], tree)
    flags = jax.tree_util.tree_flatten_with_path(
        jax.tree.map(lambda x: jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))), tree)
    )[0]
    for path, ok in flags:
        bad = np.flatnonzero(~np.asarray(ok))
        if bad.size:
            return int(bad[0]), jax.tree_util.keystr(path)
    return None


def check_uploads(round_number: int, ids: np.ndarray, loss: np.ndarray, trainable) -> None:
    """Non-finite training loss or upload raises :class:`RoundError` naming round
    (1-based), client and layer."""
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
        u = int(bad[0])
        raise RoundError(
            f"round {round_number}: client {int(ids[u])} has non-finite training loss {loss[u]}"
        )
    found = first_nonfinite(trainable)
    if found is not None:
        u, where = found
        raise RoundError(
            f"round {round_number}: client {int(ids[u])} uploaded a non-finite update in "
            f"layer {where}"
        )


def check_aggregate(round_number: int, agg: server.Aggregate, method_state: PyTree) -> None:
    """A non-finite global adapter, merge, method state or scalar metric raises
    :class:`RoundError` naming the round (1-based) and the layer or metric, so that the
    round's state is never checkpointed."""
    for what, tree in (("global adapter", agg.lora), ("merge", agg.merge),
                       ("method state", method_state)):  # fmt: skip
        found = first_nonfinite(tree, stacked=False)
        if found is not None:
            raise RoundError(
                f"round {round_number}: the server produced a non-finite {what} in {found[1]}"
            )
    for k, v in agg.metrics.items():
        if np.ndim(v) == 0 and isinstance(v, float) and not np.isfinite(v):
            raise RoundError(f"round {round_number}: server metric {k} is {v}")


def start_trainable(state: RoundState, method, rkey: jax.Array, ids: np.ndarray) -> PyTree:
    """What the sampled clients start training from: ``{"lora", "head"}``, each ``[U, ...]``."""
    start = method.client_start(state.lora, state.method, ids, keys.init_key(rkey))
    return {"lora": start, "head": runners.broadcast(state.head, len(ids))}


def fresh_opt_state(opt, trainable: PyTree) -> PyTree:
    """``[U, ...]`` fresh optimizer states for stacked trainable trees ``[U, ...]``."""
    U = len(jax.tree.leaves(trainable)[0])
    return runners.broadcast(opt.init(jax.tree.map(lambda x: x[0], trainable)), U)


def _start(state, method, rkey, ids, opt, persistent: bool) -> tuple[PyTree, PyTree]:
    """The sampled clients' trainable trees ``[U, ...]`` and optimizer states."""
    trainable = start_trainable(state, method, rkey, ids)
    if persistent:
        return trainable, jax.tree.map(lambda x: x[ids], state.opt_state)
    return trainable, fresh_opt_state(opt, trainable)


class Trained(NamedTuple):
    """What ``U`` clients computed: trained trees and optimizer states ``[U, ...]``, mean
    loss ``[U]``, real steps ``[U]`` and real examples ``[U]`` (host numpy)."""

    trainable: PyTree
    opt_state: PyTree
    loss: np.ndarray
    steps: np.ndarray
    examples: np.ndarray


def train_clients(
    runner, base, trainable, opt_state, rkey, ids, arrays, train_index, steps, batch, layout,
    micro: int = 1,
) -> Trained:  # fmt: skip
    """Clients ``ids`` train from ``trainable`` ``[U, ...]`` on their batches of the round
    ``rkey`` (:func:`client_batches`, ``micro`` micro-batches per step; ``train_index[u]``:
    client ``u``'s rows of ``arrays``)."""
    U = len(ids)
    # This process's block of the clients axis (all of it with one process); rows past U
    # pad the axis of several processes with copies of the last client that take no step.
    rows = runners.local_rows(U)
    mine = np.minimum(rows, U - 1)
    batches, step_mask = client_batches(
        rkey, ids[mine], arrays, train_index, steps, batch, layout, micro
    )
    step_mask = np.where(rows[:, None] < U, step_mask, 0).astype(step_mask.dtype)
    if jax.process_count() > 1:
        trainable, opt_state = jax.tree.map(lambda x: x[mine], (trainable, opt_state))
    out = runner(base, trainable, opt_state, batches, step_mask, keys.dropout_keys(rkey, ids[mine]))
    if jax.process_count() > 1:  # every process gets every row back: drop the padding
        out = jax.tree.map(lambda x: x[:U], out)
    trained, opt_state, cm = out
    # Examples each client trained on, repeats of a later epoch included (what its batches'
    # masks sum to, on any process): S * b for a client with data, 0 without.
    examples = np.asarray([len(train_index[u]) > 0 for u in ids], np.float32) * steps * batch
    return Trained(trained, opt_state, np.asarray(cm["loss"]), np.asarray(cm["steps"]), examples)


def client_weights(sizes: np.ndarray) -> jax.Array:
    """``p_u = n_u / sum n`` (float32) from the clients' training sizes ``[U]``."""
    sizes = np.asarray(sizes, np.float64)
    return jnp.asarray(sizes / max(sizes.sum(), 1.0), jnp.float32)


def server_step(
    number: int, state: RoundState, server_: server.Server, ids, p, trained, opt_state
) -> tuple[RoundState, server.Aggregate]:
    """Aggregate the uploads ``trained`` ``{"lora", "head"}`` ``[U, ...]`` of clients ``ids``
    with weights ``p``; the state after round ``number`` (1-based) and the aggregate.
    Raises :class:`RoundError` when the server's output is not finite."""
    agg = server_.aggregate(trained["lora"], p, state.method)
    new_state = _next_state(state, server_.method, ids, p, trained, opt_state, agg)
    check_aggregate(number, agg, new_state.method)
    return new_state, agg


def _next_state(state, method, ids, p, trained, opt_state, agg) -> RoundState:
    """The state after the round: the method's next adapter, state and head, optimizer
    states and bytes."""
    lora_, method_state = method.apply(state.method, agg, ids, trained["lora"])
    head = method.aggregate_head(state.method, trained["head"], p)
    opts = state.opt_state
    if opts:  # persistent optimizer states
        opts = jax.tree.map(lambda all_, new: all_.at[ids].set(new), opts, opt_state)
    # The estimator reports bytes per client; the run counts all U sampled clients.
    up, down = (len(ids) * int(agg.metrics.get(k, 0)) for k in ("bytes_up", "bytes_down"))
    return RoundState(
        round=np.asarray(int(state.round) + 1, np.int64),
        key=state.key,
        lora=lora_,
        head=head,
        method=method_state,
        opt_state=opts,
        bytes_up=np.asarray(int(state.bytes_up) + up, np.int64),
        bytes_down=np.asarray(int(state.bytes_down) + down, np.int64),
    )


def make_round(
    *,
    clients_: transport.Clients,
    opt,
    server_: server.Server,
    num_clients: int,
    clients_per_round: int,
    persistent_opt_state: bool = False,
    compare: Callable | None = None,
) -> Callable[[RoundState], tuple[RoundState, RoundOutput]]:
    """Build ``round_fn(state) -> (state, RoundOutput)`` for one run.

    ``clients_``: how the sampled clients are reached (``transport.Clients``: in this
    process, or over Flower). ``opt``: the clients' optimizer (their fresh states).
    ``server_``: the run's method, built once (``server.build``).
    ``compare``: ``server.make_compare(labels)``, whose ``rho_rel`` on this round's very
    uploads is logged as ``compare/<label>/rho_rel`` (the run itself still uses its method).
    """
    method = server_.method

    def round_fn(state: RoundState) -> tuple[RoundState, RoundOutput]:
        number, t0 = int(state.round) + 1, time.perf_counter()
        rkey, ids = plan(state, num_clients, clients_per_round)
        trainable, opt_state = _start(state, method, rkey, ids, opt, persistent_opt_state)
        delta = method.base_delta(state.method)
        up = clients_.train(transport.Start(number, rkey, ids, trainable, opt_state, delta))
        t1 = time.perf_counter()

        p = client_weights(up.sizes)
        new_state, agg = server_step(number, state, server_, up.ids, p, up.trainable,
                                     up.opt_state)  # fmt: skip
        metrics = {
            **train_metrics(up.loss, up.steps, up.examples),
            **server_metrics(agg.metrics),
            "comm/bytes_up_total": float(new_state.bytes_up),
            "comm/bytes_down_total": float(new_state.bytes_down),
            **up.metrics,
            "time/clients_s": t1 - t0,
            "time/server_s": time.perf_counter() - t1,
        }
        if compare is not None:
            for label, rho_rel in compare(up.trainable["lora"], p).items():
                metrics[f"compare/{label}/rho_rel"] = rho_rel
        return new_state, RoundOutput(up.ids, up.trained, delta, metrics)

    return round_fn


def plan(state: RoundState, num_clients: int, clients_per_round: int):
    """``(rkey, ids)``: the key of round ``state.round + 1`` and its sampled client ids."""
    rkey = keys.round_key(state.key, int(state.round))
    return rkey, sample_clients(rkey, num_clients, clients_per_round)


def train_metrics(loss: np.ndarray, steps: np.ndarray, examples: np.ndarray) -> dict[str, float]:
    """The round's training loss (weighted by real examples), mean real steps, examples;
    summed in float64, so that clients' figures that arrived as float64 (over Flower) give
    the same row."""
    loss, examples = np.asarray(loss, np.float64), np.asarray(examples, np.float64)
    return {
        "train/loss": float(np.sum(loss * examples) / max(examples.sum(), 1.0)),
        "train/real_steps": float(np.mean(steps)),
        "train/examples": float(examples.sum()),
    }


def server_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalar server metrics as floats under ``server/`` (per-layer arrays are dropped)."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.ndim == 0 and np.issubdtype(a.dtype, np.number):
            out[f"server/{k}"] = float(a)
    return out
