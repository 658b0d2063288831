"""A built model: :class:`Model` = frozen ``base`` + ``trainable`` LoRA and head + ``apply``.

Everything that turns a config into a :class:`Model` and back, whatever the family:
:func:`architecture` picks the family's ``make`` from :data:`FAMILIES` (cached by value,
so rebuilding a model reuses its jit compilations); :func:`build_random` and
:func:`load_pretrained` fill the base (random, or from a Hugging Face folder) and draw
fresh adapters ``{"A": [r, d_in], "B": [d_out, r]}`` with ``B = 0``;
:func:`save_pretrained` writes base + head back; :func:`merge_into_base` folds dense
``[d_out, d_in]`` updates into the frozen kernels (also into a layer of stacked kernels).

The frozen base is float32 or bfloat16 (``base_dtype``; :func:`resolve_base_dtype` turns a
config's ``"auto"`` into one); adapters and the head are always float32.

Family options beyond the shared ones (decoders: ``remat``, ``loss_chunk_elements``) pass
through :func:`build_random` / :func:`load_pretrained` as keyword arguments.
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
from floranna_jax.models import decoder, encoder, loading
from floranna_jax.models.architecture import Architecture, Params, split_stacked

_ENCODER_DEFAULT_TARGETS = ("query", "value")
FAMILIES: dict[str, Callable[..., Architecture]] = {
    **{name: encoder.make for name in encoder.MODEL_TYPES},
    **{name: decoder.make for name in decoder.MODEL_TYPES},
}
# The names a LoRA target may take in each family (decoders: their record's targets).
TARGETS: dict[str, tuple[str, ...]] = {
    **{name: encoder.TARGETS for name in encoder.MODEL_TYPES},
    **{name: f.targets for name, f in decoder.FAMILIES.items()},
}
# What LoraSpec(targets=None) adapts in each family.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **{name: _ENCODER_DEFAULT_TARGETS for name in encoder.MODEL_TYPES},
    **{name: f.default_targets for name, f in decoder.FAMILIES.items()},
}


BASE_DTYPES = ("auto", "float32", "bfloat16")


def resolve_base_dtype(name: str, backend: str | None = None) -> jnp.dtype:
    """The frozen base's dtype for a name of :data:`BASE_DTYPES`. ``"auto"``: bfloat16 on an
    accelerator (half the memory, full-rate matmuls), float32 on a CPU (whose XLA upcasts
    bfloat16 matmuls: no speed to gain, and CPU runs stay bit-exact as before). ``backend``
    (``"cpu"``, ``"gpu"``, ``"tpu"``): the one the run is for; default this process's (a plan
    made on a CPU for a GPU passes the GPU's)."""
    if name not in BASE_DTYPES:
        raise BadValue("base_dtype", f"unknown {name!r}; valid: {', '.join(BASE_DTYPES)}")
    if name == "auto":
        name = "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"
    return jnp.dtype(name)


class LoraSpec(NamedTuple):
    """Which projections carry LoRA and how it is scaled.

    Fields: rank ``r``; ``alpha`` (scale ``alpha/r``, or ``alpha/sqrt(r)`` with
    ``rslora``); ``targets`` among the family's :data:`TARGETS` (encoders: query, key,
    value, attn_out, mlp_up, mlp_down; decoders: q_proj, k_proj, v_proj, o_proj,
    gate_proj, up_proj, down_proj, Phi-3 qkv_proj, o_proj, gate_up_proj, down_proj;
    empty: no adapters, head-only training; None: the family's :data:`DEFAULT_TARGETS`,
    query+value / q_proj+v_proj / qkv_proj); ``dropout`` on the adapter input during
    training.
    """

    rank: int = 16
    alpha: float = 16.0
    rslora: bool = False
    targets: tuple[str, ...] | None = None
    dropout: float = 0.0


