"""What the merging estimators (FLoRA, FedEx-LoRA) share: a dense residual folded into W0.

Both broadcast some rank-r global factors ``(B, A)`` and fold what those factors miss,

    merge = dW_ideal - B A,        dW_ideal = sum_u p_u B_u A_u,

into the frozen weight, so ``B A + merge = dW_ideal`` exactly. ``merge`` is
``[d_out, d_in]`` by nature: these are the only estimators that form a dense matrix.
FLoRA's ``B = 0`` makes its merge ``dW_ideal`` itself; FedEx's ``(B, A)`` is FedIT's.

Both keep ``{"merged": {layer: [d_out, d_in]}}`` as method state: the sum of every round's
``merge`` (``B @ A`` units), which the round folds into the clients' frozen base.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from floranna_jax.server import common, factored

# (group, basis) -> global (A [L, r, d_in], B [L, d_out, r]) for one stacked layer group
GlobalFactors = Callable[[common.LayerGroup, factored.Basis], tuple[jax.Array, jax.Array]]


def init(lora: common.Lora, num_clients: int) -> dict:
    del num_clients
    return {"merged": {n: jnp.zeros((f["B"].shape[0], f["A"].shape[1]), f["A"].dtype)
                       for n, f in lora.items()}}  # fmt: skip


def accumulate(state, aggregate: common.Aggregate, client_ids, uploads):
    """The estimator's factors; this round's ``merge`` added to the merged total."""
    del client_ids, uploads
    merged = {n: m + aggregate.merge[n].astype(m.dtype) for n, m in state["merged"].items()}
    return aggregate.lora, {"merged": merged}


def base_delta(state) -> dict[str, jax.Array]:
    return state["merged"]


def dense_ideal(g: common.LayerGroup, p: jax.Array) -> jax.Array:
    """``sum_u p_u B_u A_u``: ``[L, d_out, d_in]``."""
    return jnp.stack([jnp.einsum("u,uoi,uid->od", p, B, A, precision=factored.HI)
                      for A, B in zip(g.A, g.B, strict=True)])  # fmt: skip


def aggregate_with_merge(
    clients: common.Clients, weights, global_factors: GlobalFactors, svd_metric: bool
):
    """``(lora, merge, metrics)`` with ``merge = dW_ideal - B A`` per layer."""
    p = common.normalize(weights)
    groups = common.group_layers(clients)
    bases = [factored.build_basis(g, p) for g in groups]
    dW, tail = factored.layer_stats(bases, p, groups[0].r, svd_metric)
    loras, merges, res = [], [], []
    for g, basis in zip(groups, bases, strict=True):
        A, B = global_factors(g, basis)
        ideal = dense_ideal(g, p)
        est = jnp.einsum("lor,lrd->lod", B, A, precision=factored.HI)
        merge = ideal - est
        loras.append({"A": A, "B": B})
        merges.append(merge)
        # Measured, not assumed: the rounding of est + merge is what rho reports.
        res.append(jnp.sum(jnp.square(ideal - (est + merge)), axis=(-2, -1)))
    metrics = factored.summarize(groups, dW, res, tail)
    return common.unstack(groups, loras), common.unstack(groups, merges), metrics
