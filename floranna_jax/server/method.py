"""A federated method: its server estimator plus what it does to the round state.

Like an optax ``GradientTransformation``, a method is a NamedTuple of pure functions,
built by ``make_<name>(**hparams)`` (one module each in this package). The round
(:mod:`floranna_jax.rounds`) calls them and knows no method by name:

    state = method.init(lora, num_clients)                  # round 0, checkpointed
    start = method.client_start(lora, state, ids, key)      # [U, ...] what clients train from
    method.frozen(path)                                     # leaves clients never train
    method.private(path)                                    # leaves that never leave a client
    upload = method.upload(start, trained)                  # [U, ...] what leaves the clients
    lora, merge, metrics = method.aggregate(uploads, p, state)       # jittable
    lora, state = method.apply(state, aggregate, ids, uploads)       # the next global adapter
    head = method.aggregate_head(state, heads, p)           # the next global head
    method.base_delta(state)                                # folded into the frozen base

Shapes (METHOD.md notation): ``lora`` is ``layer -> {"A": [r, d_in], "B": [d_out, r]}``;
``uploads`` and ``start`` the same with a leading client axis ``[U, ...]``; ``ids: [U]``
int client ids in ``[0, num_clients)``; ``p: [U]`` client weights. Method state is any
pytree of arrays (``{}`` for stateless methods); the whole of it is checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from floranna_jax.runners import broadcast
from floranna_jax.server import common

MethodState = Any  # a pytree of arrays


class Method(NamedTuple):
    """One federated LoRA method. Every field is a pure function.

    init:         ``(lora, num_clients) -> state``: the method's state at round 0.
    client_start: ``(lora, state, client_ids, key) -> [U, ...] lora``: what each sampled
                  client starts its local training from (``key``: the round's draw for
                  methods that restart clients from fresh adapters).
    frozen:       ``path -> bool`` for a leaf path of the trainable tree, a tuple of str
                  such as ``("lora", "layer_0/attention/query", "A")``: True where clients
                  never train the leaf.
    private:      ``path -> bool`` (same paths): True where the leaf never crosses the
                  network in a real federation (``floranna_jax.flower``): the server
                  neither sends nor receives it; a client starts it from the model's
                  initial value, then keeps its own. In one process the method's state and
                  ``client_start`` hold the same values, so runs agree leaf for leaf.
    aggregate:    ``(uploads, weights, state=None, svd_metric=True) -> (lora, merge,
                  metrics)``: the server estimator, pure and jittable; ``weights`` are
                  normalized inside; ``svd_metric=False`` (static) skips ``rho_svd``.
    apply:        ``(state, aggregate, client_ids, uploads) -> (lora, state)``: the next
                  global adapter and state, from the estimator's :class:`common.Aggregate`.
    base_delta:   ``state -> {layer: [d_out, d_in]}`` in ``B @ A`` units (before the LoRA
                  scale), what the clients' frozen base has gained; ``{}`` for most methods.
    comm_bytes:   ``(shapes, U) -> (bytes_up, bytes_down)`` per client per round, summed
                  over layers, float32, following METHOD.md's table. Plain Python ints.
    upload:       ``(start, trained) -> upload``: what leaves the clients, from the trees
                  ``{"lora", "head"}`` ``[U, ...]`` they started from and trained; run on the
                  client in a real federation. Its ``private`` leaves must come back as
                  trained. Identity for every method; wrappers (``server.dp``) transform it.
    aggregate_head: ``(state, heads, weights) -> head``: the next global head from the
                  uploaded heads ``[U, ...]`` and the round's weights ``p`` ``[U]``
                  (normalized); the p-weighted mean for every method.
    """

    init: Callable[[common.Lora, int], MethodState]
    client_start: Callable[..., common.Clients]
    frozen: Callable[[tuple[str, ...]], bool]
    private: Callable[[tuple[str, ...]], bool]
    aggregate: Callable[..., tuple[common.Lora, dict[str, jax.Array], dict[str, Any]]]
    apply: Callable[..., tuple[common.Lora, MethodState]]
    base_delta: Callable[[MethodState], dict[str, jax.Array]]
    comm_bytes: Callable[[common.Shapes, int], tuple[int, int]]
    upload: Callable[[Any, Any], Any]
    aggregate_head: Callable[[MethodState, Any, jax.Array], Any]


def stateless(lora: common.Lora, num_clients: int) -> MethodState:
    del lora, num_clients
    return {}


def start_from_global(lora, state, client_ids, key) -> common.Clients:
    """Every sampled client starts from the global adapter."""
    del state, key
    return broadcast(lora, len(client_ids))


def train_everything(path: tuple[str, ...]) -> bool:
    del path
    return False


def share_everything(path: tuple[str, ...]) -> bool:
    del path
    return False


def take_aggregate(state, aggregate: common.Aggregate, client_ids, uploads):
    """The estimator's factors become the global adapter; the state is unchanged."""
    del client_ids, uploads
    return aggregate.lora, state


def no_base_delta(state) -> dict[str, jax.Array]:
    del state
    return {}


def send_trained(start, trained):
    """What a client trained is what it sends."""
    del start
    return trained


def weighted_head(state, heads, weights: jax.Array):
    """``sum_u p_u head_u``, each leaf in its own dtype (summed in float32)."""
    del state
    return jax.tree.map(
        lambda h: jnp.tensordot(weights, h.astype(jnp.float32), 1).astype(h.dtype), heads
    )


def make_method(
    aggregate: Callable[..., Any],
    comm_bytes: Callable[[common.Shapes, int], tuple[int, int]],
    **overrides: Callable[..., Any],
) -> Method:
    """A :class:`Method` from its estimator and byte count; ``overrides`` replace the
    stateless defaults (start from the global adapter, train everything, share
    everything, take the aggregate, no base delta, send what was trained, weighted head)."""
    defaults = dict(
        init=stateless,
        client_start=start_from_global,
        frozen=train_everything,
        private=share_everything,
        apply=take_aggregate,
        base_delta=no_base_delta,
        upload=send_trained,
        aggregate_head=weighted_head,
    )
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise TypeError(f"make_method: unknown fields {unknown}; valid: {sorted(defaults)}")
    return Method(aggregate=aggregate, comm_bytes=comm_bytes, **(defaults | overrides))
