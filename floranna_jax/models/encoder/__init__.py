"""BERT and RoBERTa encoders with LoRA, loaded from Hugging Face checkpoints unchanged.

    arch = encoder.make(hf_config, num_labels=2, targets=("query", "value"), lora_scale=1.0)
    logits = arch.apply(base, {"lora": adapters, "head": head}, batch)   # [b, num_labels]
    hidden, pooled = encoder.encode(hf_config, base, batch)     # [b, L, d], [b, d] f32

Modules, one concept each:

- ``config``: :class:`EncoderConfig`, :func:`parse_config`, :func:`tiny_config`, and the
  LoRA target names ``TARGETS`` (``ATTENTION_TARGETS`` + ``MLP_TARGETS``).
- ``modules``: the Flax modules (:class:`LoraDense`, attention, MLP, layers, embeddings,
  :class:`Encoder`, :class:`Head`) and :func:`encode`, the jitted feature extractor.
- ``checkpoint``: parameter path <-> Hugging Face checkpoint name.
- ``family``: :func:`make`, the :class:`~floranna_jax.models.architecture.Architecture`
  that :mod:`floranna_jax.models` builds every model from; parameter shapes and init.
"""

from floranna_jax.models.encoder.checkpoint import canonical_key, checkpoint_name
from floranna_jax.models.encoder.config import (
    ACTIVATIONS,
    ATTENTION_TARGETS,
    MLP_TARGETS,
    MODEL_TYPES,
    TARGETS,
    EncoderConfig,
    parse_config,
    tiny_config,
)
from floranna_jax.models.encoder.family import init_like, layer_names, make
from floranna_jax.models.encoder.modules import (
    Embeddings,
    Encoder,
    Head,
    Layer,
    LoraDense,
    Mlp,
    SelfAttention,
    encode,
    position_ids,
)

# Private, kept importable because tests check batch defaults through ``encoder._inputs``.
from floranna_jax.models.encoder.modules import _inputs as _inputs

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_TARGETS",
    "MLP_TARGETS",
    "MODEL_TYPES",
    "TARGETS",
    "Embeddings",
    "Encoder",
    "EncoderConfig",
    "Head",
    "Layer",
    "LoraDense",
    "Mlp",
    "SelfAttention",
    "canonical_key",
    "checkpoint_name",
    "encode",
    "init_like",
    "layer_names",
    "make",
    "parse_config",
    "position_ids",
    "tiny_config",
]
