"""FLoRA-NA: nearly accurate aggregation by learned scalar combinations of client factors.

Update rule (arXiv 2509.26399, as reconstructed in METHOD.md):

    A_hat = sum_u a_u A_u,   B_hat = sum_u b_u B_u                  (combine="factors")
    A_hat = A_g + sum_u a_u (A_u - A_g),  same for B                 (combine="deltas")
    (a, b) = argmin  sum_layers || sum_u q_u B_u A_u - B_hat A_hat ||_F^2

with ``q = p`` (target="weighted") or ``1/U`` ("uniform"), one ``(a, b)`` per layer
(scope="layer") or shared by all layers ("model"). The solve starts at ``a = b = p``, which
is FedIT, and keeps the best iterate, so it is never worse than FedIT on its objective.
Communication as FedIT; ``a, b`` never leave the server.

Everything runs on the Gram tensor ``K`` of :mod:`floranna_jax.server.factored`: with
member coefficients ``beta = e0 + J (b - a0)``, ``alpha = e0 + J (a - a0)`` (``J`` maps
client weights onto the centre + offsets basis) the loss is
``sum C[u,v] C[w,x] K[u,v,w,x]`` with ``C = C_t - beta alpha^T``: O(M^4) per layer and step,
``M = U + 1``, no ``[d_out, d_in]`` anywhere. Solvers, both one ``lax.scan``:

- "adam": optax AdamW (lr 1e-2, 200 steps; optional cosine decay to ``end_learning_rate``)
  on the loss divided by ``||dW_q||^2`` (Adam's eps then means the same at every scale).
- "als": alternating exact least squares; for fixed ``alpha`` the loss is quadratic in
  ``beta``: ``beta^T H beta - 2 g . beta``, ``H[u,w] = sum alpha_v alpha_x K[u,v,w,x]``,
  ``g[u] = sum alpha_v C_t[w,x] K[u,v,w,x]``; solved in ``b`` through ``J`` with a
  pseudo-inverse, then the same for ``a``.

Metrics, besides the shared ones: "loss_init", "loss_final" (the solver objective,
summed over layers, in ``||B A||^2`` units), "iterations", "best_iteration", and the
fitted "a", "b" (dict layer -> ``[U]``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from floranna_jax.clients import finite_float32
from floranna_jax.errors import BadValue
from floranna_jax.server import common, factored
from floranna_jax.server.method import Method, make_method

SCOPES = ("layer", "model")
TARGETS = ("weighted", "uniform")
COMBINES = ("factors", "deltas")
SOLVERS = ("adam", "als")


class Problem(NamedTuple):
    """The solver's view: ``S`` independent objectives (S = layers, or 1 for scope=model).

    K: [S, M, M, M, M];  Ct: [M, M] target coefficients;  J: [M, U];  a0: [U];
    p: [U] the start (FedIT);  norm: [S] ``||dW_q||^2`` (loss scale).
    """

    K: jax.Array
    Ct: jax.Array
    J: jax.Array
    a0: jax.Array
    p: jax.Array
    norm: jax.Array


class Fit(NamedTuple):
    a: jax.Array  # [S, U]
    b: jax.Array  # [S, U]
    loss_init: jax.Array  # [S]
    loss: jax.Array  # [S] at the kept iterate
    best_iteration: jax.Array  # [S]


def member_coeffs(x: jax.Array, prob: Problem) -> jax.Array:
    """``e0 + J (x - a0)``: client weights ``[S, U]`` -> member coefficients ``[S, M]``."""
    e0 = jnp.zeros(prob.J.shape[0], x.dtype).at[0].set(1.0)
    return e0 + (x - prob.a0) @ prob.J.T


def losses(a: jax.Array, b: jax.Array, prob: Problem) -> jax.Array:
    """Gram-form objective per ``s``: ``||dW_q - B_hat A_hat||_F^2``, ``[S]``."""
    beta, alpha = member_coeffs(b, prob), member_coeffs(a, prob)
    C = prob.Ct - beta[:, :, None] * alpha[:, None, :]
    return factored.quad(prob.K, C)


def _keep_best(best, a, b, loss, it):
    """Per-objective best iterate; ties keep the earlier (FedIT first)."""
    better = loss < best[0]
    pick = lambda new, old: jnp.where(better[:, None], new, old)  # noqa: E731
    return (jnp.where(better, loss, best[0]), pick(a, best[1]), pick(b, best[2]),
            jnp.where(better, it, best[3]))  # fmt: skip


def solve_adam(prob: Problem, steps: int, lr: float, end_lr, weight_decay: float) -> Fit:
    """AdamW on the scaled Gram loss, best iterate kept; one ``lax.scan``."""
    sched = lr if end_lr is None else optax.cosine_decay_schedule(lr, steps, end_lr / lr)
    opt = optax.adamw(sched, weight_decay=weight_decay)
    S, U = prob.K.shape[0], prob.p.shape[0]
    x0 = (jnp.broadcast_to(prob.p, (S, U)), jnp.broadcast_to(prob.p, (S, U)))
    scale = 1.0 / jnp.maximum(prob.norm, jnp.finfo(jnp.float32).tiny)

    def scaled(x):
        ls = losses(*x, prob)
        return jnp.sum(ls * scale), ls

    l0 = losses(*x0, prob)
    best0 = (l0, x0[0], x0[1], jnp.zeros(S, jnp.int32))

    def step(carry, it):
        x, state, best = carry
        (_, ls), grads = jax.value_and_grad(scaled, has_aux=True)(x)
        best = _keep_best(best, x[0], x[1], ls, it)
        updates, state = opt.update(grads, state, x)
        return (optax.apply_updates(x, updates), state, best), None

    (x, _, best), _ = jax.lax.scan(step, (x0, opt.init(x0), best0), jnp.arange(steps))
    best = _keep_best(best, x[0], x[1], losses(*x, prob), jnp.int32(steps))
    return Fit(best[1], best[2], l0, best[0], best[3])


def _ls_update(H: jax.Array, g: jax.Array, prob: Problem) -> jax.Array:
    """argmin over ``x`` of ``c^T H c - 2 g.c``, ``c = e0 + J (x - a0)``; batched ``[S]``."""
    e0 = jnp.zeros(prob.J.shape[0], jnp.float32).at[0].set(1.0)
    lhs = jnp.einsum("mu,smn,nv->suv", prob.J, H, prob.J, precision=factored.HI)
    rhs = jnp.einsum("mu,sm->su", prob.J, g - H @ e0, precision=factored.HI)
    lam, V = jnp.linalg.eigh(lhs)
    cut = jnp.max(lam, axis=-1, keepdims=True) * 1e-6
    inv = jnp.where(lam > cut, 1.0 / jnp.where(lam > cut, lam, 1.0), 0.0)
    d = jnp.einsum("suk,sk,svk,sv->su", V, inv, V, rhs, precision=factored.HI)
    return prob.a0 + d


def solve_als(prob: Problem, steps: int) -> Fit:
    """Alternating closed-form least squares (b given a, then a given b); best kept."""
    S, U = prob.K.shape[0], prob.p.shape[0]
    a0 = b0 = jnp.broadcast_to(prob.p, (S, U))
    l0 = losses(a0, b0, prob)
    best0 = (l0, a0, b0, jnp.zeros(S, jnp.int32))
    hi = factored.HI

    def step(carry, it):
        a, b, best = carry
        al = member_coeffs(a, prob)
        H = jnp.einsum("sv,sx,suvwx->suw", al, al, prob.K, precision=hi)
        g = jnp.einsum("sv,wx,suvwx->su", al, prob.Ct, prob.K, precision=hi)
        b = _ls_update(H, g, prob)
        be = member_coeffs(b, prob)
        H = jnp.einsum("su,sw,suvwx->svx", be, be, prob.K, precision=hi)
        g = jnp.einsum("su,wx,suvwx->sv", be, prob.Ct, prob.K, precision=hi)
        a = _ls_update(H, g, prob)
        return (a, b, _keep_best(best, a, b, losses(a, b, prob), it + 1)), None

    (_, _, best), _ = jax.lax.scan(step, (a0, b0, best0), jnp.arange(steps))
    return Fit(best[1], best[2], l0, best[0], best[3])


def problem(bases: list[factored.Basis], p, target: str, combine: str, scope: str) -> Problem:
    """The objective's Gram data for all layer groups (layers concatenated in group order)."""
    U = p.shape[0]
    w0 = bases[0].w0
    q = p if target == "weighted" else jnp.full((U,), 1.0 / U, jnp.float32)
    Ct = factored.target_coeffs(q, w0)
    first = jnp.ones((1, U)) if combine == "factors" else jnp.zeros((1, U))
    J = jnp.concatenate([first, jnp.eye(U)]).astype(jnp.float32)
    K = jnp.concatenate([b.K for b in bases])
    norm = factored.quad(K, Ct)
    if scope == "model":
        K, norm = jnp.sum(K, axis=0, keepdims=True), jnp.sum(norm, keepdims=True)
    return Problem(K, Ct, J, w0, p, norm)


