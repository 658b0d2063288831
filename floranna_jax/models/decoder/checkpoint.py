"""Decoder parameter paths <-> Hugging Face ``LlamaForCausalLM`` checkpoint names.

Paths name layer ``i`` of the stacked ``"layers"`` subtree as ``"layers_{i}"`` (see
:mod:`floranna_jax.models.architecture`): ``("layers_0", "attn", "q_proj", "kernel")`` ->
``"model.layers.0.self_attn.q_proj.weight"``. Names are complete (``model.`` prefix and
``lm_head.`` included), so the architecture's ``checkpoint_prefix`` is empty. Raw keys of a
bare ``LlamaModel`` checkpoint (no ``model.``) are normalized; rotary ``inv_freq`` buffers,
and ``lm_head.weight`` of a tied model, are known and unused.
"""

from __future__ import annotations

from floranna_jax.models.architecture import table_name

_MODULE_NAMES = {
    "embed_tokens": "model.embed_tokens",
    "norm": "model.norm",
    "lm_head": "lm_head",
    "layers_{i}/attn/q_proj": "model.layers.{i}.self_attn.q_proj",
    "layers_{i}/attn/k_proj": "model.layers.{i}.self_attn.k_proj",
    "layers_{i}/attn/v_proj": "model.layers.{i}.self_attn.v_proj",
    "layers_{i}/attn/o_proj": "model.layers.{i}.self_attn.o_proj",
    "layers_{i}/mlp/gate_proj": "model.layers.{i}.mlp.gate_proj",
    "layers_{i}/mlp/up_proj": "model.layers.{i}.mlp.up_proj",
    "layers_{i}/mlp/down_proj": "model.layers.{i}.mlp.down_proj",
    "layers_{i}/input_norm": "model.layers.{i}.input_layernorm",
    "layers_{i}/post_attn_norm": "model.layers.{i}.post_attention_layernorm",
}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def checkpoint_name(path: tuple[str, ...]) -> str:
    """Our per-layer parameter path -> the Hugging Face name (``model.layers.0....``)."""
    return table_name(path, _MODULE_NAMES, _LEAF_NAMES, "layers")


def canonical_key(tied: bool, key: str) -> str | None:
    """Add the ``model.`` prefix a bare ``LlamaModel`` lacks; None: a known unused key."""
    if key.endswith(".rotary_emb.inv_freq"):  # buffers some older checkpoints saved
        return None
    if key.startswith("lm_head."):
        return None if tied else key  # a tied head is the embedding
    return key if key.startswith("model.") else f"model.{key}"
