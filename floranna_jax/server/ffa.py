"""FFA-LoRA: ``A`` frozen at its shared random init, only ``B`` is trained and averaged.

Update rule (METHOD.md; baseline in arXiv 2509.26399):

    A = A_0 (never sent),      B = sum_u p_u B_u

With a shared ``A`` the average is exact: ``sum_u p_u B_u A_0 = B A_0``. The returned
``A`` is the p-weighted average of the clients' ``A``, which *is* ``A_0`` when the clients
share it, as FFA-LoRA requires (the round loop keeps its own bit-identical copy); if they
do not, ``rho`` reports the resulting error honestly instead of hiding it.
Communication: only ``B``, ``r d_out`` numbers per layer each way.
"""

from __future__ import annotations

from floranna_jax.server import common
from floranna_jax.server.fedit import average


def ffa_bytes(shapes: common.Shapes, U: int) -> tuple[int, int]:
    n = common.factor_bytes(shapes, lambda do, di, r: r * do)
    return n, n


def make_ffa() -> common.Estimator:
    """FFA-LoRA: average ``B`` over a frozen shared ``A``. No hyperparameters."""
    return common.Estimator(average, ffa_bytes)
