"""The Flax (linen) modules of the BERT/RoBERTa encoder, with LoRA on chosen projections.

Numerically this follows Hugging Face ``BertModel`` / ``RobertaModel`` (post-LayerNorm
blocks, absolute positions) so checkpoints load unchanged; tests check parity with the
PyTorch implementation. The two families differ only in:

- positions: BERT uses ``0..L-1``; RoBERTa numbers non-pad tokens from
  ``pad_token_id + 1`` and gives pad tokens ``pad_token_id``.
- head: BERT classifies the pooler output (dense + tanh on ``[CLS]``, part of the frozen
  base) with one dense layer; RoBERTa has no pooler and its head is dense + tanh +
  ``out_proj`` on the ``<s>`` token, all trainable.

Frozen weights and the head are separate linen modules with separate parameter trees.
Adapters are not parameters: they arrive as a call argument ``adapters: layer_name ->
{"A": [r, d_in], "B": [d_out, r]}`` (see :mod:`floranna_jax.lora`), looked up by each
projection under its stable ``layer_name``, e.g. ``"layer_3/mlp/mlp_up"``.

Mixed precision: adapters and head are float32, the frozen base float32 or bfloat16
(``base_dtype``); matmuls run in ``compute_dtype``; LayerNorm, residual sums and softmax
run in float32; logits come back float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from floranna_jax import lora
from floranna_jax.models.architecture import Params
from floranna_jax.models.encoder.config import ACTIVATIONS, EncoderConfig, parse_config


def _layer_norm(cfg: EncoderConfig, name: str) -> nn.LayerNorm:
    # fp32 and the two-pass variance: matches torch.nn.LayerNorm, also under bf16 compute.
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        name=name,
    )


class LoraDense(nn.Module):
    """A dense layer ``x @ W0^T + b`` plus ``s * (drop(x) @ A^T) @ B^T`` if adapted.

    Same math and orientation as :func:`lora.apply`; the adapter comes from
    ``adapters[adapter_name]`` (absent: the bare layer). LoRA dropout (PEFT's
    ``lora_dropout``) drops only the adapter's input.
    """

    features: int
    adapter_name: str
    init_std: float
    lora_scale: float
    lora_dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, x, adapters, deterministic):
        init = nn.initializers.normal(self.init_std)
        kernel = self.param("kernel", init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x = x.astype(self.dtype)
        adapter = adapters.get(self.adapter_name)
        if adapter is None or deterministic or self.lora_dropout == 0.0:
            y = lora.apply(x, kernel, adapter, self.lora_scale)
        else:
            x_drop = nn.Dropout(self.lora_dropout)(x, deterministic=False)
            low = x_drop @ adapter["A"].astype(self.dtype).T
            y = lora.apply(x, kernel, None, self.lora_scale)
            y = y + self.lora_scale * (low @ adapter["B"].astype(self.dtype).T)
        return y + bias.astype(self.dtype)


class _Block(nn.Module):
    """Shared fields of the sub-modules that hold adapted projections."""

    cfg: EncoderConfig
    prefix: str  # layer_name prefix of this module's projections, e.g. "layer_0/attention"
    lora_scale: float
    lora_dropout: float
    dtype: Any

    def dense(self, features: int, name: str) -> LoraDense:
        return LoraDense(
            features,
            f"{self.prefix}/{name}",
            self.cfg.initializer_range,
            self.lora_scale,
            self.lora_dropout,
            self.dtype,
            name=name,
        )


class SelfAttention(_Block):
    """Multi-head self-attention; projections ``query``, ``key``, ``value``, ``attn_out``."""

    @nn.compact
    def __call__(self, x, mask_bias, adapters, deterministic):
        b, L, d = x.shape
        h = self.cfg.num_heads
        q, k, v = (
            self.dense(d, n)(x, adapters, deterministic).reshape(b, L, h, d // h)
            for n in ("query", "key", "value")
        )
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        probs = jax.nn.softmax(scores / math.sqrt(d // h) + mask_bias, axis=-1)
        probs = nn.Dropout(self.cfg.attention_dropout)(probs, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v).reshape(b, L, d)
        return self.dense(d, "attn_out")(context, adapters, deterministic)


class Mlp(_Block):
    """Feed-forward block; projections ``mlp_up`` (d -> intermediate) and ``mlp_down``."""

    @nn.compact
    def __call__(self, x, adapters, deterministic):
        up = self.dense(self.cfg.intermediate_size, "mlp_up")(x, adapters, deterministic)
        act = ACTIVATIONS[self.cfg.hidden_act](up)
        return self.dense(self.cfg.hidden_size, "mlp_down")(act, adapters, deterministic)


class Layer(nn.Module):
    """One post-LayerNorm transformer block, as in BERT."""

    cfg: EncoderConfig
    index: int
    lora_scale: float
    lora_dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, x, mask_bias, adapters, deterministic):
        cfg, s, p, dt = self.cfg, self.lora_scale, self.lora_dropout, self.dtype
        drop = nn.Dropout(cfg.hidden_dropout)
        prefix = f"layer_{self.index}"
        a = SelfAttention(cfg, f"{prefix}/attention", s, p, dt, name="attention")(
            x, mask_bias, adapters, deterministic
        )
        a = drop(a, deterministic=deterministic)
        x = _layer_norm(cfg, "attn_ln")(x.astype(jnp.float32) + a.astype(jnp.float32))
        x = x.astype(self.dtype)
        m = Mlp(cfg, f"{prefix}/mlp", s, p, dt, name="mlp")(x, adapters, deterministic)
        m = drop(m, deterministic=deterministic)
        x = _layer_norm(cfg, "mlp_ln")(x.astype(jnp.float32) + m.astype(jnp.float32))
        return x.astype(self.dtype)


def position_ids(cfg: EncoderConfig, input_ids: jax.Array, offsets=None) -> jax.Array:
    """``[b, L]`` positions: ``0..L-1`` (BERT) or RoBERTa's count of non-pad tokens;
    of a packed row (``offsets``: each token's place in its example), ``offsets`` (BERT)
    or ``offsets + pad_token_id + 1`` (RoBERTa)."""
    b, L = input_ids.shape
    if offsets is not None:
        return offsets + (cfg.pad_token_id + 1 if cfg.model_type == "roberta" else 0)
    if cfg.model_type == "roberta":
        not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
    return jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (b, L))


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout."""

    cfg: EncoderConfig
    dtype: Any

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic, positions=None):
        cfg = self.cfg
        L = input_ids.shape[1]
        needed = L + (cfg.pad_token_id + 1 if cfg.model_type == "roberta" else 0)
        if needed > cfg.max_positions:
            raise ValueError(
                f"sequence length {L} needs {needed} positions; model has {cfg.max_positions}"
            )
        if cfg.type_vocab_size == 1:  # RoBERTa checkpoints: one token type only
            token_type_ids = jnp.zeros_like(input_ids)
        init = nn.initializers.normal(cfg.initializer_range)
        embed = functools.partial(nn.Embed, features=cfg.hidden_size, embedding_init=init)
        x = (
            embed(cfg.vocab_size, name="word")(input_ids)
            + embed(cfg.max_positions, name="position")(position_ids(cfg, input_ids, positions))
            + embed(cfg.type_vocab_size, name="token_type")(token_type_ids)
        )
        x = _layer_norm(cfg, "ln")(x)
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        return x.astype(self.dtype)


