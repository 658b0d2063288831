"""The frozen base with a method's merges folded in (FLoRA, FedEx), rebuilt in place.

``base_for = merged_base.make(model)``; ``base = base_for(delta)`` is ``W0 + s * delta``
(``delta``: ``{layer: [d_out, d_in]}`` in ``B @ A`` units, a method's ``base_delta``;
``model.base`` itself when ``delta`` is empty). Only the kernels ``delta`` names are
built (:func:`make_merge`); every other leaf is ``model.base``'s own buffer, and the
merged kernels have the base's dtype and sharding.

At most one merged base exists at a time. ``base_for`` keeps the kernels it built last;
called again with the same ``delta`` (the same arrays) it returns them, and called with
another it donates them to the next merge, which writes the new kernels into their
buffers: the compiled merge has no temporaries and its outputs alias the donated
kernels (``tests/test_merged_base.py``). A round therefore holds the pretrained base
once, one set of merged kernels and the method's float32 sum, never a second base.

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
  (:func:`floranna_jax.models.merged_kernels`), one layer at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import traverse_util

from floranna_jax import models

PyTree = Any


def make_merge(model, donate: bool = False) -> Callable:
    """The jitted ``merge(base, delta) -> {kernel path: kernel}``: only the kernels of
    ``base`` that ``delta`` names, each plus ``s * delta`` (:func:`models.merged_kernels`).
    The base's other leaves are unused arguments, which jit drops. ``donate``:
    ``merge(base, delta, into)``, ``into`` an earlier result for the same layer names,
    donated: the result is written into its buffers and ``into`` is deleted."""
    s = float(model.lora_scale)
    flatten = functools.partial(traverse_util.flatten_dict, sep="/")
    if not donate:
        return jax.jit(lambda base, delta: models.merged_kernels(flatten(base), delta, s))
    return jax.jit(lambda base, delta, into: models.merged_kernels(flatten(base), delta, s, into),
                   donate_argnums=2)  # fmt: skip


def _same(held: dict, delta: dict) -> bool:
    """Whether ``delta`` holds the very arrays of ``held`` (identity, not values: a
    different array of equal values is merged again, which costs time, never weights)."""
    return held.keys() == delta.keys() and all(held[k] is delta[k] for k in held)


def make(model) -> Callable[[dict], PyTree]:
    """``base_for(delta) -> model.base + s * delta``, merged in place (see the module)."""
    base = model.base
    flat = traverse_util.flatten_dict(base, sep="/")
    fresh, into = make_merge(model), make_merge(model, donate=True)
    last: dict[str, Any] = {}  # "delta": the arrays the "kernels" were built from

    def base_for(delta: dict) -> PyTree:
        if not delta:
            return base
        if last and _same(last["delta"], delta):
            kernels = last["kernels"]
        elif last and last["delta"].keys() == delta.keys():
            kernels = into(base, delta, last.pop("kernels"))
        else:
            last.clear()
            kernels = fresh(base, delta)
        last.update(delta=dict(delta), kernels=kernels)
        return traverse_util.unflatten_dict(flat | kernels, sep="/")

    return base_for
