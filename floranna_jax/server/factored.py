"""Factored linear algebra of the aggregation problem: no ``[d_out, d_in]`` array, ever.

Notation (METHOD.md): ``U`` clients, rank ``r``; per layer ``B_u: [d_out, r]``,
``A_u: [r, d_in]``; ``dW_q = sum_u q_u B_u A_u``.

Every estimate here lies in the span of ``M = U + 1`` *members*: a centre ``c`` and the
client offsets ``X_u - c`` (for both factors). The centre is the p-weighted mean of the
clients (so ``sum_u p_u (X_u - c) = 0``), or the previous global factors for FLoRA-NA's
``combine="deltas"``. Centring matters numerically: the Gram blocks of the offsets carry
the client disagreement at its own scale, instead of as a float32 cancellation between
large nearly-equal Gram entries. With identical clients the offsets are ~0 and every
error formula below is ~0, not ~sqrt(eps).

A matrix ``sum_{u,v} C[u,v] Bm_u Am_v`` (``C: [M, M]``) has squared Frobenius norm

    ||.||^2 = sum_{u,v,w,x} C[u,v] C[w,x] K[u,v,w,x],
    K[u,v,w,x] = <GB[u,w], GA[v,x]>,  GB[u,w] = Bm_u^T Bm_w,  GA[v,x] = Am_v Am_x^T,

with ``GB``/``GA`` the ``r x r`` Gram blocks. ``K`` is ``M^4`` numbers per layer: a
solver step costs O(M^4), independent of the model width. Matrix coefficients
(``X: [N r, N r]`` on the multiplied-out members below, the SVD) use
``||.||^2 = tr(X^T G_B X G_A)`` with their flat Grams.

The ``M`` members are not independent when the centre is the weighted mean: the offsets
satisfy ``sum_u p_u (X_u - c) = 0``. So the Grams are multiplied out for ``N = U``
independent members only, the heaviest client ``X_k`` and the differences
``X_u - X_k`` (``u != k``), still small where the clients agree: one ``[N r, N r]`` Gram
per factor and layer, the least any factored method computes. The mean-centred members
are exact combinations of these (``E``), and so are their Gram blocks. With a
previous-factors centre all ``N = M`` members are independent and multiplied as they are;
so are they for the SVD estimator (``all_members``, see svd.py).

The best rank-r approximation uses square roots ``R^T R = G`` of the independent members'
Grams (Cholesky of the Jacobi-scaled Gram, ``eigh`` where that is not positive definite;
``R`` plays the part of the QR's triangular factor of the stacked factors), then an SVD
of the ``[N r, N r]`` core ``R_B (E C E^T kron I_r) R_A^T``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from floranna_jax.server import common

HI = jax.lax.Precision.HIGHEST  # full float32 on every backend (no TF32 / bf16 passes)


class Basis(NamedTuple):
    """One layer group's centres and Gram blocks, leading layer axis ``L``.

    cB: [L, d_out, r]      the centre of the B factors (member 0)
    cA: [L, r, d_in]       the centre of the A factors
    GB: [L, M, M, r, r]    GB[l, u, w] = Bm_u^T Bm_w
    GA: [L, M, M, r, r]    GA[l, v, x] = Am_v Am_x^T
    K:  [L, M, M, M, M]    K[l, u, v, w, x] = <GB[l, u, w], GA[l, v, x]>
    w0: [U]                weights whose offsets sum to zero: p (mean centre) or 0
    E:  [N, M]             full member m = sum_i E[i, m] (independent member i)
    GBr, GAr: [L, N r, N r]  flat Grams of the independent members (what was multiplied)

    The members themselves (``[N r, d]`` per layer and factor) live only inside
    :func:`build_basis`, one layer at a time; :func:`combine` reads the clients' factors.
    """

    cB: jax.Array
    cA: jax.Array
    GB: jax.Array
    GA: jax.Array
    K: jax.Array
    w0: jax.Array
    E: jax.Array
    GBr: jax.Array
    GAr: jax.Array


def _member_gram(centre: jax.Array, X: jax.Array) -> jax.Array:
    """Flat Gram ``[(n + 1) r, (n + 1) r]`` of ``[c; X_1 - c; ..; X_n - c]`` (rows ``[r, d]``).

    ``centre: [r, d]``, ``X: [n, r, d]``. The centring and the row-major stack fuse into
    one pass over ``X``; the Gram is then one plain GEMM contracting the long axis ``d``.
    """
    n, r, d = X.shape
    members = jnp.concatenate([centre[None], X - centre[None]]).reshape((n + 1) * r, d)
    return jnp.einsum("kd,jd->kj", members, members, precision=HI)


def independent_members(p: jax.Array, all_members: bool):
    """``(k, kept [N - 1], E [N, M])``: what the Grams are multiplied out for.

    Mean centre: member 0 is the heaviest client ``X_k`` (``p_k > 0``: a real client
    whatever zeros ``p`` holds) and member ``j + 1`` is ``X_{kept_j} - X_k``. With
    ``P = (0, p_kept)`` the mean-centred members are ``c = X_k + P . m``,
    ``X_u - c = m_{j(u)} - P . m`` and ``X_k - c = -P . m`` (``sum p = 1``): the columns of
    ``E``. ``all_members``: the members as they are; ``k`` is None and ``E = I``.
    """
    U = p.shape[0]
    if all_members:
        return None, jnp.arange(U), jnp.eye(U + 1, dtype=jnp.float32)
    k = jnp.argmax(p)
    j = jnp.arange(U - 1)
    kept = j + (j >= k)
    P = jnp.zeros(U, jnp.float32).at[1:].set(p[kept])
    sign = jnp.ones(U + 1, jnp.float32).at[1:].set(-1.0)
    E = jnp.zeros((U, U + 1), jnp.float32).at[0, 0].set(1.0).at[j + 1, kept + 1].set(1.0)
    return k, kept, E + P[:, None] * sign[None, :]


def _full_blocks(Gr: jax.Array, E: jax.Array, r: int) -> jax.Array:
    """Independent members' flat Grams ``[L, N r, N r]`` -> full blocks ``[L, M, M, r, r]``."""
    L, N = Gr.shape[0], E.shape[0]
    G = Gr.reshape(L, N, r, N, r)
    return jnp.einsum("iu,jw,liajb->luwab", E, E, G, precision=HI)


