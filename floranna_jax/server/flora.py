"""FLoRA (stacking): merge the exact average into the frozen weight, restart LoRA.

Update rule (METHOD.md; baseline in arXiv 2509.26399):

    B_st = [B_1 .. B_U],  A_st = [p_1 A_1; ..; p_U A_U],   merge = B_st A_st = dW_ideal
    clients restart from a fresh adapter: A fresh random, B = 0

The server cannot form ``merge`` without a dense ``[d_out, d_in]`` (the clients fold the
stacked factors themselves; the server here returns the product, in ``B @ A`` units).
The fresh ``A`` comes from ``lora.init`` with ``jax.random.fold_in(key, layer_index)``
(layers in sorted-name order), ``key`` an int seed or a typed key; ``B = 0`` is what
makes the restart exact. In a run the sampled clients restart every round from a fresh
adapter drawn from the round's key (``client_start``), and ``merge`` accumulates in the
method state (:mod:`merging`). Communication: ``r (d_in + d_out)`` up and the whole
stack, ``U r (d_in + d_out)``, down.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from floranna_jax import lora as lora_lib
from floranna_jax.server import common, merging
from floranna_jax.server.method import Method, broadcast, make_method


def flora_bytes(shapes: common.Shapes, U: int) -> tuple[int, int]:
    up = common.factor_bytes(shapes, lambda do, di, r: r * (di + do))
    return up, U * up


def fresh_like(key: jax.Array, lora: common.Lora) -> common.Lora:
    """Fresh adapters (``A`` random, ``B = 0``) shaped and typed like ``lora``."""
    shapes = {n: (f["A"].shape[1], f["B"].shape[0]) for n, f in lora.items()}
    rank = next(iter(lora.values()))["A"].shape[0]
    fresh = lora_lib.init_tree(key, shapes, rank)
    return {n: {k: v.astype(lora[n][k].dtype) for k, v in fresh[n].items()} for n in lora}


def client_start(lora, state, client_ids, key) -> common.Clients:
    """Every sampled client restarts from the same fresh adapter, drawn from ``key``."""
    del state
    return broadcast(fresh_like(key, lora), len(client_ids))


def make_flora(key: int | jax.Array = 0) -> Method:
    """FLoRA: ``merge = dW_ideal``, ``lora`` a fresh adapter (``B = 0``).

    Args:
      key: int seed or typed PRNG key for the fresh ``A`` (fixed default: 0).
    """

    def aggregate(clients: common.Clients, weights, state=None, svd_metric: bool = True):
        del state
        root = jax.random.key(key) if isinstance(key, int) else key
        index = {n: i for i, n in enumerate(sorted(clients))}

        def fresh(g, basis):
            del basis
            new = [lora_lib.init(jax.random.fold_in(root, index[n]), g.d_in, g.d_out, g.r)
                   for n in g.names]  # fmt: skip
            return jnp.stack([f["A"] for f in new]), jnp.stack([f["B"] for f in new])

        return merging.aggregate_with_merge(clients, weights, fresh, svd_metric)

    return make_method(aggregate, flora_bytes, init=merging.init, client_start=client_start,
                       apply=merging.accumulate, base_delta=merging.base_delta)  # fmt: skip
