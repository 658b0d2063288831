"""What a model family (BERT/RoBERTa encoder today, LLaMA-style decoders later) provides.

:mod:`floranna_jax.models` builds every model from one :class:`Architecture`: random
initialization, the forward pass, which projections carry LoRA, and how parameter paths
map to checkpoint names. A new family is one module with a ``make(hf_config, ...)``
returning this tuple, plus one entry in ``models.FAMILIES``; loading, LoRA
initialization and merging are shared.

Parameter trees are plain nested dicts. An adapted projection lives at the path named by
its LoRA ``layer_name`` (``"layer_0/attention/query"`` -> ``base["layer_0"]["attention"]
["query"]["kernel"]``), which is what lets :func:`models.merge_into_base` stay generic.

Stacked layers: a family that runs its layers under one ``scan`` keeps them in one
subtree whose leaves carry a leading layer axis, e.g. ``base["layers"]["attn"]["q_proj"]
["kernel"]: [N, d_in, d_out]``, and lists that subtree in ``Architecture.stacked``. Layer
``i`` of it is then named as if it were its own subtree ``"layers_{i}"``: LoRA layer names
(``"layers_3/attn/q_proj"``), checkpoint names and merging all use that per-layer form
(:func:`split_stacked`), so adapters, checkpoints and server estimators stay per layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]


class Architecture(NamedTuple):
    """One model family instantiated for one config, head size and LoRA setting.

    Fields:
      base_shapes: tree of ``jax.ShapeDtypeStruct``: the frozen weights (no adapters,
        no head); what a checkpoint must provide.
      head_shapes: tree of ``jax.ShapeDtypeStruct``: the task head.
      init_base: ``key -> base``: random frozen weights, float32 (need not be traceable).
      init_head: ``key -> head``: a fresh task head, float32.
      apply: ``(base, trainable, batch, *, deterministic=True, dropout_key=None)`` where
        ``trainable = {"lora": ..., "head": ...}``; what it returns is the family's
        training output: encoders ``[b, num_labels]`` float32 logits, decoders the
        per-example causal-LM sums ``(nll [b], tokens [b])`` float32.
      lora_shapes: ``layer_name -> (d_in, d_out)`` for every adapted projection.
      checkpoint_name: parameter path (a tuple; head paths start with ``"head"``) ->
        canonical checkpoint name, e.g. ``("layer_0", "attention", "query", "kernel")``
        -> ``"encoder.layer.0.attention.self.query.weight"``. Leaves named ``kernel``
        are stored transposed (``[d_out, d_in]``, the PyTorch Linear layout).
      canonical_key: raw checkpoint key -> canonical name (prefixes and legacy names
        normalized), or None for a key that is known and deliberately unused (buffers,
        pre-training heads).
      checkpoint_prefix: what a Hugging Face ``*ForSequenceClassification`` checkpoint
        puts before base names (``"bert."``); used when writing a checkpoint. Empty when
        ``checkpoint_name`` already gives the full names (decoders: ``"model.layers..."``).
      stacked: the top-level subtrees of ``base`` whose leaves stack the layers along
        axis 0; ``checkpoint_name`` and LoRA names see layer ``i`` as ``"{name}_{i}"``.
      name: the family's name in messages (``"llama"``); default: from the prefix.
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
    stacked: tuple[str, ...] = ()
    name: str = ""


_STACKED_NAME = re.compile(r"^(?P<stack>[^/]+)_(?P<index>[0-9]+)(?P<rest>/.*)?$")


# What every family's config.json must give; a family checks its own fields beyond these.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


def check_required(hf_config: dict, model_type: str) -> None:
    """Raise ``ValueError`` naming the :data:`REQUIRED_FIELDS` ``hf_config`` lacks."""
    missing = [k for k in REQUIRED_FIELDS if k not in hf_config]
    if missing:
        raise ValueError(f"{model_type} config lacks {missing}")


def split_stacked(name: str) -> tuple[str, int, str] | None:
    """``"layers_3/attn/q_proj"`` -> ``("layers", 3, "attn/q_proj")``; None for a name
    with no ``_{i}`` ending its first part. Whether ``"layers"`` is a stack is the
    caller's question (``Architecture.stacked``, or whether the base has that subtree)."""
    m = _STACKED_NAME.match(name)
    if m is None:
        return None
    return m["stack"], int(m["index"]), (m["rest"] or "").lstrip("/")


def table_name(path: tuple[str, ...], modules: dict[str, str], leaves: dict[str, str],
               layer: str) -> str:  # fmt: skip
    """A parameter path -> checkpoint name through two tables: ``modules`` maps the
    "/"-joined module path, with a first part ``"{layer}_{i}"`` written ``"{layer}_{{i}}"``,
    to a name that may hold ``{i}``; ``leaves`` maps the leaf (``kernel`` -> ``weight``).
    ``KeyError`` for a path neither table knows."""
    *module, leaf = path
    index = None
    if module and module[0].startswith(f"{layer}_"):
        index, module[0] = module[0].removeprefix(f"{layer}_"), f"{layer}_{{i}}"
    key = "/".join(module)
    if key not in modules or leaf not in leaves:
        raise KeyError(f"no checkpoint name for parameter {'/'.join(path)}")
    return f"{modules[key].format(i=index)}.{leaves[leaf]}"


def _rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded by a jax key (typed or raw uint32)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())


def init_like(shapes: Params, key: jax.Array, std: float) -> Params:
    """Hugging Face's init for a tree of shapes: kernels and embeddings ``N(0, std^2)``,
    biases 0, norm scales 1; float32.

    numpy, not XLA: compiling a jitted random init of every layer costs seconds on a
    CPU, filling arrays costs milliseconds; the result is still a function of ``key``.
    """
    rng = _rng(key)

    def leaf(path, s):
        name = path[-1].key
        if name in ("kernel", "embedding"):
            return jnp.asarray(rng.normal(0.0, std, s.shape), jnp.float32)
        return jnp.full(s.shape, 1.0 if name == "scale" else 0.0, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)
