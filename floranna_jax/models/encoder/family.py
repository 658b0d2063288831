"""The BERT/RoBERTa family as one :class:`~floranna_jax.models.architecture.Architecture`.

``make(hf_config, num_labels=..., targets=..., lora_scale=...)`` ties together the config
(:mod:`.config`), the Flax modules (:mod:`.modules`) and the checkpoint names
(:mod:`.checkpoint`): parameter shapes (``base`` and ``head`` trees of
``jax.ShapeDtypeStruct``), Hugging Face's random init, the adapter shapes
``layer_name -> (d_in, d_out)``, and ``apply(base, trainable, batch) -> [b, num_labels]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from floranna_jax.models.architecture import Architecture, Params, init_like
from floranna_jax.models.encoder.checkpoint import canonical_key, checkpoint_name
from floranna_jax.models.encoder.config import (
    ATTENTION_TARGETS,
    TARGETS,
    EncoderConfig,
    parse_config,
)
from floranna_jax.models.encoder.modules import Encoder, Head, _inputs


def layer_names(cfg: EncoderConfig, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """``layer_name -> (d_in, d_out)`` for ``targets`` in every layer, sorted by name."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; valid: {list(TARGETS)}")
    d, inter = cfg.hidden_size, cfg.intermediate_size
    dims = {t: (d, d) for t in ATTENTION_TARGETS} | {"mlp_up": (d, inter), "mlp_down": (inter, d)}
    shapes = {}
    for i in range(cfg.num_layers):
        for t in targets:
            block = "attention" if t in ATTENTION_TARGETS else "mlp"
            shapes[f"layer_{i}/{block}/{t}"] = dims[t]
    return dict(sorted(shapes.items()))


@functools.lru_cache(maxsize=16)
def _param_shapes(cfg: EncoderConfig, num_labels: int) -> tuple[Params, Params]:
    """``(base, head)`` trees of ``jax.ShapeDtypeStruct``; traced once per config."""
    dummy = jnp.zeros((1, 4), jnp.int32)
    key = jax.random.key(0)
    base = jax.eval_shape(lambda: Encoder(cfg).init(key, dummy, dummy + 1, dummy, {}))
    head = jax.eval_shape(lambda: Head(cfg, num_labels).init(key, jnp.zeros((1, cfg.hidden_size))))
    return base["params"], head["params"]


def make(
    hf_config: dict,
    *,
    num_labels: int,
    targets: tuple[str, ...],
    lora_scale: float,
    lora_dropout: float = 0.0,
    compute_dtype=jnp.float32,
) -> Architecture:
    """The :class:`Architecture` of a BERT/RoBERTa config with a ``num_labels`` head."""
    cfg = parse_config(hf_config)
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    encoder = Encoder(cfg, lora_scale, lora_dropout, compute_dtype)
    head = Head(cfg, num_labels, compute_dtype)
    shapes = layer_names(cfg, tuple(targets))
    valid_names = frozenset(layer_names(cfg, TARGETS))
    base_shapes, head_shapes = _param_shapes(cfg, num_labels)

    def apply(base, trainable, batch, *, deterministic=True, dropout_key=None):
        adapters = trainable["lora"]
        unknown = sorted(set(adapters) - valid_names)
        if unknown:
            raise ValueError(f"adapters for unknown layers {unknown}")
        rngs_enc = rngs_head = None
        if not deterministic:
            if dropout_key is None:
                raise ValueError("deterministic=False needs a dropout_key")
            k_enc, k_head = jax.random.split(dropout_key)
            rngs_enc, rngs_head = {"dropout": k_enc}, {"dropout": k_head}
        ids, mask, types, packed = _inputs(batch)
        _, pooled = encoder.apply(
            {"params": base}, ids, mask, types, adapters, deterministic, packed, rngs=rngs_enc
        )
        logits = head.apply({"params": trainable["head"]}, pooled, deterministic, rngs=rngs_head)
        return logits.astype(jnp.float32)

    return Architecture(
        base_shapes=base_shapes,
        head_shapes=head_shapes,
        init_base=functools.partial(init_like, base_shapes, std=cfg.initializer_range),
        init_head=functools.partial(init_like, head_shapes, std=cfg.initializer_range),
        apply=apply,
        lora_shapes=shapes,
        checkpoint_name=checkpoint_name,
        canonical_key=functools.partial(canonical_key, cfg.model_type),
        checkpoint_prefix=f"{cfg.model_type}.",
    )