class Model(NamedTuple):
    """A built model. ``apply(base, trainable, batch, *, deterministic=True,
    dropout_key=None)``: encoders return ``[b, num_labels]`` float32 logits (regression:
    ``[b, 1]``); decoders the per-example causal-LM sums ``(nll [b], tokens [b])`` (see
    :mod:`floranna_jax.models.decoder.family` for their batches: ``loss_mask`` added).

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
    """A tiny Hugging Face style config: encoders vocab 1000, hidden 64, 2 layers, 4
    heads; decoders vocab 512, hidden 64, 2 layers, 4 query and 2 key/value heads (see
    :func:`decoder.tiny_config`)."""
    if model_type in decoder.MODEL_TYPES:
        return decoder.tiny_config(model_type)
    return encoder.tiny_config(model_type)


def architecture(
    hf_config: dict, num_labels: int, lora: LoraSpec, compute_dtype=jnp.float32, **options
) -> Architecture:
    """The family's :class:`Architecture` for a config dict; unknown types raise.

    ``options``: the family's own keyword arguments (decoders: ``remat``,
    ``loss_chunk_elements``). Cached by value: rebuilding the same model returns the same
    ``apply`` and ``init`` functions, so their jit compilations are reused.
    """
    model_type = hf_config.get("model_type")
    check_lora(lora, model_type)
    targets = DEFAULT_TARGETS[model_type] if lora.targets is None else tuple(lora.targets)
    lora = lora._replace(targets=targets)
    config_json = json.dumps(hf_config, sort_keys=True, default=str)
    dtype = jnp.dtype(compute_dtype).name
    return _architecture(config_json, num_labels, lora, dtype, tuple(sorted(options.items())))


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
    targets = DEFAULT_TARGETS[model_type] if lora.targets is None else lora.targets
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise BadValue("targets", f"must be a tuple of names, got {targets!r}")
    unknown = [t for t in targets if t not in TARGETS[model_type]]
    if unknown:
        raise BadValue(
            "targets", f"unknown {unknown} for a {model_type} model; valid: "
            f"{', '.join(TARGETS[model_type])}"
        )  # fmt: skip


@functools.lru_cache(maxsize=32)
def _architecture(
    config_json: str, num_labels: int, lora: LoraSpec, dtype: str, options: tuple
) -> Architecture:
    hf_config = json.loads(config_json)
    return FAMILIES[hf_config["model_type"]](
        hf_config,
        num_labels=num_labels,
        targets=lora.targets,
        lora_scale=lora_lib.scale(lora.alpha, lora.rank, lora.rslora),
        lora_dropout=lora.dropout,
        compute_dtype=jnp.dtype(dtype),
        **dict(options),
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
    base_dtype=jnp.float32,
    *,
    shapes_only: bool = False,
    **options,
) -> Model:
    """A model with a random base (no files, no network); ``key=None`` means key(0); the
    base drawn in float32, then cast to ``base_dtype``. ``shapes_only``: the base as
    ``jax.ShapeDtypeStruct`` leaves instead (:func:`build_abstract`).
    ``options``: the family's own keyword arguments (see :func:`architecture`)."""
    arch = architecture(hf_config, num_labels, lora, compute_dtype, **options)
    k_base, k_head, k_lora = _keys(key)
    if shapes_only:
        base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, base_dtype), arch.base_shapes)
    else:
        base = jax.tree.map(lambda x: x.astype(base_dtype), arch.init_base(k_base))
    return _assemble(arch, base, arch.init_head(k_head), lora, k_lora, hf_config)


def build_abstract(hf_config: dict, num_labels: int = 2, **kwargs) -> Model:
    """A model whose base is ``jax.ShapeDtypeStruct`` leaves in ``base_dtype`` (the shapes
    a checkpoint would fill; nothing allocated, nothing read), with real fresh adapters and
    head: what a plan compiles ahead of time (:mod:`floranna_jax.plan`). ``kwargs``: those
    of :func:`build_random`."""
    return build_random(hf_config, num_labels, shapes_only=True, **kwargs)


def load_pretrained(
    path_or_hub_id: str | os.PathLike,
    num_labels: int = 2,
    lora: LoraSpec = LoraSpec(),  # noqa: B008 (immutable NamedTuple)
    key: jax.Array | None = None,
    compute_dtype=jnp.float32,
    *,
    load_head: bool = True,
    base_dtype=jnp.float32,
    sharding=None,
    **options,
) -> Model:
    """A model whose base comes from a Hugging Face folder (or hub id, when online).

    Checkpoint and model must agree exactly (see :mod:`loading`); the task head is read
    when the checkpoint has one of the right size and ``load_head``, else fresh (logged).
    The base is read tensor by tensor in ``base_dtype`` straight onto ``sharding``'s
    devices (default: the first device; or per leaf, ``(path, shape) -> Sharding``, such
    as ``fsdp.sharding_of``: each device gets its shards), never whole on the host.
    ``options``: the family's own keyword arguments (see :func:`architecture`).
    """
    folder = loading.resolve_folder(path_or_hub_id)
    hf_config = loading.read_config(folder)
    arch = architecture(hf_config, num_labels, lora, compute_dtype, **options)
    _, k_head, k_lora = _keys(key)
    base, head = loading.load_params(
        arch, folder, head_key=k_head, load_head=load_head, base_dtype=base_dtype,
        sharding=sharding,
    )  # fmt: skip
    logging.info("loaded %s model from %s", hf_config["model_type"], folder)
    return _assemble(arch, base, head, lora, k_lora, hf_config)


