"""FedEx-LoRA: FedIT factors plus the exact residual folded into the frozen weight.

Update rule (METHOD.md; baseline in arXiv 2509.26399):

    A = sum_u p_u A_u,   B = sum_u p_u B_u,   merge = dW_ideal - B A

so ``B A + merge = dW_ideal`` exactly. The residual is sent dense: bytes down are
``r (d_in + d_out) + d_in d_out`` per layer (its rank is at most ``(U + 1) r``, so a
factored residual would be smaller when ``(U + 1) r (d_in + d_out) < d_in d_out``; this
implementation reports the dense choice). Up: one adapter, ``r (d_in + d_out)``.
"""

from __future__ import annotations

import jax.numpy as jnp

from floranna_jax.server import common, factored
from floranna_jax.server.flora import dense_ideal, dense_sq


def fedex_bytes(shapes: common.Shapes, U: int) -> tuple[int, int]:
    up = common.factor_bytes(shapes, lambda do, di, r: r * (di + do))
    return up, up + common.factor_bytes(shapes, lambda do, di, r: do * di)


def aggregate(clients: common.Clients, weights, previous=None, svd_metric: bool = True):
    del previous
    p = common.normalize(weights)
    groups = common.stack_layers(clients)
    loras, merges, dW, res, tail = [], [], [], [], []
    for g in groups:
        basis = factored.build_basis(g, p)
        d, t = factored.layer_stats(basis, p, g.A.shape[2], svd_metric)
        A, B = basis.Am[:, 0], basis.Bm[:, :, 0]
        ideal = dense_ideal(g, p)
        est = jnp.einsum("lor,lrd->lod", B, A, precision=factored.HI)
        merge = ideal - est
        loras.append({"A": A, "B": B})
        merges.append(merge)
        dW, tail = dW + [d], tail + [t]
        res.append(dense_sq(ideal - (est + merge)))
    metrics = factored.summarize(groups, dW, res, tail)
    return common.unstack(groups, loras), common.unstack(groups, merges), metrics


def make_fedex() -> common.Estimator:
    """FedEx-LoRA: FedIT factors, ``merge = dW_ideal - B A`` (dense). No hparams."""
    return common.Estimator(aggregate, fedex_bytes)
