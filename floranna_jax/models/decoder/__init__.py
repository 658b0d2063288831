"""Decoder LMs with LoRA (LLaMA, Mistral, Qwen2/3, Gemma 2/3, Phi-3), loaded from Hugging
Face checkpoints unchanged.

    arch = decoder.make(hf_config, targets=("q_proj", "v_proj"), lora_scale=2.0)
    nll, tokens = arch.apply(base, {"lora": adapters, "head": {}}, batch)   # [b], [b] f32
    logits = decoder.logits(hf_config, base, adapters, ids, mask)            # [b, L, V] f32
    new = decoder.generate(model, base, adapters, prompt_ids, prompt_mask,
                           max_new_tokens=32, eos_ids=(2,))                 # [b, 32] int32

Modules, one concept each:

- ``families``: one :class:`~.families.Family` record per ``model_type`` (config
  parsing and defaults, LoRA targets and default targets, checkpoint and PEFT module
  names, tiny test config); :func:`parse_config`, :func:`tiny_config`.
- ``config``: :class:`DecoderConfig`, the fields the layer functions branch on, and the
  parsing every family shares.
- ``rotary``: rotary tables (default, ``linear``, ``llama3`` scaling; Gemma 3's two bases).
- ``modules``: the layer as pure functions (RMSNorm, rotary, grouped-query attention,
  gated MLP) and :func:`~.modules.run_layers`, all layers under one ``lax.scan``.
- ``checkpoint``: raw checkpoint keys -> canonical names.
- ``family``: :func:`make`, the chunked causal-LM loss, packed and padded batches, and
  :func:`logits`.
- ``generate``: :func:`generate`, batched decoding with a key/value cache.
"""

from floranna_jax.models.decoder.checkpoint import canonical_key
from floranna_jax.models.decoder.config import DecoderConfig
from floranna_jax.models.decoder.families import (
    FAMILIES,
    MODEL_TYPES,
    Family,
    parse_config,
    tiny_config,
)
from floranna_jax.models.decoder.families import get as get_family
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
    "FAMILIES",
    "LOSS_CHUNK_ELEMENTS",
    "MODEL_TYPES",
    "DecoderConfig",
    "Family",
    "canonical_key",
    "chunk_length",
    "get_family",
    "generate",
    "layer_names",
    "logits",
    "make",
    "parse_config",
    "tiny_config",
    "token_nll",
]