class Encoder(nn.Module):
    """The frozen base: embeddings, ``num_layers`` blocks and (BERT only) the pooler.

    Returns ``(hidden [b, L, d], pooled [b, d])`` in ``dtype``; RoBERTa's ``pooled`` is
    the un-pooled ``<s>`` vector its head expects.

    Packed rows (:mod:`floranna_jax.packing`): ``packed = (segment_ids [R, T], positions
    [R, T], starts [b])``; a token attends only to its own example's tokens, positions
    restart per example, and ``pooled [b, d]`` reads each example's first token.
    """

    cfg: EncoderConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids, attention_mask, token_type_ids, adapters, deterministic=True, packed=None
    ):
        cfg = self.cfg
        segments, positions, starts = (None, None, None) if packed is None else packed
        embed = Embeddings(cfg, self.dtype, name="embeddings")
        x = embed(input_ids, token_type_ids, deterministic, positions)
        if packed is None:  # a key mask [b, 1, 1, L]
            allowed = attention_mask[:, None, None, :] > 0
        else:  # same example, same row: [R, 1, T, T]
            allowed = (segments[:, None, :, None] == segments[:, None, None, :]) & (
                segments[:, None, None, :] > 0
            )
        # Additive mask; finfo.min (not -inf) keeps an all-pad row finite.
        mask_bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
        for i in range(cfg.num_layers):
            layer = Layer(cfg, i, self.lora_scale, self.lora_dropout, self.dtype, name=f"layer_{i}")
            x = layer(x, mask_bias, adapters, deterministic)
        pooled = x[:, 0] if packed is None else x.reshape(-1, x.shape[-1])[starts]
        if cfg.model_type == "bert":
            pooler = nn.Dense(
                cfg.hidden_size,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.initializers.normal(cfg.initializer_range),
                name="pooler",
            )
            pooled = jnp.tanh(pooler(pooled))
        return x, pooled


