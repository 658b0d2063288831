"""LoRA adapter pytree and its math.

Orientation follows METHOD.md: one adapted linear layer has frozen weight
``W0: [d_out, d_in]`` and the adapter adds ``s * B @ A`` with ``B: [d_out, r]`` and
``A: [r, d_in]``. Flax ``Dense`` stores its kernel transposed (``[d_in, d_out]``), so
:func:`apply` and :func:`merge_into_kernel` take the Flax kernel and do the transpose
here, once, instead of in every model.

An adapter tree is a flat dict ``layer_name -> {"A": [r, d_in], "B": [d_out, r]}``;
that is also what the server estimators consume (with a leading client axis ``U``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Adapter = dict[str, jax.Array]
AdapterTree = dict[str, Adapter]


def scale(alpha: float, r: int, rslora: bool = False) -> float:
    """LoRA scale ``s``: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    if r <= 0:
        raise ValueError(f"LoRA rank r must be positive, got r={r}")
    return float(alpha) / (math.sqrt(r) if rslora else float(r))


def init(key: jax.Array, d_in: int, d_out: int, r: int, dtype=jnp.float32) -> Adapter:
    """A fresh adapter: ``A`` random, ``B`` zero, so ``B @ A = 0`` (round 0 is the base).

    ``A`` is uniform in ``+-1/sqrt(d_in)``, the Kaiming-uniform bound PEFT uses, which
    keeps ``x @ A.T`` of unit scale for unit-scale inputs.
    """
    bound = 1.0 / math.sqrt(d_in)
    A = jax.random.uniform(key, (r, d_in), dtype, minval=-bound, maxval=bound)
    return {"A": A, "B": jnp.zeros((d_out, r), dtype)}


def init_tree(key: jax.Array, shapes: dict[str, tuple[int, int]], r: int) -> AdapterTree:
    """Fresh adapters for ``shapes: layer_name -> (d_in, d_out)``, one key per layer."""
    names = sorted(shapes)
    keys = jax.random.split(key, len(names))
    return {n: init(k, *shapes[n], r) for n, k in zip(names, keys, strict=True)}


def delta(adapter: Adapter, s: float) -> jax.Array:
    """The dense update ``s * B @ A``: ``[d_out, d_in]``. For tests and merging only."""
    return s * (adapter["B"] @ adapter["A"])


def apply(x: jax.Array, kernel: jax.Array, adapter: Adapter | None, s: float) -> jax.Array:
    """``x @ (W0 + s B A)^T`` without forming ``B A``.

    Args:
      x: ``[..., d_in]`` activations.
      kernel: Flax kernel ``W0^T``: ``[d_in, d_out]``.
      adapter: ``{"A": [r, d_in], "B": [d_out, r]}`` or None for the bare layer.
      s: LoRA scale.
    Returns:
      ``[..., d_out]``.
    """
    y = x @ kernel.astype(x.dtype)
    if adapter is None:
        return y
    low = x @ adapter["A"].astype(x.dtype).T
    return y + s * (low @ adapter["B"].astype(x.dtype).T)


def merge_into_kernel(kernel: jax.Array, dW: jax.Array, s: float = 1.0) -> jax.Array:
    """Fold a dense ``dW: [d_out, d_in]`` (B@A units) into a Flax kernel ``[d_in, d_out]``,
    summed in float32 and rounded once into the kernel's dtype."""
    if dW.shape != kernel.shape[::-1]:
        raise ValueError(f"merge shape {dW.shape} does not match kernel {kernel.shape} transposed")
    summed = kernel.astype(jnp.float32) + (s * dW.astype(jnp.float32)).T
    return summed.astype(kernel.dtype)


def merge_adapter(kernel: jax.Array, adapter: Adapter, s: float) -> jax.Array:
    """``W0^T + (s B A)^T``: the kernel whose plain forward equals :func:`apply`."""
    return merge_into_kernel(kernel, adapter["B"] @ adapter["A"], s)