def build_basis(
    group: common.LayerGroup, p: jax.Array, use_previous: bool = False, all_members: bool = False
) -> Basis:
    """Centres and Grams of one layer group (centre: mean, or previous global factors).

    The Grams are multiplied out for the independent members (previous-factors centre, or
    ``all_members=True``: all ``M`` members as they are). Layer by layer, so no copy of all
    clients' factors is ever made: the only large temporaries are one layer's members.
    """
    r = group.r
    k, kept, E = independent_members(p, all_members or use_previous)
    if use_previous:
        cA, cB, w0 = group.prev_A, group.prev_B, jnp.zeros_like(p)
    else:
        cA = tuple(common.weighted_mean(p, A) for A in group.A)
        cB = tuple(common.weighted_mean(p, B) for B in group.B)
        w0 = p
    if k is None:
        first = list(zip(cA, group.A, cB, group.B, strict=True))
    else:
        first = [(A[k], A[kept], B[k], B[kept]) for A, B in zip(group.A, group.B, strict=True)]
    # B_u^T B_w is a Gram of the transposed factors [r, d_out]: same GEMM as for A.
    GBr = jnp.stack([_member_gram(c.T, jnp.swapaxes(B, 1, 2)) for _, _, c, B in first])
    GAr = jnp.stack([_member_gram(c, A) for c, A, _, _ in first])
    GB, GA = _full_blocks(GBr, E, r), _full_blocks(GAr, E, r)
    K = jnp.einsum("luwij,lvxij->luvwx", GB, GA, precision=HI)
    return Basis(jnp.stack(cB), jnp.stack(cA), GB, GA, K, w0, E, GBr, GAr)


def target_coeffs(q: jax.Array, w0: jax.Array) -> jax.Array:
    """``C_t: [M, M]`` with ``sum_u q_u B_u A_u = sum C_t[u,v] Bm_u Am_v``.

    ``X_u = c + D_u`` gives ``sum_u q_u X^B_u X^A_u`` = ``(sum q) c_B c_A + c_B (sum q D^A)
    + (sum q D^B) c_A + sum q D^B D^A``; offsets with ``sum w0_u D_u = 0`` let the middle
    terms use ``q - w0`` (exactly zero for the weighted target on the mean centre).
    """
    U = q.shape[0]
    C = jnp.zeros((U + 1, U + 1), jnp.float32)
    C = C.at[0, 0].set(jnp.sum(q))
    C = C.at[0, 1:].set(q - w0).at[1:, 0].set(q - w0)
    return C.at[1:, 1:].set(jnp.diag(q))


