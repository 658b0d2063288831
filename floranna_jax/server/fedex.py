"""FedEx-LoRA: FedIT factors plus the exact residual folded into the frozen weight.

Update rule (METHOD.md; baseline in arXiv 2509.26399):

    A = sum_u p_u A_u,   B = sum_u p_u B_u,   merge = dW_ideal - B A

so ``B A + merge = dW_ideal`` exactly. The residual is sent dense: bytes down are
``r (d_in + d_out) + d_in d_out`` per layer (its rank is at most ``(U + 1) r``, so a
factored residual would be smaller when ``(U + 1) r (d_in + d_out) < d_in d_out``; this
implementation reports the dense choice). Up: one adapter, ``r (d_in + d_out)``.
The merges accumulate in the method state (:mod:`merging`).
"""

from __future__ import annotations

from floranna_jax.server import common, merging
from floranna_jax.server.method import Method, make_method


def fedex_bytes(shapes: common.Shapes, U: int) -> tuple[int, int]:
    up = common.factor_bytes(shapes, lambda do, di, r: r * (di + do))
    return up, up + common.factor_bytes(shapes, lambda do, di, r: do * di)


def _fedit_factors(g, basis):
    """The centre of the mean-centred basis is the weighted mean: FedIT's factors."""
    del g
    return basis.cA, basis.cB


def aggregate(clients: common.Clients, weights, state=None, svd_metric: bool = True):
    del state
    return merging.aggregate_with_merge(clients, weights, _fedit_factors, svd_metric)


def make_fedex() -> Method:
    """FedEx-LoRA: FedIT factors, ``merge = dW_ideal - B A`` (dense). No hparams."""
    return make_method(aggregate, fedex_bytes, init=merging.init, apply=merging.accumulate,
                       base_delta=merging.base_delta)  # fmt: skip
