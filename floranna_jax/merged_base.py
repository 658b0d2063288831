"""The frozen base with a method's merges folded in (FLoRA, FedEx), rebuilt in place.

``base_for = merged_base.make(model)``; ``base = base_for(delta)`` is ``W0 + s * delta``
(``delta``: ``{layer: [d_out, d_in]}`` in ``B @ A`` units, a method's ``base_delta``;
``model.base`` itself when ``delta`` is empty). Only the kernels ``delta`` names are
built (:func:`make_merge`, layer by layer); every other leaf is ``model.base``'s own buffer, and the
merged kernels have the base's dtype and sharding.

At most one merged base exists at a time. ``base_for`` keeps the kernels it built last;
called again with the same ``delta`` (the same arrays) it returns them, and called with
another it donates them to the next merge, which writes the new kernels into their
buffers (the first merge writes into a copy of the pretrained kernels). The merge runs
one layer per call (:func:`make_merge`): compiled, it has no temporaries and its output
is the donated kernel stack (``tests/test_merged_base.py``; 0 bytes of temporaries for a
LLaMA-2-7B stack of 32 q kernels in bfloat16 too). One program for every layer at once
had none for a few layers, but XLA:CPU converted each whole stack to float32 once it
had 16 layers or more (4.3 GB of temporaries for LLaMA-2-7B's q and v, measured). A round
therefore holds the pretrained base once, one set of merged kernels and the method's
float32 sum, never a second base.

The contract that makes donation safe: **a base from** ``base_for`` **is valid until the
next call with another delta** (that call deletes its merged kernels). Nothing keeps
one across such a call: the round's transport merges for its training and its clients'
evaluation, the run for its global evaluation (``train.Run.base_of``), each right before
its programs run; a round reports the ``delta`` its clients trained on, not their base
(``rounds.RoundOutput``); the round state and the checkpoints hold the method's sum, never
the base, and the sum is never donated (a checkpoint may still be writing it); the plan
compiles the donated merge on shapes alone. A caller that broke the contract would get
JAX's "Array has been deleted" error, never another base's weights. The run evaluates its
clients before the global model, so an evaluation round merges once (the round's new
delta), not three times.

Float32 accumulation is kept in two places, both for exactness:

- the method state sums every round's merge in float32 (``server.merging``), and the
  base is always rebuilt as ``W0 + s * sum`` from the pretrained kernels, never merged
  round on round: rounding a bfloat16 base each round would drop every merge below half
  an ulp of ``W0`` (about 0.2% of a weight) and make the base depend on the rounds'
  history, which a checkpoint (the sum, never the base) could not restore bit for bit.
  The price is that the pretrained kernels the merges touch stay beside their merged
  copies (q and v of LLaMA-2-7B: 16% of the base);
- each merged kernel is summed in float32 and rounded once into its own dtype
  (:func:`make_merge`), one layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from floranna_jax import lora as lora_lib
from floranna_jax import models

PyTree = Any


def make_merge(model) -> Callable:
    """The jitted ``merge(kernel, index, dW, into) -> into`` of one layer: ``into`` (donated,
    deleted) with ``kernel``'s layer ``index`` plus ``s * dW`` in its place (``kernel``:
    a stack ``[L, d_in, d_out]``, or one kernel ``[d_in, d_out]`` and ``index`` unused;
    ``dW``: ``[d_out, d_in]``), summed in float32 and rounded once into the kernel's dtype
    (``lora.merge_into_kernel``). The index is traced: one compilation per kernel shape."""
    s = float(model.lora_scale)

    def merge(kernel, index, dW, into):
        if kernel.ndim == dW.ndim:  # one kernel, not a stack
            return lora_lib.merge_into_kernel(kernel, dW, s)
        layer = jax.lax.dynamic_index_in_dim(kernel, index, keepdims=False)
        new = lora_lib.merge_into_kernel(layer, dW, s)
        return jax.lax.dynamic_update_index_in_dim(into, new, index, 0)

    return jax.jit(merge, donate_argnums=3)


def _same(held: dict, delta: dict) -> bool:
    """Whether ``delta`` holds the very arrays of ``held`` (identity, not values: a
    different array of equal values is merged again, which costs time, never weights)."""
    return held.keys() == delta.keys() and all(held[k] is delta[k] for k in held)


def make(model) -> Callable[[dict], PyTree]:
    """``base_for(delta) -> model.base + s * delta``, merged in place (see the module)."""
    base = model.base
    flat = traverse_util.flatten_dict(base, sep="/")
    merge = make_merge(model)
    last: dict[str, Any] = {}  # "delta": the arrays the "kernels" were built from

    def build(delta: dict, into: dict) -> dict:
        out = {}
        for path, named in models.merged_kernel_paths(flat, delta).items():
            target = into[path] if into else jnp.copy(flat[path])
            for name, index in named:
                target = merge(flat[path], index or 0, delta[name], target)
            out[path] = target
        return out

    def base_for(delta: dict) -> PyTree:
        if not delta:
            return base
        if last and _same(last["delta"], delta):
            kernels = last["kernels"]
        else:
            same_layers = last and last["delta"].keys() == delta.keys()
            kernels = build(delta, last.pop("kernels") if same_layers else {})
        last.clear()
        last.update(delta=dict(delta), kernels=kernels)
        return traverse_util.unflatten_dict(flat | kernels, sep="/")

    return base_for
