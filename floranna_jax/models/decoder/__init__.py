"""LLaMA and Mistral decoders with LoRA, loaded from Hugging Face checkpoints unchanged.

    arch = decoder.make(hf_config, targets=("q_proj", "v_proj"), lora_scale=2.0)
    nll, tokens = arch.apply(base, {"lora": adapters, "head": {}}, batch)   # [b], [b] f32
    logits = decoder.logits(hf_config, base, adapters, ids, mask)            # [b, L, V] f32
    new = decoder.generate(model, base, adapters, prompt_ids, prompt_mask,
                           max_new_tokens=32, eos_ids=(2,))                 # [b, 32] int32

Modules, one concept each:

- ``config``: :class:`DecoderConfig`, :func:`parse_config`, :func:`tiny_config`, the LoRA
  target names ``TARGETS`` (default ``DEFAULT_TARGETS`` = q_proj, v_proj).
- ``modules``: the layer as pure functions (RMSNorm, rotary, grouped-query attention,
  SwiGLU) and :func:`~.modules.run_layers`, all layers under one ``lax.scan``.
- ``checkpoint``: parameter path <-> Hugging Face checkpoint name.
- ``family``: :func:`make`, the chunked causal-LM loss, packed and padded batches, and
  :func:`logits`.
- ``generate``: :func:`generate`, batched decoding with a key/value cache.
"""

from floranna_jax.models.decoder.checkpoint import canonical_key, checkpoint_name
from floranna_jax.models.decoder.config import (
    ATTENTION_TARGETS,
    DEFAULT_TARGETS,
    MLP_TARGETS,
    MODEL_TYPES,
    TARGETS,
    DecoderConfig,
    parse_config,
    rope_theta,
    tiny_config,
)
from floranna_jax.models.decoder.family import (
    LOSS_CHUNK_ELEMENTS,
    chunk_length,
    layer_names,
    logits,
    make,
    token_nll,
)
from floranna_jax.models.decoder.generate import generate

__all__ = [
    "ATTENTION_TARGETS",
    "DEFAULT_TARGETS",
    "LOSS_CHUNK_ELEMENTS",
    "MLP_TARGETS",
    "MODEL_TYPES",
    "TARGETS",
    "DecoderConfig",
    "canonical_key",
    "checkpoint_name",
    "chunk_length",
    "generate",
    "layer_names",
    "logits",
    "make",
    "parse_config",
    "rope_theta",
    "tiny_config",
    "token_nll",
]