def save_pretrained(model: Model, folder: str | os.PathLike, dtype: str = "float32") -> None:
    """Write base + head as a Hugging Face folder, tensors in ``dtype`` (adapters are not
    saved: merge first)."""
    head_leaves = jax.tree.leaves(model.trainable["head"])
    config = dict(model.config)
    num_labels = 0  # a decoder: no head, the config stays as it is
    if head_leaves:
        num_labels = head_leaves[-1].shape[-1]
        config["num_labels"] = num_labels
        config.pop("id2label", None)
        config.pop("label2id", None)
    arch = architecture(model.config, num_labels, LoraSpec(targets=()))
    loading.save_folder(folder, config, arch, model.base, model.trainable["head"], dtype)


def merge_into_base(base: Params, merges: dict[str, jax.Array], s: float) -> Params:
    """Fold dense updates ``merges[layer_name]: [d_out, d_in]`` (B@A units, scaled by ``s``)
    into the matching frozen kernels; returns a new base, the input is untouched.

    A ``layer_name`` is the path of its kernel (``"layer_0/attention/query"``), or names
    layer ``i`` of stacked kernels (``"layers_3/attn/q_proj"`` -> slice 3 of
    ``layers/attn/q_proj/kernel [N, d_in, d_out]``; see :mod:`.architecture`). Raises
    ``ValueError`` naming every ``layer_name`` without a kernel in ``base``. Only the
    kernels that ``merges`` names are new arrays; every other leaf is ``base``'s own.
    """
    flat = traverse_util.flatten_dict(base, sep="/")
    return traverse_util.unflatten_dict(flat | merged_kernels(flat, merges, s), sep="/")


def merged_kernel_paths(flat: dict[str, jax.Array], names) -> dict[str, list[tuple]]:
    """``{kernel path: [(layer_name, slice index or None), ...]}`` for the layer names a
    merge touches, ``flat`` the base flattened with ``"/"``. Raises ``ValueError`` naming
    every name without a kernel."""
    paths: dict[str, list[tuple]] = {}
    unknown = []
    for name in names:
        if f"{name}/kernel" in flat:
            paths.setdefault(f"{name}/kernel", []).append((name, None))
            continue
        parts = split_stacked(name)
        path = parts and f"{parts[0]}/{parts[2]}/kernel"
        if not parts or path not in flat or not 0 <= parts[1] < flat[path].shape[0]:
            unknown.append(name)
        else:
            paths.setdefault(path, []).append((name, parts[1]))
    if unknown:
        raise ValueError(f"merge_into_base: no kernel for layer names {sorted(unknown)}")
    return paths


def merged_kernels(
    flat: dict[str, jax.Array], merges: dict[str, jax.Array], s: float
) -> dict[str, jax.Array]:
    """The kernels of ``flat`` (a base flattened with ``"/"``) that ``merges`` touches,
    each with its merges folded in: ``{path: kernel}``, the same shapes and dtypes.

    Float32 accumulation lives here and only here: each kernel is read in float32, gains
    ``s dW^T`` in float32, and is rounded once into its own dtype, so a bfloat16 base takes
    one rounding per merge instead of two (``dW`` to bf16, then the sum)."""
    out = {}
    for path, named in merged_kernel_paths(flat, merges).items():
        kernel = flat[path]
        if named[0][1] is None:  # an unstacked kernel: one name
            out[path] = lora_lib.merge_into_kernel(kernel, merges[named[0][0]], s)
            continue
        for name, _ in named:
            if merges[name].shape != kernel.shape[:0:-1]:
                raise ValueError(f"merge shape {merges[name].shape} does not match kernel "
                                 f"{kernel.shape[1:]} transposed")  # fmt: skip
        index = jnp.asarray([i for _, i in named])
        update = jnp.stack([(s * merges[name].astype(jnp.float32)).T for name, _ in named])
        summed = kernel[index].astype(jnp.float32) + update
        out[path] = kernel.at[index].set(summed.astype(kernel.dtype))
    return out
