"""What a decoder config may say: the validated fields of a LLaMA/Mistral ``config.json``.

:func:`parse_config` turns a Hugging Face config dict into a :class:`DecoderConfig`
(hashable, so compiled functions are cached per config) and rejects what the modules do
not implement: rotary scaling (``rope_type`` other than ``"default"``), partial rotary,
biases on the projections, activations other than SiLU. The rotary base is read from
transformers 5's ``rope_parameters`` or the older top-level ``rope_theta``.

LoRA targets are named here once; a ``layer_name`` is ``"layers_{i}/attn/q_proj"`` or
``"layers_{i}/mlp/gate_proj"``: layer ``i`` of the weights stacked under ``"layers"``.
"""

from __future__ import annotations

from typing import NamedTuple

MODEL_TYPES = ("llama", "mistral")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
DEFAULT_TARGETS = ("q_proj", "v_proj")
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
_DEFAULT_THETA = 10_000.0  # transformers' default_theta


class DecoderConfig(NamedTuple):
    """The fields of a Hugging Face LLaMA/Mistral ``config.json`` the decoder uses."""

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
    rope_theta: float
    tie_embeddings: bool
    attention_dropout: float
    sliding_window: int | None  # Mistral: a key more than this many positions back is masked
    initializer_range: float
    pad_token_id: int | None
    eos_token_ids: tuple[int, ...]


def rope_theta(hf_config: dict) -> float:
    """The rotary base of a config; ``ValueError`` naming an unsupported ``rope_type``.

    transformers 5 writes ``rope_parameters = {"rope_theta", "rope_type"}``; older
    configs write ``rope_theta`` and ``rope_scaling`` (null, or ``{"type"|"rope_type"}``).
    """
    params = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope_parameters must be a dict, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"rope_type {rope_type!r} is not supported (only 'default' rotary embeddings): "
            "its frequency scaling is not implemented"
        )
    partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    return float(params.get("rope_theta", hf_config.get("rope_theta", _DEFAULT_THETA)))


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list | tuple) else (int(value),)


def _check_supported(hf_config: dict, model_type: str) -> None:
    missing = [k for k in _REQUIRED if k not in hf_config]
    if missing:
        raise ValueError(f"{model_type} config lacks {missing}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            raise ValueError(f"{flag}=true is not supported (projections without bias only)")
    act = hf_config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")
    if int(hf_config.get("pretraining_tp", 1) or 1) != 1:
        raise ValueError("pretraining_tp != 1 is not supported")


def parse_config(hf_config: dict) -> DecoderConfig:
    """Validate a Hugging Face config dict; defaults are those of transformers' LlamaConfig."""
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not a decoder type {MODEL_TYPES}")
    _check_supported(hf_config, model_type)
    d, h = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
    kv = int(hf_config.get("num_key_value_heads") or h)
    head_dim = int(hf_config.get("head_dim") or d // h)
    if h % kv:
        raise ValueError(f"num_attention_heads {h} is not a multiple of num_key_value_heads {kv}")
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even for rotary embeddings")
    window = hf_config.get("sliding_window") if model_type == "mistral" else None
    pad = hf_config.get("pad_token_id")
    return DecoderConfig(
        model_type=model_type,
        vocab_size=int(hf_config["vocab_size"]),
        hidden_size=d,
        num_layers=int(hf_config["num_hidden_layers"]),
        num_heads=h,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=int(hf_config["intermediate_size"]),
        max_positions=int(hf_config.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta(hf_config),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        attention_dropout=float(hf_config.get("attention_dropout") or 0.0),
        sliding_window=None if window is None else int(window),
        initializer_range=float(hf_config.get("initializer_range", 0.02)),
        pad_token_id=None if pad is None else int(pad),
        eos_token_ids=_eos_ids(hf_config.get("eos_token_id", 2)),
    )


def tiny_config(model_type: str = "llama") -> dict:
    """A tiny Hugging Face style config for smoke runs and tests (no files needed).

    Grouped-query attention (4 query heads, 2 key/value heads), untied ``lm_head``;
    valid for ``transformers.LlamaConfig(**c)`` / ``MistralConfig(**c)`` too.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} not in {MODEL_TYPES}")
    config = {
        "model_type": model_type,
        "vocab_size": 512,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 512,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if model_type == "mistral":
        config["sliding_window"] = None
    return config