def quad(K: jax.Array, C: jax.Array) -> jax.Array:
    """``||sum C[u,v] Bm_u Am_v||_F^2`` per layer: ``K [L,M,M,M,M]``, ``C [L,M,M] or [M,M]``."""
    L, M = K.shape[0], K.shape[1]
    c = jnp.broadcast_to(C, K.shape[:3]).reshape(L, M * M)
    Kc = jnp.einsum("lij,lj->li", K.reshape(L, M * M, M * M), c, precision=HI)  # batched matvec
    return jnp.sum(Kc * c, axis=-1)


def combine(
    group: common.LayerGroup, basis: Basis, beta: jax.Array, alpha: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(sum_m beta[l,m] Bm_m, sum_m alpha[l,m] Am_m)``: ``[L, d_out, r]``, ``[L, r, d_in]``.

    Coefficients are scalars ``[L, M]`` or matrices ``[L, M, r, r]``, which act on the
    right of ``Bm_m`` and on the left of ``Am_m`` (the SVD's). Since member ``u >= 1`` is
    ``X_u - c``, the sum is ``c (x_0 - sum_u x_u) + sum_u X_u x_u``: it reads the clients'
    factors once, as they are, instead of a stacked copy of the members.
    """
    on_c = lambda x: x[:, 0] - jnp.sum(x[:, 1:], axis=1)  # noqa: E731

    def mix(centre, y, X, x, c_spec, s_spec):  # one layer: c y + sum_u X_u x_u
        return jnp.einsum(c_spec, y, centre, precision=HI) + jnp.einsum(
            s_spec, x[1:], X, precision=HI
        )

    # Scalars: "u,uor" lowers to a GEMV 3x faster on XLA's CPU than "uor,u" (measured).
    if beta.ndim == 2:
        c_b, c_a, s_b, s_a = ",or->or", ",rd->rd", "u,uor->or", "u,urd->rd"
    else:
        c_b, c_a, s_b, s_a = "rs,or->os", "sr,rd->sd", "urs,uor->os", "usr,urd->sd"
    # Layer by layer, the centre's term and the clients' sum in one expression: each
    # layer's factors are read once and nothing [L, ...]-sized is added afterwards.
    B = [mix(*t, c_b, s_b) for t in zip(basis.cB, on_c(beta), group.B, beta, strict=True)]
    A = [mix(*t, c_a, s_a) for t in zip(basis.cA, on_c(alpha), group.A, alpha, strict=True)]
    return jnp.stack(B), jnp.stack(A)


def eigh_root(G: jax.Array) -> jax.Array:
    """``R: [L, n, n]`` with ``R^T R = G`` for PSD ``G: [L, n, n]``, from ``eigh``.

    Jacobi scaling (unit diagonal) before ``eigh`` keeps each column's error relative to
    that column's own norm, so small offsets are not drowned by the centre's rounding.
    """
    d = jnp.diagonal(G, axis1=-2, axis2=-1)
    s = jnp.where(d > 0, jax.lax.rsqrt(jnp.where(d > 0, d, 1.0)), 0.0)
    lam, V = jnp.linalg.eigh(G * s[..., :, None] * s[..., None, :])
    root = jnp.sqrt(jnp.clip(lam, 0.0))[..., :, None] * jnp.swapaxes(V, -1, -2)
    return root * jnp.sqrt(jnp.clip(d, 0.0))[..., None, :]


def sqrt_factor(G: jax.Array) -> jax.Array:
    """``R: [L, n, n]`` with ``R^T R = G`` for PSD ``G: [L, n, n]``.

    Cholesky of the Jacobi-scaled ``G`` (unit diagonal; a zero column gets a 1 there and
    a zero column of ``R``): backward stable like ``eigh``, at a small fraction of its
    cost on a CPU. Layers where it breaks down (a Gram singular to working precision,
    e.g. identical clients) take the ``eigh`` root instead; that ``eigh`` runs only if
    some layer needs it, as one batched call.
    """
    d = jnp.diagonal(G, axis1=-2, axis2=-1)
    pos = d > 0
    s = jnp.where(pos, jax.lax.rsqrt(jnp.where(pos, d, 1.0)), 0.0)
    eye = jnp.eye(G.shape[-1], dtype=G.dtype)
    Gs = G * s[..., :, None] * s[..., None, :] + eye * (~pos)[..., None, :]
    R = jnp.swapaxes(jnp.linalg.cholesky(Gs), -1, -2) * jnp.sqrt(jnp.clip(d, 0.0))[..., None, :]
    ok = jnp.all(jnp.isfinite(R), axis=(-2, -1))
    fallback = lambda: jnp.where(ok[:, None, None], R, eigh_root(G))  # noqa: E731
    return jax.lax.cond(jnp.all(ok), lambda: R, fallback)


def independent_coeffs(basis: Basis, C: jax.Array) -> jax.Array:
    """Full-member coefficients ``C: [M, M]`` -> independent members' ``E C E^T: [N, N]``."""
    return jnp.einsum("iu,uv,jv->ij", basis.E, C, basis.E, precision=HI)


def core(bases: list[Basis], Ct: jax.Array, root=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(R_B, R_A, R_B (E C_t E^T kron I_r) R_A^T)`` of every layer of every group,
    ``[sum L, n, n]`` each (``n = N r``, shared by all groups); the core has the singular
    values of ``dW``. ``root``: :func:`sqrt_factor` unless given.

    All roots come from ONE batched factorization, and at most one batched ``eigh``.
    jaxlib's CPU ``eigh`` and ``svd`` split their batch into sub-tasks on XLA's thread pool
    and wait for them; two such calls side by side on a 2-thread pool each held one thread
    while their sub-tasks queued behind the other, and the run hung forever (seen here, in
    gdb). One call per decomposition kind leaves nothing to run beside it.
    """
    N, r = bases[0].E.shape[0], bases[0].GB.shape[-1]
    Cr = independent_coeffs(bases[0], Ct)  # E depends only on p: shared by all groups
    GB = jnp.concatenate([b.GBr for b in bases])
    GA = jnp.concatenate([b.GAr for b in bases])
    L, n = GB.shape[0], GB.shape[-1]
    RB, RA = jnp.split((root or sqrt_factor)(jnp.concatenate([GB, GA])), 2)
    mid = jnp.einsum(
        "lkur,uv,ljvr->lkj", RB.reshape(L, n, N, r), Cr, RA.reshape(L, n, N, r), precision=HI
    )
    return RB, RA, mid


def split_layers(x: jax.Array, bases: list[Basis]) -> list[jax.Array]:
    """``[sum L, ...]`` -> per-group ``[L_i, ...]`` (inverse of concatenating the groups)."""
    cuts = np.cumsum([b.GB.shape[0] for b in bases])[:-1]
    return jnp.split(x, cuts)


def matrix_resid_sq(basis: Basis, X: jax.Array) -> jax.Array:
    """``||Bm X Am||_F^2 = tr(X^T G_B X G_A)`` per layer over the multiplied-out members,
    ``X: [L, N r, N r]``."""
    return jnp.einsum("lji,ljk,lkm,lmi->l", X, basis.GBr, X, basis.GAr, precision=HI)


def layer_stats(
    bases: list[Basis], p: jax.Array, r: int, svd_metric: bool = True
) -> tuple[list[jax.Array], list[jax.Array]]:
    """``(||dW_ideal||^2, rho_svd^2)`` per layer of each group, both from factors only.

    ``svd_metric=False`` skips the ``eigh`` and the SVD behind ``rho_svd`` (NaN then): on a
    CPU they cost more than FLoRA-NA's whole solve.
    """
    Ct = target_coeffs(p, bases[0].w0)
    dW_sq = [quad(b.K, Ct) for b in bases]
    if not svd_metric:
        return dW_sq, [jnp.full_like(d, jnp.nan) for d in dW_sq]
    _, _, mid = core(bases, Ct)
    sigma = jnp.linalg.svd(mid, compute_uv=False)
    return dW_sq, split_layers(jnp.sum(jnp.square(sigma[..., r:]), axis=-1), bases)


def summarize(
    groups: list[common.LayerGroup],
    dW_sq: list[jax.Array],
    resid_sq: list[jax.Array],
    tail_sq: list[jax.Array],
) -> dict:
    """The shared metrics from per-group, per-layer squared norms (lists of ``[L_i]``)."""
    dW, res, tail = (jnp.concatenate(x) for x in (dW_sq, resid_sq, tail_sq))
    res = jnp.clip(res, 0.0)
    denom = jnp.sqrt(jnp.maximum(jnp.sum(dW), jnp.finfo(jnp.float32).tiny))
    rho, rho_svd = jnp.sqrt(jnp.sum(res)), jnp.sqrt(jnp.sum(jnp.maximum(tail, 0.0)))
    names = [n for g in groups for n in g.names]
    return {
        "rho": rho,
        "rho_rel": rho / denom,
        "rho_svd": rho_svd,
        "rho_svd_rel": rho_svd / denom,
        "rho_per_layer": {n: jnp.sqrt(res[i]) for i, n in enumerate(names)},
    }
