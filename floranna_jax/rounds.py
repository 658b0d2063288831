"""One federated round: sample clients, build their batches, train them, aggregate.

``round_fn = make_round(...)``; ``state, out = round_fn(state)`` runs round
``state.round`` and returns the state after it. The heavy parts are compiled once for
the whole run: the client runner (``clients.make_runner``, one jit over ``[U, S, b, ...]``),
the base merge and the server estimator; the rest is host-side bookkeeping. The round
itself is not one jit on purpose: batches are gathered from host numpy (clients differ in
size), and the finiteness checks run eagerly between the phases so that a failure names
the round, the client and the layer.

Randomness (STYLE.md): ``round_key = fold_in(root, round)``; the sampled clients come
from ``fold_in(round_key, SAMPLE_TAG)``, FLoRA's fresh adapters from
``fold_in(round_key, INIT_TAG)``; client ``u`` gets ``client_key = fold_in(round_key, u)``,
whose ``fold_in(., 0)`` drives its dropout and ``fold_in(., 1)`` the order of its data.
So which clients train, on which examples, in which order, is a function of
``(seed, round, client)`` only: a resumed run replays exactly the same batches.

Batches: a client shuffles its training indices and takes the first ``S * b`` of them
(``S`` local steps, ``b`` examples each). A client with fewer examples gets fewer real
steps: padded steps are masked by ``step_mask`` ``[U, S]`` (they change nothing) and the
last partial batch by the per-example ``"mask"`` ``[U, S, b]``.

Method state (kept in :class:`RoundState`, all of it checkpointed):
  ffa       the global ``A`` never changes (clients' ``A`` is frozen in local updates).
  fedsa     ``personal_B [N, d_out, r]`` for every client: a client starts from the global
            ``A`` and its own ``B``; after the round its trained ``B`` is stored.
  flora     ``base_delta [d_in, d_out]`` accumulates ``s * merge^T``; clients restart every
            round from a fresh adapter (``A`` random, ``B = 0``).
  fedex     ``base_delta`` accumulates the residual ``s * (dW_ideal - B A)^T``.
The effective frozen base is ``pretrained base + base_delta``. The trainable head is
averaged with weights ``p_u = n_u / sum n`` (client training sizes) for every method.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from floranna_jax import clients, lora, models, server

SAMPLE_TAG = 2**31 - 1  # fold_in tags above any client id: the round's non-client draws
INIT_TAG = 2**31 - 2
MERGING = ("flora", "fedex")  # estimators that fold a dense update into the frozen base
# Estimators that ``compare=`` can also run on each round's uploads: label -> (name, hparams).
COMPARISONS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedit": ("fedit", {}),
    "svd": ("svd", {}),
    "floranna_layer": ("floranna", {"scope": "layer"}),
    "floranna_model": ("floranna", {"scope": "model"}),
}
PyTree = Any


class RoundState(NamedTuple):
    """Everything that changes between rounds (and therefore everything a checkpoint holds).

    round: int64 scalar, rounds completed.  key: uint32 key data of the root key.
    lora: global factors ``{layer: {"A": [r, d_in], "B": [d_out, r]}}``.  head: global head.
    personal_B: fedsa ``{layer: [N, d_out, r]}``, else ``{}``.
    base_delta: flora/fedex ``{layer: [d_in, d_out]}`` kernel deltas incl. scale, else ``{}``.
    opt_state: ``[N, ...]`` client optimizer states if persistent, else ``{}``.
    bytes_up, bytes_down: int64 scalars, cumulative communication.
    """

    round: np.ndarray
    key: np.ndarray
    lora: PyTree
    head: PyTree
    personal_B: PyTree
    base_delta: PyTree
    opt_state: PyTree
    bytes_up: np.ndarray
    bytes_down: np.ndarray


class RoundOutput(NamedTuple):
    """What a round reports: ids ``[U]`` of the sampled clients, their trained trainable
    trees ``[U, ...]``, the base they trained on, and host metrics (floats)."""

    client_ids: np.ndarray
    trainable: PyTree
    base: PyTree
    metrics: dict[str, float]


def make_loss_fn(model, is_regression: bool) -> Callable:
    """``loss_fn(base, trainable, batch, dropout_key)``: mean cross-entropy (MSE for
    regression) over the real examples of ``batch`` (``batch["mask"]: [b]``)."""

    def loss_fn(base, trainable, batch, dropout_key):
        logits = model.apply(base, trainable, batch, deterministic=False, dropout_key=dropout_key)
        logits = logits.astype(jnp.float32)
        if is_regression:
            per_example = (logits[:, 0] - batch["label"].astype(jnp.float32)) ** 2
        else:
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        mask = batch["mask"].astype(jnp.float32)
        return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return loss_fn


def init_state(
    seed: int, trainable: PyTree, *, method: str, num_clients: int, opt=None
) -> RoundState:
    """Round-0 state from the freshly built model's trainable tree ``{"lora", "head"}``.

    ``opt``: the client optimizer when optimizer states persist across rounds, else None.
    """
    glob = trainable["lora"]
    personal = {}
    if method == "fedsa":
        personal = {
            n: jnp.zeros((num_clients, *f["B"].shape), f["B"].dtype) for n, f in glob.items()
        }
    delta = {}
    if method in MERGING:
        delta = {
            n: jnp.zeros((f["A"].shape[1], f["B"].shape[0]), f["A"].dtype) for n, f in glob.items()
        }
    opt_state = {} if opt is None else clients.broadcast(opt.init(trainable), num_clients)
    return RoundState(
        round=np.asarray(0, np.int64),
        key=np.asarray(jax.random.key_data(jax.random.key(seed))),
        lora=glob,
        head=trainable["head"],
        personal_B=personal,
        base_delta=delta,
        opt_state=opt_state,
        bytes_up=np.asarray(0, np.int64),
        bytes_down=np.asarray(0, np.int64),
    )


def round_key(state: RoundState) -> jax.Array:
    """``fold_in(root, round)`` as a typed key."""
    return jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(state.key)), int(state.round))


def sample_clients(key: jax.Array, num_clients: int, clients_per_round: int) -> np.ndarray:
    """``clients_per_round`` distinct ids, sorted, drawn from ``fold_in(key, SAMPLE_TAG)``."""
    perm = jax.random.permutation(jax.random.fold_in(key, SAMPLE_TAG), num_clients)
    return np.sort(np.asarray(perm)[:clients_per_round])


def make_batches(
    arrays: dict[str, np.ndarray], index: np.ndarray, data_key: jax.Array, steps: int, batch: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One client's batches ``{k: [S, b, ...]}`` (plus ``"mask": [S, b]``) and ``step_mask [S]``.

    The first ``S * b`` of a permutation of ``index`` drawn from ``data_key``; the rest is
    padding (row 0, masked).
    """
    rng = np.random.default_rng(np.asarray(jax.random.key_data(data_key)).tolist())
    order = rng.permutation(np.asarray(index, np.int64))[: steps * batch]
    real = np.arange(steps * batch) < len(order)
    take = np.zeros(steps * batch, np.int64)
    take[: len(order)] = order
    out = {k: v[take].reshape(steps, batch, *v.shape[1:]) for k, v in arrays.items()}
    out["mask"] = real.reshape(steps, batch).astype(np.float32)
    return out, out["mask"].max(axis=1)


