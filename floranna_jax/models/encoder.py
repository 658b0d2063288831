"""BERT and RoBERTa encoders in Flax (linen), with LoRA on chosen projections, and task heads.

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

Mixed precision: parameters stay float32; matmuls run in ``compute_dtype``; LayerNorm,
residual sums and softmax run in float32; logits come back float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from floranna_jax import lora
from floranna_jax.models.architecture import Architecture, Params

MODEL_TYPES = ("bert", "roberta")
ATTENTION_TARGETS = ("query", "key", "value", "attn_out")
MLP_TARGETS = ("mlp_up", "mlp_down")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS

_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


class EncoderConfig(NamedTuple):
    """The fields of a Hugging Face BERT/RoBERTa ``config.json`` this module uses."""

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
    missing = [k for k in _REQUIRED if k not in hf_config]
    if missing:
        raise ValueError(f"{model_type} config lacks {missing}")
    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"position_embedding_type={hf_config['position_embedding_type']!r}: only 'absolute'"
        )
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
        raise ValueError("decoder / cross-attention BERT configs are not supported")
    act = hf_config.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} not in {sorted(_ACTIVATIONS)}")
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
        act = _ACTIVATIONS[self.cfg.hidden_act](up)
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


def position_ids(cfg: EncoderConfig, input_ids: jax.Array) -> jax.Array:
    """``[b, L]`` positions: ``0..L-1`` (BERT) or RoBERTa's count of non-pad tokens."""
    b, L = input_ids.shape
    if cfg.model_type == "roberta":
        not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
    return jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (b, L))


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout."""

    cfg: EncoderConfig
    dtype: Any

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic):
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
            + embed(cfg.max_positions, name="position")(position_ids(cfg, input_ids))
            + embed(cfg.type_vocab_size, name="token_type")(token_type_ids)
        )
        x = _layer_norm(cfg, "ln")(x)
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        return x.astype(self.dtype)


class Encoder(nn.Module):
    """The frozen base: embeddings, ``num_layers`` blocks and (BERT only) the pooler.

    Returns ``(hidden [b, L, d], pooled [b, d])`` in ``dtype``; RoBERTa's ``pooled`` is
    the un-pooled ``<s>`` vector its head expects.
    """

    cfg: EncoderConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, adapters, deterministic=True):
        cfg = self.cfg
        x = Embeddings(cfg, self.dtype, name="embeddings")(input_ids, token_type_ids, deterministic)
        # Additive key mask; finfo.min (not -inf) keeps an all-pad row finite.
        mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        for i in range(cfg.num_layers):
            layer = Layer(cfg, i, self.lora_scale, self.lora_dropout, self.dtype, name=f"layer_{i}")
            x = layer(x, mask_bias, adapters, deterministic)
        pooled = x[:, 0]
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


def _inputs(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    mask = batch.get("attention_mask")
    mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask, jnp.int32)
    types = batch.get("token_type_ids")
    types = jnp.zeros_like(ids) if types is None else jnp.asarray(types, jnp.int32)
    return ids, mask, types


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
    return run(base, adapters or {}, *_inputs(batch))


@functools.lru_cache(maxsize=16)
def _encoder_fn(cfg: EncoderConfig, lora_scale: float, dtype: str):
    module = Encoder(cfg, lora_scale, 0.0, jnp.dtype(dtype))

    @jax.jit
    def run(base, adapters, ids, mask, types):
        hidden, pooled = module.apply({"params": base}, ids, mask, types, adapters, True)
        return hidden.astype(jnp.float32), pooled.astype(jnp.float32)

    return run


_MODULE_NAMES = {
    "embeddings/word": "embeddings.word_embeddings",
    "embeddings/position": "embeddings.position_embeddings",
    "embeddings/token_type": "embeddings.token_type_embeddings",
    "embeddings/ln": "embeddings.LayerNorm",
    "layer_{i}/attention/query": "encoder.layer.{i}.attention.self.query",
    "layer_{i}/attention/key": "encoder.layer.{i}.attention.self.key",
    "layer_{i}/attention/value": "encoder.layer.{i}.attention.self.value",
    "layer_{i}/attention/attn_out": "encoder.layer.{i}.attention.output.dense",
    "layer_{i}/attn_ln": "encoder.layer.{i}.attention.output.LayerNorm",
    "layer_{i}/mlp/mlp_up": "encoder.layer.{i}.intermediate.dense",
    "layer_{i}/mlp/mlp_down": "encoder.layer.{i}.output.dense",
    "layer_{i}/mlp_ln": "encoder.layer.{i}.output.LayerNorm",
    "pooler": "pooler.dense",
    "head/classifier": "classifier",
    "head/dense": "classifier.dense",
    "head/out_proj": "classifier.out_proj",
}
_LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


def checkpoint_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> the unprefixed Hugging Face name (``encoder.layer.0....``)."""
    *module, leaf = path
    index = None
    if module and module[0].startswith("layer_"):
        index, module[0] = module[0].removeprefix("layer_"), "layer_{i}"
    key = "/".join(module)
    if key not in _MODULE_NAMES or leaf not in _LEAF_NAMES:
        raise KeyError(f"no checkpoint name for parameter {'/'.join(path)}")
    return f"{_MODULE_NAMES[key].format(i=index)}.{_LEAF_NAMES[leaf]}"


def canonical_key(model_type: str, key: str) -> str | None:
    """Strip the ``bert.``/``roberta.`` prefix, rename LayerNorm gamma/beta; None: unused."""
    key = key.removeprefix(f"{model_type}.")
    if key.endswith("LayerNorm.gamma"):
        key = key.removesuffix("gamma") + "weight"
    elif key.endswith("LayerNorm.beta"):
        key = key.removesuffix("beta") + "bias"
    buffers = ("embeddings.position_ids", "embeddings.token_type_ids")
    pretraining_heads = ("cls.", "lm_head.")  # MLM / NSP heads of pre-training checkpoints
    if key in buffers or key.startswith(pretraining_heads):
        return None
    if model_type == "roberta" and key.startswith("pooler."):  # RoBERTa's head skips it
        return None
    return key


def _rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded by a jax key (typed or raw uint32)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())


def init_like(shapes: Params, key: jax.Array, std: float) -> Params:
    """Hugging Face's BERT init for a tree of shapes: kernels and embeddings
    ``N(0, std^2)``, biases 0, LayerNorm scales 1; float32.

    numpy, not XLA: compiling a jitted random init of every layer costs seconds on a
    CPU, filling arrays costs milliseconds; the result is still a function of ``key``.
    """
    rng = _rng(key)

    def leaf(path, s):
        name = path[-1].key
        if name in ("kernel", "embedding"):
            return jnp.asarray(rng.normal(0.0, std, s.shape), jnp.float32)
        return jnp.full(s.shape, 1.0 if name == "scale" else 0.0, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


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
        _, pooled = encoder.apply(
            {"params": base}, *_inputs(batch), adapters, deterministic, rngs=rngs_enc
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
