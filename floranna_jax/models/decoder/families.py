"""Every decoder family as one record: config parsing, layer layout, checkpoint names, LoRA targets.

    family = families.get("qwen2")
    cfg = family.parse(hf_config)                 # = parse_config(hf_config)
    family.targets           # ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", ...)
    family.module_name("layers_3/attn/q_proj")   # "model.layers.3.self_attn.q_proj"

A :class:`Family` holds what differs between families, and nothing else:

- ``defaults``: transformers' config defaults where they differ from LlamaConfig's (a
  config that omits a field means what transformers means by it);
- ``read``: the family's own config fields (biases, GeGLU, scales, soft-caps, sliding
  windows per layer, local rotary table); :meth:`Family.parse` completes them into a
  :class:`~.config.DecoderConfig`, whose fields select the layer functions of
  :mod:`.modules`;
- ``targets``: the layer's projections, which are also the LoRA targets, named as the
  checkpoint and PEFT name them (Phi-3's fused ones included); ``default_targets``: what
  ``LoraSpec(targets=None)`` adapts;
- ``norms``: the layer's RMSNorms, our name -> Hugging Face name (q/k and sandwich norms);
- ``modules``: parameter module path -> Hugging Face module name (the checkpoint names),
  built from ``targets`` and ``norms``;
- ``tiny``: what the family's tiny test config adds to the shared one.

Families: ``llama`` (also Llama 3.1/3.2 ``rope_type: llama3``), ``mistral`` (sliding
window), ``qwen2`` (q/k/v bias), ``qwen3`` (per-head q/k RMSNorm), ``gemma2`` and
``gemma3_text`` (norm weight + 1, embeddings times sqrt(d), tanh-GeGLU,
``query_pre_attn_scalar``, post-attention and post-MLP norms, alternating sliding-window
layers; Gemma 2 soft-caps attention and final logits, Gemma 3 has q/k norms and a local
rotary base for its sliding layers), ``phi3`` (fused ``qkv_proj`` and ``gate_up_proj``).

PEFT names, for exporting adapters: a LoRA ``layer_name`` (``"layers_3/attn/q_proj"``) is
the module ``family.module_name(layer_name)`` (``"model.layers.3.self_attn.q_proj"``);
PEFT stores its factors as ``base_model.model.<module>.lora_A.weight`` = ``A [r, d_in]``
and ``...lora_B.weight`` = ``B [d_out, r]`` (the same orientation as
:mod:`floranna_jax.lora`), scaled by ``lora_alpha / r`` as here, with ``target_modules``
the ``targets`` used (the last part of the module name). Phi-3's fused ``qkv_proj`` and
``gate_up_proj`` are adapted whole, as PEFT does: ``B`` has ``q + 2 kv`` (``2 i``) rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from floranna_jax.models.architecture import table_name
from floranna_jax.models.decoder import rotary
from floranna_jax.models.decoder.config import (
    ATTENTION_PROJECTIONS,
    FULL,
    SLIDING,
    DecoderConfig,
    layer_windows,
    parse_common,
)
from floranna_jax.models.decoder.config import tiny_config as _shared_tiny

SEPARATE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_PLAIN_NORMS = {"input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm"}
_QK_NORMS = {"attn/q_norm": "self_attn.q_norm", "attn/k_norm": "self_attn.k_norm"}
_SANDWICH_NORMS = {  # Gemma: HF's post_attention_layernorm is on the attention output
    "input_norm": "input_layernorm",
    "attn_out_norm": "post_attention_layernorm",
    "post_attn_norm": "pre_feedforward_layernorm",
    "mlp_out_norm": "post_feedforward_layernorm",
}
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _modules(projections: tuple[str, ...], norms: dict[str, str]) -> dict[str, str]:
    table = {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
    for t in projections:
        ours, theirs = ("attn", "self_attn") if t in ATTENTION_PROJECTIONS else ("mlp", "mlp")
        table[f"layers_{{i}}/{ours}/{t}"] = f"model.layers.{{i}}.{theirs}.{t}"
    for ours, theirs in norms.items():
        table[f"layers_{{i}}/{ours}"] = f"model.layers.{{i}}.{theirs}"
    return table


class Family(NamedTuple):
    """One decoder family (see the module docstring for the fields)."""

    name: str
    defaults: dict
    read: Callable[[dict], DecoderConfig]
    targets: tuple[str, ...]
    default_targets: tuple[str, ...]
    norms: dict[str, str]
    modules: dict[str, str]
    tiny: dict

    def parse(self, hf_config: dict) -> DecoderConfig:
        """The validated config; absent fields mean transformers' defaults."""
        cfg = self.read({**self.defaults, **hf_config})
        return cfg._replace(projections=self.targets, norms=tuple(self.norms))

    def checkpoint_name(self, path: tuple[str, ...]) -> str:
        """Parameter path (``("layers_0", "attn", "q_proj", "kernel")``) -> checkpoint
        name (``"model.layers.0.self_attn.q_proj.weight"``); ``KeyError`` if unknown."""
        return table_name(path, self.modules, _LEAVES, "layers")

    def module_name(self, layer_name: str) -> str:
        """LoRA ``layer_name`` -> the Hugging Face (and PEFT) module it adapts."""
        return self.checkpoint_name((*layer_name.split("/"), "kernel")).removesuffix(".weight")


def _all_windowed(hf: dict) -> tuple[int | None, ...]:
    """Mistral, Phi-3: ``sliding_window`` (None: none) on every layer."""
    n = int(hf["num_hidden_layers"])
    return layer_windows(hf, [SLIDING] * n, hf.get("sliding_window"))