def make_floranna(
    scope: str = "layer",
    target: str = "weighted",
    combine: str = "factors",
    solver: str = "adam",
    steps: int = 200,
    learning_rate: float = 1e-2,
    end_learning_rate: float | None = None,
    weight_decay: float = 0.0,
) -> Method:
    """FLoRA-NA. Defaults: the reference solver of METHOD.md (AdamW, 1e-2, 200 steps) with
    one ``(a, b)`` per layer, which fits every layer at least as well as shared weights at
    the same cost (docs/reviewers.md, question 1).

    Args:
      scope: "layer" (one (a, b) per layer) or "model" (one pair for all layers).
      target: "weighted" (``q = p``) or "uniform" (``q = 1/U``) in the fitted objective;
        the reported ``rho`` is always against the p-weighted ``dW_ideal``.
      combine: "factors" or "deltas" (from the previous global adapter, which the method
        state ``{"previous": lora}`` holds).
      solver: "adam" or "als". ``steps`` iterations of either.
      learning_rate, end_learning_rate, weight_decay: AdamW; ``end_learning_rate`` turns on
        cosine decay; weight decay defaults to 0 (it would pull ``a, b`` off FedIT's scale).
    """
    common.check_choice("scope", scope, SCOPES)
    common.check_choice("target", target, TARGETS)
    common.check_choice("combine", combine, COMBINES)
    common.check_choice("solver", solver, SOLVERS)
    if isinstance(steps, bool) or not (isinstance(steps, int) and steps >= 0):
        raise BadValue("steps", f"must be a non-negative int, got {steps!r}")
    for name, lr in (("learning_rate", learning_rate), ("end_learning_rate", end_learning_rate)):
        if lr is not None and not (finite_float32(lr) and lr > 0):
            raise BadValue(name, f"must be a number > 0, finite in float32; got {lr!r}")
    if not (finite_float32(weight_decay) and weight_decay >= 0):
        raise BadValue(
            "weight_decay", f"must be a number >= 0, finite in float32; got {weight_decay!r}"
        )
    deltas = combine == "deltas"

    def init(lora: common.Lora, num_clients: int) -> dict:
        del num_clients
        return {"previous": lora} if deltas else {}

    def apply(state, aggregate: common.Aggregate, client_ids, uploads):
        del client_ids, uploads
        return aggregate.lora, ({"previous": aggregate.lora} if deltas else state)

    def aggregate(clients: common.Clients, weights, state=None, svd_metric: bool = True):
        previous = (state or {}).get("previous")
        if deltas and previous is None:
            raise ValueError(
                "floranna combine='deltas' needs previous= the last global adapter "
                "(dict layer -> {'A': [r, d_in], 'B': [d_out, r]})"
            )
        p = common.normalize(weights)
        groups = common.group_layers(clients, previous if deltas else None)
        bases = [factored.build_basis(g, p, use_previous=deltas) for g in groups]
        prob = problem(bases, p, target, combine, scope)
        if solver == "adam":
            fit = solve_adam(prob, steps, learning_rate, end_learning_rate, weight_decay)
        else:
            fit = solve_als(prob, steps)
        L, U = sum(len(g.names) for g in groups), p.shape[0]
        a, b = (jnp.broadcast_to(x, (L, U)) for x in (fit.a, fit.b))
        return _finish(groups, bases, p, prob, fit, a, b, steps, svd_metric)

    return make_method(aggregate, common.fedit_bytes, init=init, apply=apply)


