"""The LLaMA/Mistral decoder as pure functions over a parameter tree, layers under one scan.

Numerically this follows Hugging Face ``LlamaForCausalLM`` (pre-RMSNorm blocks, rotary
embeddings in the ``rotate_half`` layout, grouped-query attention, SwiGLU MLP), so
checkpoints load unchanged; tests check parity with the PyTorch implementation.

The base tree (:func:`param_shapes`) stacks the ``N`` layers along axis 0 under
``"layers"`` (``layers/attn/q_proj/kernel: [N, d, H*hd]``), and :func:`run_layers` runs
them under one ``jax.lax.scan``, so compiling costs one layer whatever the depth.
Adapters arrive per layer (``"layers_3/attn/q_proj" -> {"A": [r, d_in], "B": [d_out,
r]}``, what the server sees) and :func:`stack_adapters` stacks them for the scan.

Mixed precision: adapters are float32, the frozen base float32 or bfloat16 (``base_dtype``);
matmuls run in ``dtype``; the residual stream, RMSNorm, rotary embeddings and softmax run
in float32.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from floranna_jax import lora
from floranna_jax.models.architecture import Params, split_stacked
from floranna_jax.models.decoder.config import ATTENTION_TARGETS, TARGETS, DecoderConfig

_NEG = float(jnp.finfo(jnp.float32).min)  # additive mask: finite, so an all-masked row stays finite


def _block_of(target: str) -> str:
    return "attn" if target in ATTENTION_TARGETS else "mlp"


def target_dims(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """``target -> (d_in, d_out)`` of every projection of one layer."""
    d, q, kv, i = (cfg.hidden_size, cfg.num_heads * cfg.head_dim,
                   cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size)  # fmt: skip
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}  # fmt: skip


def param_shapes(cfg: DecoderConfig) -> Params:
    """The base tree as ``jax.ShapeDtypeStruct`` leaves (float32); no ``lm_head`` if tied."""
    N, d = cfg.num_layers, cfg.hidden_size

    def leaf(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    dims = target_dims(cfg)
    layers = {"attn": {}, "mlp": {}}
    for t in TARGETS:
        layers[_block_of(t)][t] = {"kernel": leaf(N, *dims[t])}
    layers |= {"input_norm": {"scale": leaf(N, d)}, "post_attn_norm": {"scale": leaf(N, d)}}
    base = {
        "embed_tokens": {"embedding": leaf(cfg.vocab_size, d)},
        "layers": layers,
        "norm": {"scale": leaf(d)},
    }
    if not cfg.tie_embeddings:
        base["lm_head"] = {"kernel": leaf(d, cfg.vocab_size)}
    return base


def stack_adapters(cfg: DecoderConfig, adapters: dict) -> dict:
    """Per-layer adapters -> ``{"attn/q_proj": {"A": [N, r, d_in], "B": [N, d_out, r]}}``.

    A target adapted in some layers only gets zeros elsewhere (``B = 0``: exactly the bare
    layer there); names that are not a projection of this model raise ``ValueError``.
    """
    by_target: dict[str, dict[int, Any]] = {}
    bad = []
    for name, adapter in adapters.items():
        parts = split_stacked(name)
        stack, i, rest = parts if parts else ("", -1, "")
        target = rest.rpartition("/")[2]
        known = target in TARGETS and rest == f"{_block_of(target)}/{target}"
        if stack != "layers" or not 0 <= i < cfg.num_layers or not known:
            bad.append(name)
        else:
            by_target.setdefault(rest, {})[i] = adapter
    if bad:
        raise ValueError(f"adapters for unknown layers {sorted(bad)}")
    stacked = {}
    for rest, layers in by_target.items():
        some = next(iter(layers.values()))
        zero = jax.tree.map(jnp.zeros_like, some)
        per_layer = [layers.get(i, zero) for i in range(cfg.num_layers)]
        stacked[rest] = jax.tree.map(lambda *x: jnp.stack(x), *per_layer)
    return stacked


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """``scale * x / sqrt(mean(x^2) + eps)`` in float32, as ``LlamaRMSNorm``."""
    x = x.astype(jnp.float32)
    return scale * (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps))


@functools.lru_cache(maxsize=16)
def inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """``[hd / 2]`` rotary frequencies ``theta ** (-2k / hd)``, float32 as transformers."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def rotary(cfg: DecoderConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)``: ``[..., hd]`` float32 for integer ``positions [...]``."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq(cfg.head_dim, cfg.rope_theta)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` in float32; ``x [R, T, ..., hd]``."""
    extra = (None,) * (x.ndim - cos.ndim)
    cos, sin = cos[:, :, *extra, :], sin[:, :, *extra, :]
    x = x.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Context(NamedTuple):
    """What every layer of one forward pass shares.

    cos, sin: ``[R, T, hd]`` rotary tables of the queries (and new keys); allowed:
    ``[R, T, S]`` bool, which of the ``S`` keys each query sees; dtype: compute dtype;
    scale: the LoRA scale; dropout: ``(lora rate, attention rate)`` or None (deterministic).
    """

    cos: jax.Array
    sin: jax.Array
    allowed: jax.Array
    dtype: Any
    scale: float
    dropout: tuple[float, float] | None = None


def _uniform(key, shape) -> jax.Array:
    """Uniform [0, 1) drawn flat, then reshaped: XLA compiles threefry for a rank-5 shape
    ten times slower than for a flat one (17 s against 1.5 s on a 2-core CPU)."""
    return jax.random.uniform(key, (int(np.prod(shape)),)).reshape(shape)


def _dropout(key, x, rate):
    return jnp.where(_uniform(key, x.shape) >= rate, x / (1.0 - rate), 0.0).astype(x.dtype)


def lora_dropout_masks(cfg: DecoderConfig, ctx: Context, adapters, key, R: int, T: int):
    """``target -> [R, T, d_in]`` scaled keep masks of the adapted projections of one layer,
    one independent mask each, drawn in ONE random call (each call is a threefry program
    XLA compiles separately, seconds apiece on a CPU); ``{}`` without LoRA dropout."""
    targets = [t for t in TARGETS if f"{_block_of(t)}/{t}" in adapters]
    if key is None or ctx.dropout is None or ctx.dropout[0] == 0.0 or not targets:
        return {}
    rate, dims = ctx.dropout[0], target_dims(cfg)
    widths = [dims[t][0] for t in targets]
    u = _uniform(key, (R, T, sum(widths)))
    parts = jnp.split(u, np.cumsum(widths)[:-1].tolist(), axis=-1)
    return {t: ((u_t >= rate) / (1.0 - rate)).astype(ctx.dtype)
            for t, u_t in zip(targets, parts, strict=True)}  # fmt: skip


def _dense(ctx: Context, x, kernel, adapter, keep):
    """``x @ W0^T + s B A (keep * x)`` in ``ctx.dtype``: LoRA dropout (``keep``, a scaled
    mask or None) drops the adapter's input only, as PEFT's ``lora_dropout``."""
    x = x.astype(ctx.dtype)
    if adapter is None or keep is None:
        return lora.apply(x, kernel, adapter, ctx.scale)
    low = (x * keep) @ adapter["A"].astype(ctx.dtype).T
    return lora.apply(x, kernel, None, ctx.scale) + ctx.scale * (
        low @ adapter["B"].astype(ctx.dtype).T
    )


def attend(cfg: DecoderConfig, ctx: Context, q, k, v, key) -> jax.Array:
    """Grouped-query attention: ``q [R, T, KV, G, hd]``, ``k, v [R, S, KV, hd]`` ->
    ``[R, T, H * hd]``; query head ``j * G + g`` reads key/value head ``j``."""
    scores = jnp.einsum("rtkgd,rskd->rkgts", q, k).astype(jnp.float32)
    scores = scores * (cfg.head_dim**-0.5) + jnp.where(ctx.allowed, 0.0, _NEG)[:, None, None]
    probs = jax.nn.softmax(scores, axis=-1)
    if ctx.dropout is not None and ctx.dropout[1] > 0.0:
        probs = _dropout(key, probs, ctx.dropout[1])
    out = jnp.einsum("rkgts,rskd->rtkgd", probs.astype(ctx.dtype), v)
    return out.reshape(*out.shape[:2], -1)


def block(cfg: DecoderConfig, ctx: Context, x, p, adapters, key, cache=None):
    """One pre-norm decoder layer on the float32 residual ``x [R, T, d]``.

    ``p``: this layer's slice of ``base["layers"]``; ``adapters``: ``{"attn/q_proj":
    {"A", "B"}}`` of this layer. ``cache``: None, or ``(k [R, S, KV, hd], v, index)``:
    the new keys and values are written at ``index`` and the queries attend to all ``S``.
    Returns ``(x, (k, v))`` with this call's new keys and values ``[R, T, KV, hd]``.
    """
    R, T, _ = x.shape
    k_lora, k_attn = (None, None) if key is None else jax.random.split(key)
    keep = lora_dropout_masks(cfg, ctx, adapters, k_lora, R, T)

    def proj(target, h):
        block, kernel = _block_of(target), p[_block_of(target)][target]["kernel"]
        return _dense(ctx, h, kernel, adapters.get(f"{block}/{target}"), keep.get(target))

    h = rms_norm(x, p["input_norm"]["scale"], cfg.rms_norm_eps)
    kv, group, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    q = _rotate(proj("q_proj", h).reshape(R, T, kv, group, hd), ctx.cos, ctx.sin)
    k = _rotate(proj("k_proj", h).reshape(R, T, kv, hd), ctx.cos, ctx.sin).astype(ctx.dtype)
    v = proj("v_proj", h).reshape(R, T, kv, hd)
    k_all, v_all = k, v
    if cache is not None:
        k_cache, v_cache, index = cache
        k_all = jax.lax.dynamic_update_slice(k_cache, k, (0, index, 0, 0))
        v_all = jax.lax.dynamic_update_slice(v_cache, v, (0, index, 0, 0))
    context = attend(cfg, ctx, q.astype(ctx.dtype), k_all, v_all, k_attn)
    x = x + proj("o_proj", context).astype(jnp.float32)
    h = rms_norm(x, p["post_attn_norm"]["scale"], cfg.rms_norm_eps)
    gated = jax.nn.silu(proj("gate_proj", h)) * proj("up_proj", h)
    x = x + proj("down_proj", gated).astype(jnp.float32)
    return x, (k, v)


def run_layers(cfg, ctx, layers, adapters, x, *, key=None, cache=None, remat=False,
               collect_kv=False):  # fmt: skip
    """All ``N`` layers under one ``lax.scan`` over the stacked ``layers`` and ``adapters``
    (:func:`stack_adapters`). ``cache``: None or ``(k [N, R, S, KV, hd], v, index)``.

    Returns ``(x, kv)``: ``kv = (k, v)`` ``[N, R, T, KV, hd]`` with ``collect_kv`` (or a
    cache), else None. ``remat`` recomputes each layer in the backward pass.
    """
    n = cfg.num_layers
    keys = None if key is None else jax.random.split(key, n)
    caches = None if cache is None else (cache[0], cache[1])
    shared = (ctx.cos, ctx.sin, ctx.allowed, None if cache is None else cache[2])
    keep_kv = collect_kv or cache is not None

    def layer(x, p, a, k, c, shared):  # every array an argument: jax.checkpoint needs it
        cos, sin, allowed, index = shared
        here = ctx._replace(cos=cos, sin=sin, allowed=allowed)
        x, kv = block(cfg, here, x, p, a, k, None if c is None else (*c, index))
        return x, (kv if keep_kv else None)

    if remat:
        layer = jax.checkpoint(layer, prevent_cse=False)

    def body(x, xs):
        return layer(x, *xs, shared)

    return jax.lax.scan(body, x, (layers, adapters, keys, caches), length=n)


def embed(base: Params, ids: jax.Array) -> jax.Array:
    """``[R, T]`` token ids -> float32 ``[R, T, d]``."""
    return jnp.take(base["embed_tokens"]["embedding"], ids, axis=0).astype(jnp.float32)


def head_kernel(cfg: DecoderConfig, base: Params) -> jax.Array:
    """``[d, vocab]``: ``lm_head``, or the transposed embedding when tied."""
    if cfg.tie_embeddings:
        return base["embed_tokens"]["embedding"].T
    return base["lm_head"]["kernel"]


def final_hidden(cfg: DecoderConfig, base: Params, x: jax.Array) -> jax.Array:
    """The last RMSNorm: float32 ``[..., d]``."""
    return rms_norm(x, base["norm"]["scale"], cfg.rms_norm_eps)


def attention_allowed(cfg, positions, key_positions, key_ok, causal) -> jax.Array:
    """``[R, T, S]`` bool: key ``s`` visible to query ``t`` when ``key_ok [R, S]`` (or
    ``[R, T, S]``), ``causal [T, S]``, and (Mistral) within the sliding window."""
    ok = key_ok if key_ok.ndim == 3 else key_ok[:, None, :]
    ok = ok & causal[None]
    if cfg.sliding_window is not None:
        distance = positions[:, :, None] - key_positions[:, None, :]
        ok = ok & (distance < cfg.sliding_window)
    return ok


def causal(T: int, S: int | None = None) -> jax.Array:
    """``[T, S]`` bool: key index ``<=`` query index (queries are the last ``T`` of ``S``)."""
    S = T if S is None else S
    return jnp.arange(S)[None, :] <= jnp.arange(S - T, S)[:, None]