def _qwen_windows(hf: dict) -> tuple[int | None, ...]:
    """Qwen2/3: with ``use_sliding_window``, layers from ``max_window_layers`` on."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    first = int(hf.get("max_window_layers", 28))
    types = hf.get("layer_types") or [
        SLIDING if window is not None and i >= first else FULL
        for i in range(int(hf["num_hidden_layers"]))
    ]
    return layer_windows(hf, list(types), window)


def _gemma_windows(hf: dict, pattern: int) -> tuple[int | None, ...]:
    """Gemma: ``layer_types``, else every ``pattern``-th layer full, the others windowed."""
    types = hf.get("layer_types") or [
        SLIDING if (i + 1) % pattern else FULL for i in range(int(hf["num_hidden_layers"]))
    ]
    return layer_windows(hf, list(types), hf.get("sliding_window"))


def _parse_llama(hf: dict) -> DecoderConfig:
    return parse_common(hf, rope=rotary.from_config(hf))


def _parse_mistral(hf: dict) -> DecoderConfig:
    return _parse_llama(hf)._replace(layer_windows=_all_windowed(hf))


def _parse_qwen2(hf: dict) -> DecoderConfig:  # q/k/v always carry a bias, o_proj never
    return _parse_llama(hf)._replace(layer_windows=_qwen_windows(hf), qkv_bias=True, o_bias=False)


def _parse_qwen3(hf: dict) -> DecoderConfig:
    return _parse_llama(hf)._replace(layer_windows=_qwen_windows(hf))


def _gemma(hf: dict, rope: rotary.Rope) -> DecoderConfig:
    cfg = parse_common(hf, rope=rope, act_key="hidden_activation")
    return cfg._replace(
        norm_offset=1.0,
        embed_scale=math.sqrt(cfg.hidden_size),
        query_scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
        final_softcap=hf.get("final_logit_softcapping"),
    )


def _parse_gemma2(hf: dict) -> DecoderConfig:
    cfg = _gemma(hf, rotary.from_config(hf))
    return cfg._replace(layer_windows=_gemma_windows(hf, 2),
                        attn_softcap=hf.get("attn_logit_softcapping"))  # fmt: skip


def _parse_gemma3(hf: dict) -> DecoderConfig:
    # transformers' Gemma 3 reads attn_logit_softcapping but never applies it: neither here
    full, local = rotary.per_layer_type(hf, 1_000_000.0, 10_000.0)
    cfg = _gemma(hf, full)
    pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
    return cfg._replace(layer_windows=_gemma_windows(hf, pattern), local_rope=local)


def _parse_phi3(hf: dict) -> DecoderConfig:
    return _parse_llama(hf)._replace(layer_windows=_all_windowed(hf), qkv_bias=False,
                                     o_bias=False)  # fmt: skip


_GEMMA_DEFAULTS = {
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
}
_GEMMA_TINY = {"hidden_activation": "gelu_pytorch_tanh", "head_dim": 16,
               "query_pre_attn_scalar": 16, "sliding_window": 5,
               "layer_types": [SLIDING, FULL]}  # fmt: skip
_QWEN_DEFAULTS = {"max_position_embeddings": 32768, "eos_token_id": None}


def _family(name, read, targets, norms, defaults=None, tiny=None, default_targets=None):
    return Family(
        name=name,
        defaults=dict(defaults or {}),
        read=read,
        targets=targets,
        default_targets=default_targets or ("q_proj", "v_proj"),
        norms=norms,
        modules=_modules(targets, norms),
        tiny={"hidden_act": "silu"} if tiny is None else tiny,
    )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        _family("llama", _parse_llama, SEPARATE, _PLAIN_NORMS),
        _family("mistral", _parse_mistral, SEPARATE, _PLAIN_NORMS,
                defaults={"sliding_window": 4096},
                tiny={"hidden_act": "silu", "sliding_window": None}),
        _family("qwen2", _parse_qwen2, SEPARATE, _PLAIN_NORMS, defaults=_QWEN_DEFAULTS),
        _family("qwen3", _parse_qwen3, SEPARATE, _PLAIN_NORMS | _QK_NORMS,
                defaults=dict(_QWEN_DEFAULTS, head_dim=128),
                tiny={"hidden_act": "silu", "head_dim": 16}),
        _family("gemma2", _parse_gemma2, SEPARATE, _SANDWICH_NORMS,
                defaults=dict(_GEMMA_DEFAULTS, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0, max_position_embeddings=8192),
                tiny=_GEMMA_TINY),
        _family("gemma3_text", _parse_gemma3, SEPARATE, _SANDWICH_NORMS | _QK_NORMS,
                defaults=dict(_GEMMA_DEFAULTS, max_position_embeddings=131072),
                tiny=dict(_GEMMA_TINY, rope_local_base_freq=100.0)),
        _family("phi3", _parse_phi3, FUSED, _PLAIN_NORMS, default_targets=("qkv_proj",),
                defaults={"rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                          "eos_token_id": 32000, "pad_token_id": 32000}),
    )
}  # fmt: skip
MODEL_TYPES = tuple(FAMILIES)


def get(model_type: str) -> Family:
    """The family record of ``model_type``; ``ValueError`` listing the known ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not a decoder type {MODEL_TYPES}")
    return FAMILIES[model_type]


def parse_config(hf_config: dict) -> DecoderConfig:
    """Validate a Hugging Face config dict, absent fields meaning transformers' defaults."""
    return get(hf_config.get("model_type")).parse(hf_config)


def tiny_config(model_type: str = "llama") -> dict:
    """A tiny config for smoke runs and tests (no files needed), valid for transformers'
    config class of the family too: 2 layers, hidden 64, 4 query and 2 key/value heads
    of 16, vocabulary 512; Gemma: window 5 on layer 0, layer 1 full."""
    return {**_shared_tiny(get(model_type).name), **get(model_type).tiny}
