"""FedIT (FedAvg on LoRA factors): average each factor separately.

Update rule (METHOD.md; baseline in arXiv 2509.26399):

    A = sum_u p_u A_u,        B = sum_u p_u B_u

The product ``B A`` misses the cross terms of ``dW_ideal = sum_u p_u B_u A_u``; with the
mean-centred members of :mod:`floranna_jax.server.factored` the error is exactly
``sum_u p_u (B_u - B)(A_u - A)``, and that is what ``rho`` measures. Communication: one
rank-r adapter each way, ``r (d_in + d_out)`` numbers per layer.
"""

from __future__ import annotations

from floranna_jax.server import common, factored
from floranna_jax.server.method import Method, make_method


def average(clients: common.Clients, weights, state=None, svd_metric: bool = True):
    """``(lora, merge={}, metrics)`` of the factor average; shared by fedit, ffa, fedsa."""
    del state  # the average needs no history
    p = common.normalize(weights)
    groups = common.group_layers(clients)
    bases = [factored.build_basis(g, p) for g in groups]
    dW, tail = factored.layer_stats(bases, p, groups[0].r, svd_metric)
    loras, res = [], []
    for basis in bases:
        # The estimate is the centre (the weighted mean) itself: coefficients e0 e0^T.
        C = factored.target_coeffs(p, basis.w0).at[0, 0].add(-1.0)
        loras.append({"A": basis.cA, "B": basis.cB})
        res.append(factored.quad(basis.K, C))
    metrics = factored.summarize(groups, dW, res, tail)
    return common.unstack(groups, loras), {}, metrics


def make_fedit() -> Method:
    """FedIT: ``A = sum p_u A_u``, ``B = sum p_u B_u``; stateless. No hyperparameters."""
    return make_method(average, common.fedit_bytes)