def first_nonfinite(tree: PyTree) -> tuple[int, str] | None:
    """``(client, leaf path)`` of the first non-finite entry of a stacked ``[U, ...]`` tree."""
    flags = jax.tree_util.tree_flatten_with_path(
        jax.tree.map(lambda x: jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))), tree)
    )[0]
    for path, ok in flags:
        bad = np.flatnonzero(~np.asarray(ok))
        if bad.size:
            return int(bad[0]), jax.tree_util.keystr(path)
    return None


def _check_finite(round_index: int, ids: np.ndarray, loss: np.ndarray, trainable: PyTree) -> None:
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
        u = int(bad[0])
        raise ValueError(
            f"round {round_index}: client {int(ids[u])} has non-finite training loss {loss[u]}"
        )
    found = first_nonfinite(trainable)
    if found is not None:
        u, where = found
        raise ValueError(
            f"round {round_index}: client {int(ids[u])} uploaded a non-finite update in "
            f"layer {where}"
        )


def make_effective_base(model) -> Callable:
    """Jitted ``(base, base_delta) -> base + base_delta`` (identity when there is no delta)."""

    @jax.jit
    def merge(base, delta):
        return models.merge_into_base(base, {n: d.T for n, d in delta.items()}, 1.0)

    return lambda base, delta: merge(base, delta) if delta else base


