"""What one client computes in a round: its optimizer and its local steps.

A client starts from the broadcast global trainable tree (LoRA factors ``A``, ``B``
and any head) and takes ``E`` optimizer steps on its own data (:func:`make_local_update`,
a ``lax.scan`` over steps). The frozen base is an argument, never part of the carried
state, so it is neither differentiated nor stored in optimizer state. How many clients
run at once, and on which devices: :mod:`floranna_jax.runners`.

Shapes: ``U`` clients, ``S`` local steps (padded), ``b`` examples per step, as one batch
or as ``M`` micro-batches of ``b/M`` whose gradients make the step's one update. Unequal
clients are padded to ``S`` steps with ``step_mask`` (1 real, 0 padded); a padded
step leaves parameters and optimizer state bit-identical, and a padded client is a
client whose ``step_mask`` is all zero.

Randomness: the caller gives each client its dropout key (``keys.dropout_keys``); step
``t`` uses ``fold_in(key, t)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from floranna_jax.errors import BadValue

PyTree = Any
LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array], jax.Array]
Frozen = Callable[[tuple[str, ...], jax.Array], bool] | PyTree | None
LocalUpdate = Callable[..., tuple[PyTree, PyTree, dict[str, jax.Array]]]


def _adamw(learning_rate, weight_decay):
    return optax.adamw(learning_rate, weight_decay=weight_decay)


def _sgd(learning_rate, weight_decay):
    if weight_decay == 0.0:
        return optax.sgd(learning_rate)
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate))


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": _adamw,
    "sgd": _sgd,
}


def make_optimizer(
    name: str, learning_rate: float, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """The client optimizer chosen by name from :data:`OPTIMIZERS` (``"adamw"``, ``"sgd"``).

    ``weight_decay`` is decoupled for AdamW and added to the gradient for SGD.
    """
    if name not in OPTIMIZERS:
        raise BadValue("optimizer", f"unknown {name!r}; valid: {', '.join(sorted(OPTIMIZERS))}")
    if not finite_float32(learning_rate) or not learning_rate > 0:
        raise BadValue(
            "learning_rate", f"must be a number > 0, finite in float32; got {learning_rate!r}"
        )
    if not finite_float32(weight_decay) or weight_decay < 0:
        raise BadValue(
            "weight_decay", f"must be a number >= 0, finite in float32; got {weight_decay!r}"
        )
    return OPTIMIZERS[name](learning_rate, weight_decay)


def finite_float32(value) -> bool:
    """A real number that float32, the dtype of every update, holds as a finite value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.float32(value)))


