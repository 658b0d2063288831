"""A built model: :class:`Model` = frozen ``base`` + ``trainable`` LoRA and head + ``apply``.

Everything that turns a config into a :class:`Model` and back, whatever the family:
:func:`architecture` picks the family's ``make`` from :data:`FAMILIES` (cached by value,
so rebuilding a model reuses its jit compilations); :func:`build_random` and
:func:`load_pretrained` fill the base (random, or from a Hugging Face folder) and draw
fresh adapters ``{"A": [r, d_in], "B": [d_out, r]}`` with ``B = 0``;
:func:`save_pretrained` writes base + head back; :func:`merge_into_base` folds dense
``[d_out, d_in]`` updates into the frozen kernels.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from absl import logging
from flax import traverse_util

from floranna_jax import lora as lora_lib
from floranna_jax.errors import BadValue
from floranna_jax.models import encoder, loading
from floranna_jax.models.architecture import Architecture, Params

FAMILIES: dict[str, Callable[..., Architecture]] = {"bert": encoder.make, "roberta": encoder.make}
# The names a LoRA target may take in each family.
TARGETS: dict[str, tuple[str, ...]] = {"bert": encoder.TARGETS, "roberta": encoder.TARGETS}


class LoraSpec(NamedTuple):
    """Which projections carry LoRA and how it is scaled.

    Fields: rank ``r``; ``alpha`` (scale ``alpha/r``, or ``alpha/sqrt(r)`` with
    ``rslora``); ``targets`` among ``encoder.TARGETS`` = query, key, value, attn_out,
    mlp_up, mlp_down (empty: no adapters, head-only training); ``dropout`` on the adapter
    input during training.
    """

    rank: int = 16
    alpha: float = 16.0
    rslora: bool = False
    targets: tuple[str, ...] = ("query", "value")
    dropout: float = 0.0


class Model(NamedTuple):
    """A built model. ``apply(base, trainable, batch, *, deterministic=True,
    dropout_key=None) -> [b, num_labels]`` float32 logits (regression: ``[b, 1]``).

    ``batch``: ``input_ids`` int32 ``[b, L]``; ``attention_mask`` int32 ``[b, L]``
    (absent: all ones); ``token_type_ids`` int32 ``[b, L]`` (absent: zeros). Or ``b``
    examples packed in ``R`` rows of ``T`` tokens (:mod:`floranna_jax.packing`):
    ``input_ids``, ``token_type_ids``, ``segment_ids``, ``positions`` ``[R, T]`` and
    ``starts`` ``[b]``; the logits are the same as padded, one row per example.
    """

    base: Params
    trainable: dict[str, Any]
    apply: Callable[..., jax.Array]
    lora_scale: float
    config: dict


def tiny_config(model_type: str = "bert") -> dict:
    """A tiny Hugging Face style config (vocab 1000, hidden 64, 2 layers, 4 heads)."""
    return encoder.tiny_config(model_type)


def architecture(
    hf_config: dict, num_labels: int, lora: LoraSpec, compute_dtype=jnp.float32
) -> Architecture:
    """The family's :class:`Architecture` for a config dict; unknown types raise.

    Cached by value: rebuilding the same model returns the same ``apply`` and ``init``
    functions, so their jit compilations are reused instead of repeated.
    """
    model_type = hf_config.get("model_type")
    check_lora(lora, model_type)
    lora = lora._replace(targets=tuple(lora.targets))
    config_json = json.dumps(hf_config, sort_keys=True, default=str)
    return _architecture(config_json, num_labels, lora, jnp.dtype(compute_dtype).name)


def check_lora(lora: LoraSpec, model_type: str) -> None:
    """Raise ``ValueError`` for an unknown ``model_type`` and :class:`BadValue` naming the
    first bad field of ``lora`` (rank, alpha, dropout, targets of that family)."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} not supported; known: {sorted(FAMILIES)}")
    if isinstance(lora.rank, bool) or not (isinstance(lora.rank, int) and lora.rank >= 1):
        raise BadValue("rank", f"must be a positive integer, got {lora.rank!r}")
    if not (isinstance(lora.alpha, int | float) and 0 < lora.alpha < float("inf")):
        raise BadValue("alpha", f"must be a finite number > 0, got {lora.alpha!r}")
    if not (isinstance(lora.dropout, int | float) and 0.0 <= lora.dropout < 1.0):
        raise BadValue("dropout", f"must be in [0, 1), got {lora.dropout!r}")
    targets = lora.targets
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise BadValue("targets", f"must be a tuple of names, got {targets!r}")
    unknown = [t for t in targets if t not in TARGETS[model_type]]
    if unknown:
        raise BadValue(
            "targets", f"unknown {unknown} for a {model_type} model; valid: "
            f"{', '.join(TARGETS[model_type])}"
        )  # fmt: skip


