"""Differential privacy as a method wrapper: per-client clipping and DP-FedAvg noise.

    method = make_dp(inner, clip_norm=C, noise_multiplier=z, key=keys.noise_key(seed))

The wrapper is a :class:`Method` like any other; the round cannot tell it from ``inner``.

Clipping (``C > 0``), on the client, in ``upload``: a client's update is what it shares
minus what it started from, ``Delta_u = trained_u - start_u``, over every leaf it sends
(the adapter's shared factors and the head; never a ``private`` leaf, such as FedSA's
personal ``B``, and never a ``frozen`` one, which does not change). It is scaled jointly,

    Delta_u <- Delta_u * min(1, C / ||Delta_u||_2),      upload_u = start_u + Delta_u

DP-FedAvg (``z > 0``; McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018, Algorithm 1 with equal client weights), on the
server: the ``U`` sampled clients weigh equally and the aggregate gets Gaussian noise,

    global = start + (1/U) sum_u Delta_u + N(0, sigma^2 I),      sigma = z C / U

one client moves the mean by at most ``C / U`` (its sensitivity), and the noise is ``z``
times that. The same noise goes on every shared leaf of the adapter and on the head. This
holds only where the method's aggregate *is* that mean of the uploads (``MEAN_METHODS``:
FedIT, FFA-LoRA); every other method's aggregate is refused (:func:`check`). Without
noise the round's own weights ``p_u`` are kept. The guarantee is per client (user-level),
so ``delta`` should be below ``1 / num_clients``; ``floranna_jax.privacy`` accounts for it.

State: ``{"inner": the wrapped method's state, "noise_key": [2] uint32 key data}``; the
noise of a round comes from the key, which ``apply`` advances, so a checkpoint holds it and
a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from floranna_jax.clients import path_names
from floranna_jax.errors import BadValue
from floranna_jax.server import common
from floranna_jax.server.method import Method

# Methods whose aggregate is the weighted mean of the uploaded factors (DP-FedAvg's step).
MEAN_METHODS = ("fedit", "ffa")
LORA_TAG, HEAD_TAG, NEXT_TAG = 0, 1, 2  # fold_in tags of the round's noise key


def check(method: str, clip_norm: float, noise_multiplier: float) -> None:
    """Raise :class:`BadValue` for a negative or non-finite bound or multiplier, noise
    without a clipping bound, or noise on a method whose aggregate is not a mean."""
    for name, value in (("clip_norm", clip_norm), ("noise_multiplier", noise_multiplier)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and value >= 0)
        ):
            raise BadValue(name, f"must be a finite number >= 0 (0 = off), got {value!r}")
    if noise_multiplier > 0 and clip_norm <= 0:
        raise BadValue("clip_norm", "must be > 0 when noise_multiplier > 0 (the noise is "
                       "scaled to the clipping bound)")  # fmt: skip
    if noise_multiplier > 0 and method not in MEAN_METHODS:
        raise BadValue("noise_multiplier", f"DP-FedAvg noise needs an aggregate that is the "
                       f"mean of the uploads ({', '.join(MEAN_METHODS)}); {method}'s is not, so "
                       f"its noise would not bound one client's influence; use "
                       f"server.name={MEAN_METHODS[0]} or noise_multiplier=0")  # fmt: skip


def _shared(method: Method):
    """``path -> bool``: leaves a client sends and changes (neither private nor frozen)."""
    return lambda path: not method.private(path) and not method.frozen(path)


def clip_uploads(start, trained, clip_norm: float, shared) -> Any:
    """``trained`` ``{"lora", "head"}`` ``[U, ...]`` with each client's update from
    ``start`` (over the leaves ``shared(path)`` accepts) scaled to L2 norm ``<= clip_norm``;
    every other leaf, and every client already inside the bound, exactly as trained."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(trained)
    starts = jax.tree.leaves(start)
    keep = [shared(path_names(path)) for path, _ in flat]
    deltas = [t.astype(jnp.float32) - s.astype(jnp.float32)
              for (_, t), s, k in zip(flat, starts, keep, strict=True) if k]  # fmt: skip
    U = flat[0][1].shape[0]
    sq = sum((jnp.sum(d.reshape(U, -1) ** 2, axis=1) for d in deltas), jnp.zeros(U))
    factor = jnp.minimum(1.0, clip_norm / jnp.maximum(jnp.sqrt(sq), 1e-30))  # [U]
    out, i = [], 0
    for (_, t), s, k in zip(flat, starts, keep, strict=True):
        if k:
            f = factor.reshape(U, *([1] * (t.ndim - 1)))
            scaled = (s.astype(jnp.float32) + f * deltas[i]).astype(t.dtype)
            out.append(jnp.where(f < 1.0, scaled, t))
            i += 1
        else:
            out.append(t)
    return jax.tree.unflatten(treedef, out)