def path_names(path) -> tuple[str, ...]:
    """A jax key path as a tuple of str names, e.g. ``("lora", "layer_0/attention/query", "A")``."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            names.append(str(entry))
    return tuple(names)


def frozen_mask(frozen: Frozen, trainable: PyTree) -> PyTree:
    """Static bool tree shaped like ``trainable``: True where the leaf is frozen.

    ``frozen`` is None (nothing frozen), a callable ``(path, leaf) -> bool`` whose
    path is a tuple of str keys (e.g. ``("lora", "l0", "A")``), or a bool tree.
    """
    if frozen is None:
        return jax.tree.map(lambda _: False, trainable)
    if callable(frozen):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: bool(frozen(path_names(p), x)), trainable
        )
    return jax.tree.map(bool, frozen)


def _state_mask(opt: optax.GradientTransformation, state: PyTree, mask: PyTree) -> PyTree:
    """``mask`` copied onto every parameter-shaped tree inside ``state``; False elsewhere."""
    return optax.tree_utils.tree_map_params(
        opt,
        lambda _, m: m,
        state,
        mask,
        transform_non_params=lambda v: jax.tree.map(lambda _: False, v),
    )


def init_opt_state(opt: optax.GradientTransformation, trainable: PyTree) -> PyTree:
    """One client's optimizer state: ``opt.init(trainable)``.

    Frozen leaves keep a state slot, but :func:`make_local_update` never changes it,
    so the same state serves any ``frozen`` choice.
    """
    return opt.init(trainable)


def _select(keep_new: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


def _micro_grads(grad_fn, base, params, batches, key) -> tuple[jax.Array, PyTree]:
    """``(loss, grads)`` of one step whose batch comes as ``M`` micro-batches ``[M, b/M,
    ...]``, one after another in a ``lax.scan`` (activations of one micro-batch at a time).

    With ``(loss_k, w_k)`` the mean loss of micro-batch ``k`` and its weight (examples or
    tokens), the step's mean is ``sum_k w_k loss_k / sum_k w_k``, so its gradient is
    ``sum_k w_k grad loss_k / sum_k w_k``: the whole batch's gradient, summed in float32.
    Micro-batch ``k`` draws its dropout from ``fold_in(key, k)``.
    """

    def micro(acc, xs):
        batch, k = xs
        (loss, weight), grads = grad_fn(base, params, batch, jax.random.fold_in(key, k))
        total, grad_sum, weights = acc
        grad_sum = jax.tree.map(lambda s, g: s + weight * g, grad_sum, grads)
        return (total + weight * loss, grad_sum, weights + weight), None

    M = jax.tree.leaves(batches)[0].shape[0]
    zero = jnp.zeros((), jnp.float32)
    start = (zero, jax.tree.map(jnp.zeros_like, params), zero)
    (total, grad_sum, weights), _ = jax.lax.scan(
        micro, start, (batches, jnp.arange(M, dtype=jnp.int32))
    )
    weights = jnp.maximum(weights, 1.0)  # as the losses do: an all-padding batch is 0
    return total / weights, jax.tree.map(lambda g: g / weights, grad_sum)


def make_local_update(
    loss_fn: LossFn,
    opt: optax.GradientTransformation,
    frozen: Frozen = None,
    on_step: Callable[..., None] | None = None,
    micro_batched: bool = False,
) -> LocalUpdate:
    """Build ``local_update`` for ONE client: ``S`` masked optimizer steps in a ``lax.scan``.

    Args:
      loss_fn: ``(base, trainable, batch, dropout_key) -> (loss, weight)``: the mean loss
        over the batch and what it averages over (real examples or tokens); the batch
        carries ``"mask": [b]`` for padded examples.
      opt: the client optimizer (:func:`make_optimizer`).
      frozen: leaves that never train (FFA-LoRA: ``lambda path, _: path[-1] == "A"``);
        their gradient is zeroed before ``opt.update``, their update after it, and
        their optimizer state is kept as it was, so they stay bit-identical.
      on_step: a host function called (``jax.debug.callback``, no result) once per step
        of the scan, with the step index; vmapped clients share one call per step (the
        index is the same for all). A progress bar (:mod:`floranna_jax.progress`); it
        reads no parameter, so the numbers are the same with or without it.
      micro_batched: each step's batch comes as ``M`` micro-batches whose gradients are
        summed, weighted, before the step's one optimizer update (:func:`_micro_grads`).

    Returns:
      ``local_update(base, trainable, opt_state, batches, step_mask, key)`` ->
      ``(trainable, opt_state, metrics)`` with ``batches`` a tree of ``[S, b, ...]``
      (micro-batched: ``[S, M, b/M, ...]``), ``step_mask: [S]`` float32 and ``key`` the
      client's typed PRNG key. ``metrics``: ``"loss"`` the mean pre-update loss over real
      steps (0 if none; NaN/inf if any real step was non-finite) and ``"steps"`` the
      number of real steps (int32).
    """
    grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)

    def step_grads(base, params, batch, key):
        if micro_batched:
            return _micro_grads(grad_fn, base, params, batch, key)
        (loss, _), grads = grad_fn(base, params, batch, key)
        return loss, grads

    def local_update(base, trainable, opt_state, batches, step_mask, key):
        mask = frozen_mask(frozen, trainable)
        state_mask = _state_mask(opt, opt_state, mask)

        def step(carry, xs):
            params, state = carry
            batch, real, t = xs
            if on_step is not None:
                jax.debug.callback(on_step, t)
            loss, grads = step_grads(base, params, batch, jax.random.fold_in(key, t))
            grads = jax.tree.map(lambda g, m: jnp.zeros_like(g) if m else g, grads, mask)
            updates, new_state = opt.update(grads, state, params)
            updates = jax.tree.map(lambda u, m: jnp.zeros_like(u) if m else u, updates, mask)
            new_params = optax.apply_updates(params, updates)
            new_state = jax.tree.map(lambda m, n, o: o if m else n, state_mask, new_state, state)
            # A padded step must not move anything, even if its loss or grads are NaN.
            is_real = real > 0
            carry = (_select(is_real, new_params, params), _select(is_real, new_state, state))
            return carry, jnp.where(is_real, loss, 0.0)

        num_steps = step_mask.shape[0]
        xs = (batches, step_mask, jnp.arange(num_steps, dtype=jnp.int32))
        (trainable, opt_state), losses = jax.lax.scan(step, (trainable, opt_state), xs)
        real_steps = jnp.sum(step_mask > 0)
        loss = jnp.sum(losses) / jnp.maximum(real_steps, 1).astype(losses.dtype)
        return trainable, opt_state, {"loss": loss, "steps": real_steps.astype(jnp.int32)}

    return local_update
