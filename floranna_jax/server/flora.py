"""FLoRA (stacking): merge the exact average into the frozen weight, restart LoRA.

Update rule (METHOD.md; baseline in arXiv 2509.26399):

    B_st = [B_1 .. B_U],  A_st = [p_1 A_1; ..; p_U A_U],   merge = B_st A_st = dW_ideal
    clients restart from a fresh adapter: A fresh random, B = 0

The server cannot form ``merge`` without a dense ``[d_out, d_in]`` (the clients fold the
stacked factors themselves; the server here returns the product, in ``B @ A`` units).
The fresh ``A`` comes from ``lora.init`` with ``jax.random.fold_in(key, layer_index)``
(layers in sorted-name order), ``key`` an int seed or a typed key; ``B = 0`` is what
makes the restart exact. Communication: ``r (d_in + d_out)`` up and the whole stack,
``U r (d_in + d_out)``, down.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from floranna_jax import lora as lora_lib
from floranna_jax.server import common, factored


def dense_ideal(g: common.LayerGroup, p: jax.Array) -> jax.Array:
    """``sum_u p_u B_u A_u``: ``[L, d_out, d_in]``. Dense, for the merging methods only."""
    return jnp.einsum("u,luoi,luid->lod", p, g.B, g.A, precision=factored.HI)


def dense_sq(x: jax.Array) -> jax.Array:
    """``||x[l]||_F^2`` per layer."""
    return jnp.sum(jnp.square(x), axis=(-2, -1))


def flora_bytes(shapes: common.Shapes, U: int) -> tuple[int, int]:
    up = common.factor_bytes(shapes, lambda do, di, r: r * (di + do))
    return up, U * up


def make_flora(key: int | jax.Array = 0) -> common.Estimator:
    """FLoRA: ``merge = dW_ideal``, ``lora`` a fresh adapter (``B = 0``).

    Args:
      key: int seed or typed PRNG key for the fresh ``A`` (fixed default: 0).
    """

    def aggregate(clients: common.Clients, weights, previous=None, svd_metric: bool = True):
        del previous
        p = common.normalize(weights)
        root = jax.random.key(key) if isinstance(key, int) else key
        groups = common.stack_layers(clients)
        index = {n: i for i, n in enumerate(sorted(clients))}
        loras, merges, dW, res, tail = [], [], [], [], []
        for g in groups:
            basis = factored.build_basis(g, p)
            d, t = factored.layer_stats(basis, p, g.A.shape[2], svd_metric)
            ideal = dense_ideal(g, p)
            merge = ideal  # the stacked product B_st A_st is dW_ideal itself
            _, r, d_in = g.A.shape[1:]
            d_out = g.B.shape[2]
            fresh = [lora_lib.init(jax.random.fold_in(root, index[n]), d_in, d_out, r)
                     for n in g.names]  # fmt: skip
            A = jnp.stack([f["A"] for f in fresh])
            B = jnp.stack([f["B"] for f in fresh])
            est = jnp.einsum("lor,lrd->lod", B, A, precision=factored.HI)
            loras.append({"A": A, "B": B})
            merges.append(merge)
            dW, tail = dW + [d], tail + [t]
            res.append(dense_sq(ideal - (est + merge)))
        metrics = factored.summarize(groups, dW, res, tail)
        return common.unstack(groups, loras), common.unstack(groups, merges), metrics

    return common.Estimator(aggregate, flora_bytes)