def add_noise(tree, key: jax.Array, std, prefix: str, shared) -> Any:
    """``tree`` plus ``N(0, std^2)`` on each leaf ``shared((prefix, *path))`` accepts, one key
    per leaf (``fold_in(key, leaf index)``); other leaves unchanged."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for i, (path, x) in enumerate(flat):
        if shared((prefix, *path_names(path))):
            noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
            x = (x.astype(jnp.float32) + std * noise).astype(x.dtype)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def make_dp(inner: Method, clip_norm: float, noise_multiplier: float, key: jax.Array) -> Method:
    """``inner`` with per-client clipping to ``clip_norm`` (0: none) and DP-FedAvg noise of
    ``noise_multiplier`` (0: none; needs a mean aggregate, :func:`check`). ``key``: the
    run's noise key (``keys.noise_key``), the first round's."""
    shared = _shared(inner)
    noisy = noise_multiplier > 0

    def init(lora: common.Lora, num_clients: int) -> dict:
        return {"inner": inner.init(lora, num_clients), "noise_key": jax.random.key_data(key)}

    def round_key(state, tag: int) -> jax.Array:
        return jax.random.fold_in(jax.random.wrap_key_data(state["noise_key"]), tag)

    def weights_of(weights, U: int):
        return jnp.full((U,), 1.0 / U, jnp.float32) if noisy else weights

    def sigma(U: int) -> float:
        return noise_multiplier * clip_norm / U

    def upload(start, trained):
        return clip_uploads(start, trained, clip_norm, shared) if clip_norm > 0 else trained

    def aggregate(uploads, weights, state=None, svd_metric: bool = True):
        U = jax.tree.leaves(uploads)[0].shape[0]
        lora, merge, metrics = inner.aggregate(uploads, weights_of(weights, U),
                                               state["inner"], svd_metric=svd_metric)  # fmt: skip
        if noisy:
            lora = add_noise(lora, round_key(state, LORA_TAG), sigma(U), "lora", shared)
        return lora, merge, {**metrics, "dp_noise_std": jnp.float32(sigma(U) if noisy else 0)}

    def aggregate_head(state, heads, weights):
        U = len(weights)
        head = inner.aggregate_head(state["inner"], heads, weights_of(weights, U))
        if noisy:
            head = add_noise(head, round_key(state, HEAD_TAG), sigma(U), "head", shared)
        return head

    def apply(state, agg: common.Aggregate, client_ids, uploads):
        lora, inner_state = inner.apply(state["inner"], agg, client_ids, uploads)
        next_key = jax.random.key_data(round_key(state, NEXT_TAG))
        return lora, {"inner": inner_state, "noise_key": next_key}

    return inner._replace(
        init=init,
        client_start=lambda lora, state, ids, k: inner.client_start(lora, state["inner"], ids, k),
        aggregate=aggregate,
        apply=apply,
        base_delta=lambda state: inner.base_delta(state["inner"]),
        upload=upload,
        aggregate_head=aggregate_head,
    )