def client_batches(
    rkey: jax.Array, ids: np.ndarray, arrays, train_index, steps: int, batch: int
) -> tuple[dict[str, np.ndarray], np.ndarray, jax.Array]:
    """Batches ``[U, S, b, ...]``, ``step_mask [U, S]`` and runner keys ``[U]`` of the
    sampled clients: ``client_key = fold_in(rkey, u)``; data from ``fold_in(client_key, 1)``,
    dropout from ``fold_in(client_key, 0)``."""
    ckeys = [jax.random.fold_in(rkey, int(u)) for u in ids]
    data = [
        make_batches(arrays, train_index[u], jax.random.fold_in(k, 1), steps, batch)
        for u, k in zip(ids, ckeys, strict=True)
    ]
    batches = {k: np.stack([d[0][k] for d in data]) for k in data[0][0]}
    step_mask = np.stack([d[1] for d in data])
    return batches, step_mask, jnp.stack([jax.random.fold_in(k, 0) for k in ckeys])


def client_start(
    state: RoundState, rkey: jax.Array, ids: np.ndarray, method: str, opt, persistent: bool
) -> tuple[PyTree, PyTree, PyTree]:
    """``(start_lora, trainable_U, opt_state_U)``: what the sampled clients start from.

    FLoRA restarts from a fresh adapter; FedSA clients take their own ``B``; optimizer
    states are fresh unless persistent.
    """
    U = len(ids)
    start = state.lora
    if method == "flora":
        start = _fresh_like(jax.random.fold_in(rkey, INIT_TAG), state.lora)
    trainable = clients.broadcast({"lora": start, "head": state.head}, U)
    if method == "fedsa":
        for n, B in state.personal_B.items():
            trainable["lora"][n]["B"] = B[ids]
    if persistent:
        opt_state = jax.tree.map(lambda x: x[ids], state.opt_state)
    else:
        opt_state = clients.broadcast(opt.init(jax.tree.map(lambda x: x[0], trainable)), U)
    return start, trainable, opt_state


def next_state(
    state: RoundState, method: str, ids, p: jax.Array, trained, opt_state, agg, s: float
) -> RoundState:
    """The state after the round: the aggregate's factors (FFA keeps its ``A``), the
    p-weighted head, FedSA's stored ``B``, merged deltas, optimizer states and bytes."""
    head = jax.tree.map(
        lambda h: jnp.tensordot(p, h.astype(jnp.float32), 1).astype(h.dtype), trained["head"]
    )
    lora_ = agg.lora
    if method == "ffa":  # A is never sent: the shared init stays bit-identical
        lora_ = {n: {"A": state.lora[n]["A"], "B": f["B"]} for n, f in agg.lora.items()}
    personal = state.personal_B
    if method == "fedsa":
        personal = {n: B.at[ids].set(trained["lora"][n]["B"]) for n, B in personal.items()}
    delta = state.base_delta
    if method in MERGING:
        delta = {n: d + s * agg.merge[n].T.astype(d.dtype) for n, d in delta.items()}
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
        personal_B=personal,
        base_delta=delta,
        opt_state=opts,
        bytes_up=np.asarray(int(state.bytes_up) + up, np.int64),
        bytes_down=np.asarray(int(state.bytes_down) + down, np.int64),
    )


