"""Weight-only quantization of the frozen base: int8 per output channel, and QLoRA's NF4.

A quantized kernel replaces a Flax kernel ``W0^T: [..., d_in, d_out]`` by a small dict
(a pytree, so it scans, vmaps and jits like the array it replaces):

    int8: {"int8": int8 [..., d_in, d_out], "scale": f32 [..., d_out]}
          W ~ int8 * scale;  scale = max_i |W[i, o]| / 127 (symmetric, per output channel)
    nf4:  {"nf4": uint8 [..., d_in/64, 32, d_out], "absmax": f32 [..., d_in/64, d_out]}
          W ~ NF4[code] * absmax; each block is 64 consecutive inputs of one output
          channel (bitsandbytes' blocks of a row-major PyTorch weight [d_out, d_in]), two
          4-bit codes per byte. Scales are not quantized again (QLoRA's optional double
          quantization is left out: it saves 0.37 of the 4.5 bits per weight).

NF4 (Dettmers et al., QLoRA, arXiv 2305.14314, sec. 3) is the 4-bit data type whose 16
levels are quantiles of N(0, 1), normalized to [-1, 1], with an exact zero: 8 positive
levels from the quantiles ``linspace(delta, 1/2, 9)[:-1]``, 7 negative ones from
``linspace(delta, 1/2, 8)[:-1]``, and 0, where ``delta = (1 - 1/30 + 1 - 1/32) / 2`` is the
midpoint of the outermost quantiles of 15 and 16 equal-probability bins (the ends of a
normal have none). :data:`NF4_LEVELS` is computed here, not copied.

Only the decoder layers' projections are quantized (:func:`quantize_base`); embeddings,
norms and the LM head stay in the base dtype (see there). The layer functions call
:func:`matmul`, which dequantizes one kernel right where it is used, inside the layer
scan, and recomputes it in the backward pass instead of saving it: at most one layer's
projection exists dequantized at a time.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from floranna_jax.errors import BadValue

METHODS = ("", "int8", "nf4")  # "": no quantization
NF4_BLOCK = 64  # weights per absmax block (QLoRA's block size)


def _nf4_levels() -> np.ndarray:
    """The 16 NormalFloat levels, sorted, in [-1, 1] with an exact 0 (see the module)."""
    ppf = statistics.NormalDist().inv_cdf
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    positive = [ppf(p) for p in np.linspace(delta, 0.5, 9)[:-1]]
    negative = [-ppf(p) for p in np.linspace(delta, 0.5, 8)[:-1]]
    levels = np.sort(np.asarray([*negative, 0.0, *positive]))
    return (levels / np.abs(levels).max()).astype(np.float32)


NF4_LEVELS = _nf4_levels()


def is_quantized(leaf) -> bool:
    """Whether ``leaf`` is a quantized kernel (a dict of one of the layouts above)."""
    return isinstance(leaf, dict) and set(leaf) in ({"int8", "scale"}, {"nf4", "absmax"})


def _safe(scale: jax.Array) -> jax.Array:
    """A divisor: an all-zero channel or block has scale 0 and quantizes to code 0."""
    return jnp.where(scale == 0, 1.0, scale)


def quantize_int8(kernel: jax.Array) -> dict:
    """``kernel [..., d_in, d_out]`` -> int8 codes and per-output-channel scales."""
    w = kernel.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=-2) / 127.0
    q = jnp.clip(jnp.round(w / _safe(scale)[..., None, :]), -127, 127).astype(jnp.int8)
    return {"int8": q, "scale": scale}


def quantize_nf4(kernel: jax.Array) -> dict:
    """``kernel [..., d_in, d_out]`` (``d_in`` a multiple of 64) -> packed NF4 codes and
    per-block absmax: each weight goes to the nearest level of ``w / absmax``."""
    *lead, d_in, d_out = kernel.shape
    w = kernel.astype(jnp.float32).reshape(*lead, d_in // NF4_BLOCK, NF4_BLOCK, d_out)
    absmax = jnp.max(jnp.abs(w), axis=-2)
    x = w / _safe(absmax)[..., None, :]
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    codes = jnp.searchsorted(midpoints, x).astype(jnp.uint8)  # nearest level, in [0, 15]
    packed = (codes[..., 0::2, :] << 4) | codes[..., 1::2, :]
    return {"nf4": packed, "absmax": absmax}


def dequantize(leaf, dtype=jnp.float32) -> jax.Array:
    """A kernel ``[..., d_in, d_out]`` in ``dtype``: computed in float32, then cast; an
    array comes back cast."""
    if not is_quantized(leaf):
        return leaf.astype(dtype)
    if "int8" in leaf:
        w = leaf["int8"].astype(jnp.float32) * leaf["scale"][..., None, :]
        return w.astype(dtype)
    packed = leaf["nf4"]
    *lead, blocks, half, d_out = packed.shape
    codes = jnp.stack([packed >> 4, packed & 15], axis=-2)  # [..., blocks, 32, 2, d_out]
    codes = codes.reshape(*lead, blocks, 2 * half, d_out)
    w = jnp.asarray(NF4_LEVELS)[codes] * leaf["absmax"][..., None, :]
    return w.reshape(*lead, blocks * 2 * half, d_out).astype(dtype)


@jax.checkpoint
def _quantized_matmul(x: jax.Array, leaf: dict) -> jax.Array:
    return x @ dequantize(leaf, x.dtype)


def matmul(x: jax.Array, kernel) -> jax.Array:
    """``x [..., d_in] @ kernel [d_in, d_out]`` in ``x.dtype``. A quantized kernel is
    dequantized here and, under autodiff, again in the backward pass (``jax.checkpoint``):
    the residual kept is the quantized kernel, never a dense copy per layer."""
    if is_quantized(kernel):
        return _quantized_matmul(x, kernel)
    return x @ kernel.astype(x.dtype)


_QUANTIZERS = {"int8": quantize_int8, "nf4": quantize_nf4}


def quantize_base(base: dict, method: str) -> dict:
    """``base`` with every kernel under ``"layers"`` (the stacked decoder projections,
    ``[N, d_in, d_out]``) quantized by ``method`` of :data:`METHODS`, layer by layer.

    The embedding, norms and LM head stay as they are: the embedding is a gather (one row
    per token, no matmul to save), norms are ``d`` numbers, and the head's vocabulary
    logits feed the loss directly, where QLoRA too keeps 16-bit weights. Raises
    :class:`BadValue` (``quantize``) for an unknown method, a base without stacked
    decoder layers (an encoder's layers do not dequantize), or an NF4 kernel whose ``d_in``
    is not a multiple of 64.
    """
    if method not in METHODS:
        raise BadValue("quantize", f"unknown {method!r}; valid: {', '.join(map(repr, METHODS))}")
    if not method:
        return base
    flat = traverse_util.flatten_dict(base, sep="/")
    kernels = [p for p in flat if p.startswith("layers/") and p.endswith("/kernel")]
    if not kernels:
        raise BadValue("quantize", f"{method!r} is for decoder models (stacked layers) only; "
                       'use ""')  # fmt: skip
    one_layer = jax.jit(lambda k: jax.lax.map(_QUANTIZERS[method], k))
    for path in kernels:
        if method == "nf4" and flat[path].shape[-2] % NF4_BLOCK:
            raise BadValue("quantize", f"nf4 needs d_in a multiple of {NF4_BLOCK}; {path} "
                           f"has {flat[path].shape[-2]}: use int8")  # fmt: skip
        flat[path] = one_layer(flat[path])
    return traverse_util.unflatten_dict(flat, sep="/")


def dequantize_base(base: dict) -> dict:
    """``base`` with every quantized kernel dequantized to float32, the other leaves as
    they are: the plain weights a quantized model computes with (merging, export)."""
    return jax.tree.map(
        lambda x: dequantize(x) if is_quantized(x) else x, base, is_leaf=is_quantized
    )


def tree_bytes(tree) -> int:
    """Bytes of all array leaves of ``tree``."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