@functools.lru_cache(maxsize=32)
def _architecture(config_json: str, num_labels: int, lora: LoraSpec, dtype: str) -> Architecture:
    hf_config = json.loads(config_json)
    return FAMILIES[hf_config["model_type"]](
        hf_config,
        num_labels=num_labels,
        targets=lora.targets,
        lora_scale=lora_lib.scale(lora.alpha, lora.rank, lora.rslora),
        lora_dropout=lora.dropout,
        compute_dtype=jnp.dtype(dtype),
    )


def _keys(key: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(base, head, lora) keys; the same split in build_random and load_pretrained."""
    key = jax.random.key(0) if key is None else key
    k_base, k_head, k_lora = jax.random.split(key, 3)
    return k_base, k_head, k_lora


def _assemble(arch, base, head, lora, k_lora, hf_config) -> Model:
    adapters = lora_lib.init_tree(k_lora, arch.lora_shapes, lora.rank) if arch.lora_shapes else {}
    return Model(
        base=base,
        trainable={"lora": adapters, "head": head},
        apply=arch.apply,
        lora_scale=lora_lib.scale(lora.alpha, lora.rank, lora.rslora),
        config=dict(hf_config),
    )


def build_random(
    hf_config: dict,
    num_labels: int = 2,
    lora: LoraSpec = LoraSpec(),  # noqa: B008 (immutable NamedTuple)
    key: jax.Array | None = None,
    compute_dtype=jnp.float32,
) -> Model:
    """A model with a random base (no files, no network); ``key=None`` means key(0)."""
    arch = architecture(hf_config, num_labels, lora, compute_dtype)
    k_base, k_head, k_lora = _keys(key)
    base = arch.init_base(k_base)
    head = arch.init_head(k_head)
    return _assemble(arch, base, head, lora, k_lora, hf_config)


def load_pretrained(
    path_or_hub_id: str | os.PathLike,
    num_labels: int = 2,
    lora: LoraSpec = LoraSpec(),  # noqa: B008 (immutable NamedTuple)
    key: jax.Array | None = None,
    compute_dtype=jnp.float32,
    *,
    load_head: bool = True,
) -> Model:
    """A model whose base comes from a Hugging Face folder (or hub id, when online).

    Checkpoint and model must agree exactly (see :mod:`loading`); the task head is read
    when the checkpoint has one of the right size and ``load_head``, else fresh (logged).
    """
    folder = loading.resolve_folder(path_or_hub_id)
    hf_config = loading.read_config(folder)
    arch = architecture(hf_config, num_labels, lora, compute_dtype)
    _, k_head, k_lora = _keys(key)
    base, head = loading.load_params(arch, folder, head_key=k_head, load_head=load_head)
    logging.info("loaded %s model from %s", hf_config["model_type"], folder)
    return _assemble(arch, base, head, lora, k_lora, hf_config)


def save_pretrained(model: Model, folder: str | os.PathLike) -> None:
    """Write base + head as a Hugging Face folder (adapters are not saved: merge first)."""
    num_labels = jax.tree.leaves(model.trainable["head"])[-1].shape[-1]
    arch = architecture(model.config, num_labels, LoraSpec(targets=()))
    config = dict(model.config, num_labels=num_labels)
    config.pop("id2label", None)
    config.pop("label2id", None)
    loading.save_folder(folder, config, arch, model.base, model.trainable["head"])


def merge_into_base(base: Params, merges: dict[str, jax.Array], s: float) -> Params:
    """Fold dense updates ``merges[layer_name]: [d_out, d_in]`` (B@A units, scaled by ``s``)
    into the matching frozen kernels; returns a new base, the input is untouched.

    Raises ``ValueError`` naming every ``layer_name`` without a kernel in ``base``.
    """
    flat = traverse_util.flatten_dict(base, sep="/")
    unknown = sorted(n for n in merges if f"{n}/kernel" not in flat)
    if unknown:
        raise ValueError(f"merge_into_base: no kernel for layer names {unknown}")
    for name, dW in merges.items():
        flat[f"{name}/kernel"] = lora_lib.merge_into_kernel(flat[f"{name}/kernel"], dW, s)
    return traverse_util.unflatten_dict(flat, sep="/")