class Head(nn.Module):
    """Task head on ``pooled [b, d]`` -> ``[b, num_labels]`` (regression: num_labels=1).

    BERT (``BertForSequenceClassification``): dropout, ``classifier``.
    RoBERTa (``RobertaClassificationHead``): dropout, ``dense``, tanh, dropout, ``out_proj``.
    """

    cfg: EncoderConfig
    num_labels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled, deterministic=True):
        cfg = self.cfg
        dense = functools.partial(
            nn.Dense,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(cfg.initializer_range),
        )
        drop = nn.Dropout(cfg.classifier_dropout)
        x = drop(pooled, deterministic=deterministic)
        if cfg.model_type == "roberta":
            x = jnp.tanh(dense(cfg.hidden_size, name="dense")(x))
            x = drop(x, deterministic=deterministic)
            return dense(self.num_labels, name="out_proj")(x)
        return dense(self.num_labels, name="classifier")(x)


def _inputs(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array, tuple | None]:
    """``(ids, mask, types, packed)`` of a padded batch or a packed one (``segment_ids``)."""
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    packed = None
    if "segment_ids" in batch:
        packed = tuple(jnp.asarray(batch[k], jnp.int32)
                       for k in ("segment_ids", "positions", "starts"))  # fmt: skip
        mask = (packed[0] > 0).astype(jnp.int32)
    else:
        mask = batch.get("attention_mask")
        mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask, jnp.int32)
    types = batch.get("token_type_ids")
    types = jnp.zeros_like(ids) if types is None else jnp.asarray(types, jnp.int32)
    return ids, mask, types, packed


def encode(
    hf_config: dict,
    base: Params,
    batch: dict,
    *,
    adapters: dict | None = None,
    lora_scale: float = 1.0,
    compute_dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """Deterministic features: ``(last hidden [b, L, d], pooled [b, d])``, float32.

    ``pooled`` is BERT's pooler output, or RoBERTa's ``<s>`` hidden state.
    """
    run = _encoder_fn(parse_config(hf_config), float(lora_scale), jnp.dtype(compute_dtype).name)
    ids, mask, types, packed = _inputs(batch)
    if packed is not None:
        raise ValueError("encode takes padded rows (input_ids, attention_mask), not packed ones")
    return run(base, adapters or {}, ids, mask, types)


@functools.lru_cache(maxsize=16)
def _encoder_fn(cfg: EncoderConfig, lora_scale: float, dtype: str):
    module = Encoder(cfg, lora_scale, 0.0, jnp.dtype(dtype))

    @jax.jit
    def run(base, adapters, ids, mask, types):
        hidden, pooled = module.apply({"params": base}, ids, mask, types, adapters, True)
        return hidden.astype(jnp.float32), pooled.astype(jnp.float32)

    return run
