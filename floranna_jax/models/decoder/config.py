"""What a decoder config may say: the validated fields of a Hugging Face ``config.json``.

:class:`DecoderConfig` is hashable (compiled functions are cached per config) and holds
everything the layer functions of :mod:`.modules` branch on: which projections and norms
a layer has, biases, the activation, norm offset, embedding and query scales,
soft-capping, per-layer sliding windows and rotary tables. Each family's record
(:mod:`.families`) turns its ``config.json`` into one through :func:`parse_common`, its
own fields and its projections and norms; what no family implements (MLP biases,
``pretraining_tp``, unknown activations) raises ``ValueError`` naming the field.

A LoRA ``layer_name`` is ``"layers_{i}/attn/q_proj"`` or ``"layers_{i}/mlp/gate_proj"``:
layer ``i`` of the weights stacked under ``"layers"``.
"""

from __future__ import annotations

from typing import NamedTuple

from floranna_jax.models import architecture
from floranna_jax.models.decoder import rotary

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
FULL, SLIDING = "full_attention", "sliding_attention"


class DecoderConfig(NamedTuple):
    """The fields of a decoder ``config.json`` the layer functions use.

    ``projections``: the layer's linear maps, by Hugging Face name (``q_proj`` ...; Phi-3:
    ``qkv_proj``, ``gate_up_proj``); ``norms``: its RMSNorms (``input_norm``,
    ``post_attn_norm`` before the MLP; Gemma adds ``attn_out_norm`` and ``mlp_out_norm``
    on the two branch outputs; Qwen3 and Gemma 3 ``attn/q_norm``, ``attn/k_norm`` per
    head). ``layer_windows[i]``: layer ``i`` masks keys this many positions back or more
    (None: full attention); ``local_rope``: the rotary table of the windowed layers when
    it differs from ``rope`` (Gemma 3).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    rms_norm_eps: float
    tie_embeddings: bool
    attention_dropout: float
    initializer_range: float
    pad_token_id: int | None
    eos_token_ids: tuple[int, ...]
    rope: rotary.Rope
    projections: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    local_rope: rotary.Rope | None = None
    layer_windows: tuple[int | None, ...] = ()
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qkv_bias: bool = False
    o_bias: bool = False
    norm_offset: float = 0.0  # Gemma: the norm multiplies by (1 + weight)
    embed_scale: float = 1.0  # Gemma: sqrt(hidden_size)
    query_scale: float = 0.0  # the attention logits' factor (head_dim ** -0.5 by default)
    attn_softcap: float | None = None  # Gemma 2: cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: cap * tanh(logits / cap)


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list | tuple) else (int(value),)


def activation(hf_config: dict, key: str) -> str:
    """The MLP activation named by ``hf_config[key]``; ``ValueError`` for one not implemented."""
    act = hf_config.get(key, "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"{key} {act!r} is not supported (only {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[act]


def layer_windows(hf_config: dict, layer_types: list[str], window) -> tuple[int | None, ...]:
    """Per-layer windows: ``window`` on ``sliding_attention`` layers, None elsewhere."""
    n = int(hf_config["num_hidden_layers"])
    if len(layer_types) != n or set(layer_types) - {FULL, SLIDING}:
        raise ValueError(
            f"layer_types must list {n} of {FULL!r} / {SLIDING!r}, got {layer_types!r}"
        )
    if window is not None and int(window) < 1:
        raise ValueError(f"sliding_window must be a positive integer, got {window!r}")
    return tuple(int(window) if t == SLIDING and window is not None else None
                 for t in layer_types)  # fmt: skip


def _check_supported(hf_config: dict, model_type: str) -> None:
    architecture.check_required(hf_config, model_type)
    if hf_config.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported (MLP projections without bias only)")
    if int(hf_config.get("pretraining_tp", 1) or 1) != 1:
        raise ValueError("pretraining_tp != 1 is not supported")
    if hf_config.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=true is not supported (causal only)")


def parse_common(hf_config: dict, *, rope: rotary.Rope, act_key: str = "hidden_act"
                 ) -> DecoderConfig:  # fmt: skip
    """The fields every family reads the same way (defaults: transformers' LlamaConfig; a
    family passes its own defaults merged into ``hf_config``). Full attention everywhere,
    ``attention_bias`` on q/k/v/o; the family's record sets the rest with ``_replace``
    (``projections`` and ``norms`` too: empty here)."""
    model_type = hf_config.get("model_type")
    _check_supported(hf_config, model_type)
    d, h = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
    kv = int(hf_config.get("num_key_value_heads") or h)
    head_dim = int(hf_config.get("head_dim") or d // h)
    if h % kv:
        raise ValueError(f"num_attention_heads {h} is not a multiple of num_key_value_heads {kv}")
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even for rotary embeddings")
    pad = hf_config.get("pad_token_id")
    n = int(hf_config["num_hidden_layers"])
    return DecoderConfig(
        model_type=model_type,
        vocab_size=int(hf_config["vocab_size"]),
        hidden_size=d,
        num_layers=n,
        num_heads=h,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=int(hf_config["intermediate_size"]),
        max_positions=int(hf_config.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        attention_dropout=float(hf_config.get("attention_dropout") or 0.0),
        initializer_range=float(hf_config.get("initializer_range", 0.02)),
        pad_token_id=None if pad is None else int(pad),
        eos_token_ids=_eos_ids(hf_config.get("eos_token_id", 2)),
        rope=rope,
        layer_windows=(None,) * n,
        activation=activation(hf_config, act_key),
        qkv_bias=bool(hf_config.get("attention_bias", False)),
        o_bias=bool(hf_config.get("attention_bias", False)),
        query_scale=head_dim**-0.5,
    )


def tiny_config(model_type: str = "llama") -> dict:
    """The shared part of the tiny configs (:func:`.families.tiny_config` adds a family's):
    grouped-query attention (4 query heads, 2 key/value heads), untied ``lm_head``."""
    return {
        "model_type": model_type,
        "vocab_size": 512,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
