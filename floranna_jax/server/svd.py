"""SVD (FlexLoRA-style): the best rank-r approximation of ``dW_ideal`` (Eckart-Young).

Update rule (METHOD.md; baseline in arXiv 2509.26399):

    dW_ideal = U S V^T (truncated to r),   B = U_r S_r^1/2,   A = S_r^1/2 V_r^T

computed from factors only. With the stacked members ``Bm = Q_B R_B`` and
``Am^T = Q_A R_A`` (``R`` from :func:`factored.eigh_root`, the triangular factor of a QR
up to an orthogonal rotation), ``dW_ideal = Q_B (R_B X R_A^T) Q_A^T`` with
``X = C_t kron I_r``; the ``[M r, M r]`` core is SVD'd as ``Uc S Vc^T`` and

    B = Bm (X R_A^T Vc_r S_r^-1/2),      A = (S_r^-1/2 Uc_r^T R_B X) Am

(``B = dW Q_A Vc_r S^-1/2`` written through the factors), so nothing ``[d_out, d_in]`` is
formed. ``rho`` equals ``rho_svd``: this is the lower bound for any rank-r adapter.
Communication as FedIT.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from floranna_jax.server import common, factored
from floranna_jax.server.method import Method, make_method


def _factors(group: common.LayerGroup, basis: factored.Basis, Ct, RB, RA, Uc, S, Vct):
    """``(lora, resid_sq)`` of one group from its slice of the decompositions."""
    L, M, _, _, r = basis.GB.shape
    Sr = S[:, :r]
    # Directions with sigma ~ 0 carry nothing; dropping them avoids dividing by zero.
    keep = Sr > S[:, :1] * (jnp.finfo(jnp.float32).eps * S.shape[-1])
    inv = jnp.where(keep, jnp.sqrt(1.0 / jnp.where(keep, Sr, 1.0)), 0.0)  # S_r^-1/2
    X = jnp.kron(Ct, jnp.eye(r, dtype=jnp.float32))  # [M r, M r]
    NB = jnp.einsum("ij,lkj,lkt,lt->lit", X, RA, Vct[:, :r].swapaxes(1, 2), inv,
                    precision=factored.HI)  # fmt: skip
    MA = jnp.einsum("lt,lkt,lkj,ji->lti", inv, Uc[:, :, :r], RB, X, precision=factored.HI)
    B, A = factored.combine(group, basis, NB.reshape(L, M, r, r),
                            MA.reshape(L, r, M, r).transpose(0, 2, 1, 3))  # fmt: skip
    resid = factored.matrix_resid_sq(basis, X[None] - jnp.einsum("lit,ltj->lij", NB, MA))
    B, A = canonical_signs(B, A)
    return {"A": A, "B": B}, resid


def canonical_signs(B: jax.Array, A: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``B [L, d_out, r]`` and ``A [L, r, d_in]`` with each pair ``(B[:, t], A[t])`` signed
    so that the entry of largest magnitude of ``B[:, t]`` is positive. An SVD fixes its
    singular vectors only up to a joint sign per pair, which LAPACK builds (and the eigh
    roots of the basis) choose differently on different CPUs; ``B A`` is unchanged, and the
    factors, which clients train from, become the same everywhere."""
    top = jnp.take_along_axis(B, jnp.argmax(jnp.abs(B), axis=-2, keepdims=True), axis=-2)
    sign = jnp.where(top < 0, -1.0, 1.0).astype(B.dtype)  # [L, 1, r]
    return B * sign, A * sign.swapaxes(-1, -2)


def aggregate(clients: common.Clients, weights, state=None, svd_metric: bool = True):
    del state, svd_metric  # the SVD is the method itself
    p = common.normalize(weights)
    groups = common.group_layers(clients)
    # All M members and eigh roots, as when the recorded runs of tests/test_train.py were
    # taken: other bases give the same B A, but another rounding of the factors.
    bases = [factored.build_basis(g, p, all_members=True) for g in groups]
    r = groups[0].r
    Ct = factored.target_coeffs(p, bases[0].w0)
    # One eigh and one SVD for all groups (see factored.core for why never two at once).
    RB, RA, mid = factored.core(bases, Ct, root=factored.eigh_root)
    Uc, S, Vct = jnp.linalg.svd(mid, full_matrices=False)
    per_group = zip(*(factored.split_layers(x, bases) for x in (RB, RA, Uc, S, Vct)), strict=True)
    outs = [_factors(g, b, Ct, *xs) for g, b, xs in zip(groups, bases, per_group, strict=True)]
    loras, res = (list(x) for x in zip(*outs, strict=True))
    dW = [factored.quad(b.K, Ct) for b in bases]
    tail = factored.split_layers(jnp.sum(jnp.square(S[:, r:]), axis=-1), bases)
    metrics = factored.summarize(groups, dW, res, tail)
    return common.unstack(groups, loras), {}, metrics


def make_svd() -> Method:
    """Best rank-r approximation of ``dW_ideal`` in factored form; stateless. No hparams."""
    return make_method(aggregate, common.fedit_bytes)