def _finish(groups, bases, p, prob, fit, a, b, steps, svd_metric):
    """Global factors and metrics from the fitted ``a, b: [L, U]`` (layers in group order)."""
    # The metrics' eigh must not run beside the ALS solver's (see factored.core): the
    # barrier makes their input wait for the fit.
    stats_bases, _ = jax.lax.optimization_barrier((bases, fit))
    dW, tail = factored.layer_stats(stats_bases, p, groups[0].r, svd_metric)
    loras, res, start = [], [], 0
    for g, basis in zip(groups, bases, strict=True):
        n = len(g.names)
        beta = member_coeffs(b[start : start + n], prob)
        alpha = member_coeffs(a[start : start + n], prob)
        B, A = factored.combine(g, basis, beta, alpha)
        loras.append({"A": A, "B": B})
        Ct = factored.target_coeffs(p, basis.w0)
        res.append(factored.quad(basis.K, Ct - beta[:, :, None] * alpha[:, None, :]))
        start += n
    metrics = factored.summarize(groups, dW, res, tail)
    names = [n for g in groups for n in g.names]
    metrics.update(
        loss_init=jnp.sum(fit.loss_init),
        loss_final=jnp.sum(fit.loss),
        iterations=jnp.int32(steps),
        best_iteration=fit.best_iteration,
        a={n: a[i] for i, n in enumerate(names)},
        b={n: b[i] for i, n in enumerate(names)},
    )
    return common.unstack(groups, loras), {}, metrics
