"""What an encoder config may say: the validated fields of a BERT/RoBERTa ``config.json``.

:func:`parse_config` turns a Hugging Face config dict into an :class:`EncoderConfig`
(hashable, so compiled functions can be cached per config) and rejects what the modules
do not implement: relative positions, decoder or cross-attention configs, unknown
activations. The LoRA targets are named here once; ``layer_name`` paths use them as
their last part (``"layer_0/attention/query"``, ``"layer_0/mlp/mlp_up"``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax

from floranna_jax.models import architecture

MODEL_TYPES = ("bert", "roberta")
ATTENTION_TARGETS = ("query", "key", "value", "attn_out")
MLP_TARGETS = ("mlp_up", "mlp_down")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS

# hidden_act -> function; exact erf GELU for "gelu", as in transformers.
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


class EncoderConfig(NamedTuple):
    """The fields of a Hugging Face BERT/RoBERTa ``config.json`` the encoder uses."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    hidden_dropout: float
    attention_dropout: float
    classifier_dropout: float
    pad_token_id: int
    initializer_range: float


def parse_config(hf_config: dict) -> EncoderConfig:
    """Validate a Hugging Face config dict; defaults are those of transformers."""
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not an encoder type {MODEL_TYPES}")
    architecture.check_required(hf_config, model_type)
    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"position_embedding_type={hf_config['position_embedding_type']!r}: only 'absolute'"
        )
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
        raise ValueError("decoder / cross-attention BERT configs are not supported")
    act = hf_config.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} not in {sorted(ACTIVATIONS)}")
    d, h = hf_config["hidden_size"], hf_config["num_attention_heads"]
    if d % h:
        raise ValueError(f"hidden_size {d} is not a multiple of num_attention_heads {h}")
    hidden_dropout = float(hf_config.get("hidden_dropout_prob", 0.1))
    classifier_dropout = hf_config.get("classifier_dropout")
    return EncoderConfig(
        model_type=model_type,
        vocab_size=int(hf_config["vocab_size"]),
        hidden_size=int(d),
        num_layers=int(hf_config["num_hidden_layers"]),
        num_heads=int(h),
        intermediate_size=int(hf_config["intermediate_size"]),
        max_positions=int(hf_config.get("max_position_embeddings", 512)),
        type_vocab_size=int(hf_config.get("type_vocab_size", 2)),
        layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
        hidden_act=act,
        hidden_dropout=hidden_dropout,
        attention_dropout=float(hf_config.get("attention_probs_dropout_prob", 0.1)),
        classifier_dropout=hidden_dropout if classifier_dropout is None else classifier_dropout,
        pad_token_id=int(hf_config.get("pad_token_id", 1 if model_type == "roberta" else 0)),
        initializer_range=float(hf_config.get("initializer_range", 0.02)),
    )


def tiny_config(model_type: str = "bert") -> dict:
    """A tiny Hugging Face style config for smoke runs and tests (no files needed).

    Valid for ``transformers.BertConfig(**c)`` / ``RobertaConfig(**c)`` too. RoBERTa
    gets ``max_position_embeddings = 128 + pad_token_id + 1`` so both take 128 tokens.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} not in {MODEL_TYPES}")
    roberta = model_type == "roberta"
    return {
        "model_type": model_type,
        "vocab_size": 1000,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": 130 if roberta else 128,
        "type_vocab_size": 1 if roberta else 2,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "layer_norm_eps": 1e-5 if roberta else 1e-12,
        "initializer_range": 0.02,
        "pad_token_id": 1 if roberta else 0,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }
