"""FedSA-LoRA: only ``A`` is shared; each client keeps its own ``B`` (personalized).

Update rule (METHOD.md; baseline in arXiv 2509.26399):

    A = sum_u p_u A_u  (broadcast),      B_u stays on client u

There is no single global model in the method itself; for *global* evaluation the
returned ``lora`` holds ``A`` and the weighted average ``B = sum_u p_u B_u`` (so ``rho`` is
FedIT's). The clients keep their own ``B``; the round loop does that bookkeeping.
Communication: only ``A``, ``r d_in`` numbers per layer each way.
"""

from __future__ import annotations

from floranna_jax.server import common
from floranna_jax.server.fedit import average


def fedsa_bytes(shapes: common.Shapes, U: int) -> tuple[int, int]:
    n = common.factor_bytes(shapes, lambda do, di, r: r * di)
    return n, n


def make_fedsa() -> common.Estimator:
    """FedSA-LoRA: average ``A``; ``B`` is the global-evaluation average. No hparams."""
    return common.Estimator(average, fedsa_bytes)
