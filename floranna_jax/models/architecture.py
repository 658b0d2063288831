"""What a model family (BERT/RoBERTa encoder today, LLaMA-style decoders later) provides.

:mod:`floranna_jax.models` builds every model from one :class:`Architecture`: random
initialization, the forward pass, which projections carry LoRA, and how parameter paths
map to checkpoint names. A new family is one module with a ``make(hf_config, ...)``
returning this tuple, plus one entry in ``models.FAMILIES``; loading, LoRA
initialization and merging are shared.

Parameter trees are plain nested dicts. An adapted projection lives at the path named by
its LoRA ``layer_name`` (``"layer_0/attention/query"`` -> ``base["layer_0"]["attention"]
["query"]["kernel"]``), which is what lets :func:`models.merge_into_base` stay generic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Params = dict[str, Any]


class Architecture(NamedTuple):
    """One model family instantiated for one config, head size and LoRA setting.

    Fields:
      base_shapes: tree of ``jax.ShapeDtypeStruct``: the frozen weights (no adapters,
        no head); what a checkpoint must provide.
      head_shapes: tree of ``jax.ShapeDtypeStruct``: the task head.
      init_base: ``key -> base``: random frozen weights, float32 (need not be traceable).
      init_head: ``key -> head``: a fresh task head, float32.
      apply: ``(base, trainable, batch, *, deterministic=True, dropout_key=None)
        -> [b, num_labels]`` float32 logits, where ``trainable = {"lora": ..., "head": ...}``.
      lora_shapes: ``layer_name -> (d_in, d_out)`` for every adapted projection.
      checkpoint_name: parameter path (a tuple; head paths start with ``"head"``) ->
        canonical checkpoint name, e.g. ``("layer_0", "attention", "query", "kernel")``
        -> ``"encoder.layer.0.attention.self.query.weight"``. Leaves named ``kernel``
        are stored transposed (``[d_out, d_in]``, the PyTorch Linear layout).
      canonical_key: raw checkpoint key -> canonical name (prefixes and legacy names
        normalized), or None for a key that is known and deliberately unused (buffers,
        pre-training heads).
      checkpoint_prefix: what a Hugging Face ``*ForSequenceClassification`` checkpoint
        puts before base names (``"bert."``); used when writing a checkpoint.
    """

    base_shapes: Params
    head_shapes: Params
    init_base: Callable[[jax.Array], Params]
    init_head: Callable[[jax.Array], Params]
    apply: Callable[..., jax.Array]
    lora_shapes: dict[str, tuple[int, int]]
    checkpoint_name: Callable[[tuple[str, ...]], str]
    canonical_key: Callable[[str], str | None]
    checkpoint_prefix: str