def make_round(
    *,
    model,
    runner: Callable,
    opt: optax.GradientTransformation,
    method: str,
    hparams: dict[str, Any],
    arrays: dict[str, np.ndarray],
    train_index: list[np.ndarray],
    local_steps: int,
    batch_size: int,
    clients_per_round: int,
    persistent_opt_state: bool = False,
    previous_lora_hparam: str | None = None,
    compare: tuple[str, ...] = (),
) -> Callable[[RoundState], tuple[RoundState, RoundOutput]]:
    """Build ``round_fn(state) -> (state, RoundOutput)`` for one run.

    ``arrays``: the training split ``{key: [N_examples, ...]}``; ``train_index[u]``: client
    ``u``'s rows. ``previous_lora_hparam``: the estimator hparam that receives the previous
    global adapter (floranna with ``combine="deltas"``), or None. ``compare``: labels of
    :data:`COMPARISONS` whose ``rho_rel`` on this round's very uploads is logged as
    ``compare/<label>/rho_rel`` (the run itself still uses ``method``): estimators compared
    on identical client factors, free of the differences their own histories would cause.
    """
    num_clients = len(train_index)
    sizes = np.asarray([len(i) for i in train_index], np.float64)
    s = float(model.lora_scale)
    effective_base = make_effective_base(model)

    def round_fn(state: RoundState) -> tuple[RoundState, RoundOutput]:
        r, t0 = int(state.round), time.perf_counter()
        rkey = round_key(state)
        ids = sample_clients(rkey, num_clients, clients_per_round)
        batches, step_mask, keys = client_batches(
            rkey, ids, arrays, train_index, local_steps, batch_size
        )
        start, trainable, opt_state = client_start(
            state, rkey, ids, method, opt, persistent_opt_state
        )
        base = effective_base(model.base, state.base_delta)
        trained, opt_state, cm = runner(base, trainable, opt_state, batches, step_mask, keys)
        loss, steps = np.asarray(cm["loss"]), np.asarray(cm["steps"])
        _check_finite(r, ids, loss, trained)
        t1 = time.perf_counter()

        p = jnp.asarray(sizes[ids] / max(sizes[ids].sum(), 1.0), jnp.float32)  # p_u = n_u / n
        hp = dict(hparams)
        if previous_lora_hparam is not None:
            hp[previous_lora_hparam] = start
        agg = server.aggregate(method, trained["lora"], p, **hp)
        new_state = next_state(state, method, ids, p, trained, opt_state, agg, s)
        metrics = {
            "train/loss": float(np.mean(loss)),
            "train/real_steps": float(np.mean(steps)),
            **_server_metrics(agg.metrics),
            "comm/bytes_up_total": float(new_state.bytes_up),
            "comm/bytes_down_total": float(new_state.bytes_down),
            "time/clients_s": t1 - t0,
            "time/server_s": time.perf_counter() - t1,
        }
        for label in compare:
            name, hp_c = COMPARISONS[label]
            m = server.aggregate(name, trained["lora"], p, **hp_c).metrics
            metrics[f"compare/{label}/rho_rel"] = float(m["rho_rel"])
        return new_state, RoundOutput(ids, trained, base, metrics)

    return round_fn


def _fresh_like(key: jax.Array, tree: PyTree) -> PyTree:
    """Fresh adapters (``A`` random, ``B = 0``) shaped like ``tree``."""
    shapes = {n: (f["A"].shape[1], f["B"].shape[0]) for n, f in tree.items()}
    rank = next(iter(tree.values()))["A"].shape[0]
    fresh = lora.init_tree(key, shapes, rank)
    return {n: {k: v.astype(tree[n][k].dtype) for k, v in fresh[n].items()} for n in tree}


def _server_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalar server metrics as floats under ``server/`` (per-layer arrays are dropped)."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.ndim == 0 and np.issubdtype(a.dtype, np.number):
            out[f"server/{k}"] = float(a)
    return out
