"""The decoder layer as pure functions over a parameter tree, layers under one scan.

Numerically this follows Hugging Face's ``*ForCausalLM`` of each family (pre-RMSNorm
blocks, rotary embeddings in the ``rotate_half`` layout, grouped-query attention, gated
MLP), so checkpoints load unchanged; tests check parity with the PyTorch implementations.
What differs between families is chosen by the fields of :class:`DecoderConfig` that the
family's record (:mod:`.families`) sets: q/k/v and o biases, per-head q/k norms, Gemma's
norm offset, embedding scale, post-attention/post-MLP norms, GeGLU, query scale and
soft-caps, per-layer sliding windows and a local rotary table, Phi-3's fused projections.

The base tree (:func:`param_shapes`) stacks the ``N`` layers along axis 0 under
``"layers"`` (``layers/attn/q_proj/kernel: [N, d, H*hd]``), and :func:`run_layers` runs
them under one ``jax.lax.scan``, so compiling costs one layer whatever the depth; what
varies per layer (window, rotary table) is scanned along with the weights.
Adapters arrive per layer (``"layers_3/attn/q_proj" -> {"A": [r, d_in], "B": [d_out,
r]}``, what the server sees) and :func:`stack_adapters` stacks them for the scan.

Mixed precision: adapters are float32, the frozen base float32 or bfloat16 (``base_dtype``);
matmuls run in ``dtype``; the residual stream, RMSNorm, rotary embeddings and softmax run
in float32.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from floranna_jax import fsdp
from floranna_jax.models import quant
from floranna_jax.models.architecture import Params, split_stacked
from floranna_jax.models.decoder import rotary as rotary_lib
from floranna_jax.models.decoder.config import ATTENTION_PROJECTIONS, DecoderConfig

# Queries per chunk of causal self-attention (attend): XLA computes every score of its mask,
# so later chunks alone read the later keys.
QUERY_CHUNK = 64
_NEG = float(jnp.finfo(jnp.float32).min)  # additive mask: finite, so an all-masked row stays finite
_NO_WINDOW = np.iinfo(np.int32).max  # the window of a full-attention layer in the scan


def block_of(target: str) -> str:
    """``"attn"`` or ``"mlp"``: the subtree of a layer that holds projection ``target``."""
    return "attn" if target in ATTENTION_PROJECTIONS else "mlp"


def target_dims(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """``target -> (d_in, d_out)`` of every projection of one layer."""
    d, q, kv, i = (cfg.hidden_size, cfg.num_heads * cfg.head_dim,
                   cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size)  # fmt: skip
    dims = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "qkv_proj": (d, q + 2 * kv),
            "o_proj": (q, d), "gate_proj": (d, i), "up_proj": (d, i), "gate_up_proj": (d, 2 * i),
            "down_proj": (i, d)}  # fmt: skip
    return {t: dims[t] for t in cfg.projections}


def _has_bias(cfg: DecoderConfig, target: str) -> bool:
    return (cfg.qkv_bias and target in ("q_proj", "k_proj", "v_proj")) or (
        cfg.o_bias and target == "o_proj"
    )


def param_shapes(cfg: DecoderConfig) -> Params:
    """The base tree as ``jax.ShapeDtypeStruct`` leaves (float32); no ``lm_head`` if tied."""
    N, d = cfg.num_layers, cfg.hidden_size

    def leaf(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    layers = {"attn": {}, "mlp": {}}
    for t, (d_in, d_out) in target_dims(cfg).items():
        layers[block_of(t)][t] = {"kernel": leaf(N, d_in, d_out)}
        if _has_bias(cfg, t):
            layers[block_of(t)][t]["bias"] = leaf(N, d_out)
    for norm in cfg.norms:  # "attn/q_norm" norms one head: [hd]; the others the residual
        block, _, name = norm.rpartition("/")
        width = cfg.head_dim if block else d
        (layers[block] if block else layers)[name] = {"scale": leaf(N, width)}
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
        known = target in cfg.projections and rest == f"{block_of(target)}/{target}"
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


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """``(scale + offset) * x / sqrt(mean(x^2) + eps)`` in float32 (Gemma: offset 1)."""
    x = x.astype(jnp.float32)
    scale = scale + offset if offset else scale
    return scale * (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps))


def _norm(cfg: DecoderConfig, x: jax.Array, node: Params) -> jax.Array:
    return rms_norm(x, node["scale"], cfg.rms_norm_eps, cfg.norm_offset)


def rotary(cfg: DecoderConfig, positions: jax.Array, rope: rotary_lib.Rope | None = None):
    """``(cos, sin)``: ``[..., hd]`` float32 for integer ``positions [...]`` (default:
    the config's main table ``cfg.rope``)."""
    freq = rotary_lib.inv_freq(cfg.head_dim, cfg.rope if rope is None else rope)
    freqs = positions[..., None].astype(jnp.float32) * freq
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
    """What every layer of one forward pass shares (build it with :func:`context`).

    cos, sin: ``[R, T, hd]`` rotary tables of the queries (and new keys); allowed:
    ``[R, T, S]`` bool, which of the ``S`` keys each query sees before any sliding window;
    dtype: compute dtype; scale: the LoRA scale; dropout: ``(lora rate, attention rate)``
    or None (deterministic); local: ``(cos, sin)`` of the windowed layers when they use
    their own table (Gemma 3), else None; positions ``[R, T]`` and key_positions ``[R,
    S]``: what the sliding windows measure distances in.
    """

    cos: jax.Array
    sin: jax.Array
    allowed: jax.Array
    dtype: Any
    scale: float
    dropout: tuple[float, float] | None = None
    local: tuple[jax.Array, jax.Array] | None = None
    positions: jax.Array | None = None
    key_positions: jax.Array | None = None


def context(cfg, positions, key_positions, allowed, dtype, scale, dropout=None) -> Context:
    """The :class:`Context` of queries at ``positions [R, T]`` over keys at
    ``key_positions [R, S]`` with visibility ``allowed [R, T, S]``."""
    local = None if cfg.local_rope is None else rotary(cfg, positions, cfg.local_rope)
    return Context(*rotary(cfg, positions), allowed, dtype, scale, dropout, local, positions,
                   key_positions)  # fmt: skip


def _uniform(key, shape) -> jax.Array:
    """Uniform [0, 1) drawn flat, then reshaped: XLA compiles threefry for a rank-5 shape
    ten times slower than for a flat one (17 s against 1.5 s on a 2-core CPU)."""
    return jax.random.uniform(key, (int(np.prod(shape)),)).reshape(shape)


def _dropout(key, x, rate):
    return jnp.where(_uniform(key, x.shape) >= rate, x / (1.0 - rate), 0.0).astype(x.dtype)


def lora_dropout_masks(cfg: DecoderConfig, ctx: Context, adapters, key, R: int, T: int):
    """``target -> [R, T, d_in]`` scaled keep masks of the adapted projections of one layer,
    one independent mask each, drawn in ONE random call (each call is a threefry program
    XLA compiles separately, seconds apiece on a CPU); ``{}`` without LoRA dropout.

    Each 32-bit random word gives two 16-bit uniforms, so threefry runs half as often as
    for float32 uniforms (it dominated the cost of dropout: 40% less time for the draws of a
    SmolLM2 step). The drop probability is the rate rounded to a multiple of 2^-16, and the
    kept inputs are scaled by the inverse of the exact keep probability."""
    targets = [t for t in cfg.projections if f"{block_of(t)}/{t}" in adapters]
    if key is None or ctx.dropout is None or ctx.dropout[0] == 0.0 or not targets:
        return {}
    dims = target_dims(cfg)
    widths = [dims[t][0] for t in targets]
    n = R * T * sum(widths)
    words = jax.random.bits(key, (-(-n // 2),), jnp.uint32)
    u = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n]
    drop = min(round(ctx.dropout[0] * 65536), 65535)
    keep = (u.reshape(R, T, -1) >= drop).astype(ctx.dtype) * np.float32(65536 / (65536 - drop))
    parts = jnp.split(keep, np.cumsum(widths)[:-1].tolist(), axis=-1)
    return {t: checkpoint_name(m, "lora_keep") for t, m in zip(targets, parts, strict=True)}


def _dense(ctx: Context, x, node, adapter, keep):
    """``x @ W0^T (+ b) + s B A (keep * x)`` in ``ctx.dtype``: LoRA dropout (``keep``, a
    scaled mask or None) drops the adapter's input only, as PEFT's ``lora_dropout``. A
    quantized ``W0^T`` (int8 or NF4, :mod:`floranna_jax.models.quant`) is dequantized
    here, inside the layer scan, one projection at a time."""
    x = x.astype(ctx.dtype)
    y = quant.matmul(x, node["kernel"])
    if adapter is not None:
        low = (x if keep is None else x * keep) @ adapter["A"].astype(ctx.dtype).T
        y = y + ctx.scale * (low @ adapter["B"].astype(ctx.dtype).T)
    return y + node["bias"].astype(ctx.dtype) if "bias" in node else y


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (Gemma 2's soft-capping); ``x`` itself when ``cap`` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def attend(cfg: DecoderConfig, ctx: Context, q, k, v, key, cached: bool = False) -> jax.Array:
    """Grouped-query attention: ``q [R, T, KV, G, hd]``, ``k, v [R, S, KV, hd]`` (``cached``:
    a decode cache's ``[R, KV, hd, S]``) -> ``[R, T, H * hd]``; query head ``j * G + g``
    reads key/value head ``j``; scores scaled by ``cfg.query_scale``, keys masked by
    ``ctx.allowed``.

    ``jax.nn.dot_product_attention`` (XLA's fused path; the same grouping and float32
    softmax) unless the layer needs what it cannot express: Gemma 2's soft-capped scores,
    attention dropout, or a cache's layout, which take :func:`_attend_scores`."""
    dropping = ctx.dropout is not None and ctx.dropout[1] > 0.0
    if cfg.attn_softcap is not None or dropping or cached:
        return _attend_scores(cfg, ctx, q, k, v, key if dropping else None,
                              "rkds" if cached else "rskd")  # fmt: skip
    R, T, kv, group, hd = q.shape

    def fused(q, k, v, allowed):
        out = jax.nn.dot_product_attention(
            q.reshape(R, q.shape[1], kv * group, hd), k.astype(q.dtype), v.astype(q.dtype),
            mask=allowed[:, None], scale=cfg.query_scale,
        )  # fmt: skip
        return out.reshape(R, q.shape[1], -1)

    if T != k.shape[1] or T <= QUERY_CHUNK:
        return fused(q, k, v, ctx.allowed)
    # Every decoder mask is causal: the queries of a chunk see no key after its last one,
    # so each chunk reads only the keys up to there, (n + 1) / 2n of the T x T scores for
    # n chunks. The keys a query may see are all kept: the same softmax.
    ends = range(QUERY_CHUNK, T + QUERY_CHUNK, QUERY_CHUNK)
    parts = [fused(q[:, e - QUERY_CHUNK : e], k[:, :e], v[:, :e],
                   ctx.allowed[:, e - QUERY_CHUNK : e, :e]) for e in ends]  # fmt: skip
    return jnp.concatenate(parts, axis=1)


def _attend_scores(cfg: DecoderConfig, ctx: Context, q, k, v, key, layout="rskd") -> jax.Array:
    """:func:`attend` with explicit scores: soft-capped (Gemma 2) before the mask, and
    attention dropout on the probabilities when ``key`` is given. ``layout``: the einsum
    letters of ``k`` and ``v`` (``"rkds"``: a decode cache, keys last, so neither
    product transposes the cache)."""
    scores = jnp.einsum(f"rtkgd,{layout}->rkgts", q, k).astype(jnp.float32)
    scores = soft_cap(scores * cfg.query_scale, cfg.attn_softcap)
    scores = scores + jnp.where(ctx.allowed, 0.0, _NEG)[:, None, None]
    probs = jax.nn.softmax(scores, axis=-1)
    if key is not None:
        probs = _dropout(key, probs, ctx.dropout[1])
    out = jnp.einsum(f"rkgts,{layout}->rtkgd", probs.astype(ctx.dtype), v)
    return out.reshape(*out.shape[:2], -1)


def _qkv(cfg: DecoderConfig, proj, h):
    """Queries, keys, values ``[R, T, H*hd]``, ``[R, T, KV*hd]`` x2: Phi-3 slices one
    fused projection in that order."""
    if "qkv_proj" not in cfg.projections:
        return proj("q_proj", h), proj("k_proj", h), proj("v_proj", h)
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    qkv = proj("qkv_proj", h)
    return (qkv[..., :q_width], qkv[..., q_width : q_width + kv_width],
            qkv[..., q_width + kv_width :])  # fmt: skip


def _gated(cfg: DecoderConfig, proj, h):
    """``act(gate) * up``: SwiGLU or tanh-GeGLU; Phi-3's fused projection is gate then up."""
    if "gate_up_proj" in cfg.projections:
        gate, up = jnp.split(proj("gate_up_proj", h), 2, axis=-1)
    else:
        gate, up = proj("gate_proj", h), proj("up_proj", h)
    act = jax.nn.silu if cfg.activation == "silu" else lambda g: jax.nn.gelu(g, approximate=True)
    return act(gate) * up


def block(cfg: DecoderConfig, ctx: Context, x, p, adapters, key, cache=None):
    """One pre-norm decoder layer on the float32 residual ``x [R, T, d]``.

    ``p``: this layer's slice of ``base["layers"]``; ``adapters``: ``{"attn/q_proj":
    {"A", "B"}}`` of this layer. ``cache``: None, or ``(k [R, KV, hd, S], v, index)``
    (:func:`cache_layout`): the new keys and values are written at ``index`` and the
    queries attend to all ``S``. Returns ``(x, (k, v))``: this call's new keys and values
    ``[R, T, KV, hd]``, or with a cache the updated cache (written in place when the
    caller carries it in a loop).
    """
    R, T, _ = x.shape
    k_lora, k_attn = (None, None) if key is None else jax.random.split(key)
    keep = lora_dropout_masks(cfg, ctx, adapters, k_lora, R, T)

    def proj(target, h):
        block = block_of(target)
        return _dense(ctx, h, p[block][target], adapters.get(f"{block}/{target}"),
                      keep.get(target))  # fmt: skip

    kv, group, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    q, k, v = _qkv(cfg, proj, _norm(cfg, x, p["input_norm"]))
    q, k, v = q.reshape(R, T, kv, group, hd), k.reshape(R, T, kv, hd), v.reshape(R, T, kv, hd)
    if "attn/q_norm" in cfg.norms:  # Qwen3, Gemma 3: RMSNorm of each head, before rotary
        q, k = _norm(cfg, q, p["attn"]["q_norm"]), _norm(cfg, k, p["attn"]["k_norm"])
    q = _rotate(q, ctx.cos, ctx.sin)
    k = _rotate(k, ctx.cos, ctx.sin).astype(ctx.dtype)
    if cache is not None:
        k_cache, v_cache, index = cache
        k = jax.lax.dynamic_update_slice(k_cache, cache_layout(k), (0, 0, 0, index))
        v = jax.lax.dynamic_update_slice(v_cache, cache_layout(v), (0, 0, 0, index))
    context = attend(cfg, ctx, q.astype(ctx.dtype), k, v, k_attn, cached=cache is not None)
    out = proj("o_proj", context).astype(jnp.float32)
    x = x + (_norm(cfg, out, p["attn_out_norm"]) if "attn_out_norm" in cfg.norms else out)
    out = proj("down_proj", _gated(cfg, proj, _norm(cfg, x, p["post_attn_norm"])))
    out = out.astype(jnp.float32)
    x = x + (_norm(cfg, out, p["mlp_out_norm"]) if "mlp_out_norm" in cfg.norms else out)
    return x, (k, v)


def cache_layout(kv: jax.Array) -> jax.Array:
    """Keys or values ``[R, S, KV, hd]`` as a decode cache holds them, ``[R, KV, hd, S]``:
    the layout both attention products read without a transposed copy per token."""
    return jnp.transpose(kv, (0, 2, 3, 1))


def layer_plan(cfg: DecoderConfig):
    """``(window [N] int32, local [N] bool)``: each layer's sliding window (a huge one for
    full attention) and whether it uses the local rotary table."""
    windows = [_NO_WINDOW if w is None else w for w in cfg.layer_windows]
    local = [w is not None for w in cfg.layer_windows]
    return jnp.asarray(windows, jnp.int32), jnp.asarray(local)


def layer_view(cfg: DecoderConfig, ctx: Context, window, local) -> Context:
    """The context of one layer: its rotary table and its window applied to ``allowed``."""
    if cfg.local_rope is not None:
        (cos_l, sin_l) = ctx.local
        ctx = ctx._replace(
            cos=jnp.where(local, cos_l, ctx.cos), sin=jnp.where(local, sin_l, ctx.sin)
        )
    if any(w is not None for w in cfg.layer_windows):
        distance = ctx.positions[:, :, None] - ctx.key_positions[:, None, :]
        ctx = ctx._replace(allowed=ctx.allowed & (distance < window))
    return ctx


# What a layer keeps for the backward pass without remat: its matmul outputs and its LoRA
# dropout masks (random draws cost more to redo than to keep). The elementwise work between
# them (norms, rotary, activation, softmax, residual adds) is recomputed, which is cheap,
# instead of storing every intermediate: SmolLM2 at 4 x 256 kept 2.6 GB of residuals, now
# 1.2 GB (jax's saved_residuals, beyond the step's arguments), and each stored residual is
# written, zero-filled and copied once more per step by the scan.
KEEP_FOR_BACKWARD = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_saveable,
    jax.checkpoint_policies.save_only_these_names("lora_keep"),
)


def run_layers(cfg, ctx, layers, adapters, x, *, key=None, remat=False, collect_kv=False):
    """All ``N`` layers under one ``lax.scan`` over the stacked ``layers`` and ``adapters``
    (:func:`stack_adapters`).

    Returns ``(x, kv)``: ``kv = (k, v)`` ``[N, R, T, KV, hd]`` with ``collect_kv``, else
    None. ``remat`` recomputes each layer in the backward pass.
    """
    n = cfg.num_layers
    keys = None if key is None else jax.random.split(key, n)
    arrays = ("cos", "sin", "allowed", "local", "positions", "key_positions")
    shared = tuple(getattr(ctx, f) for f in arrays)

    def layer(x, p, a, k, info, shared):  # every array an argument: jax.checkpoint needs it
        here = layer_view(cfg, ctx._replace(**dict(zip(arrays, shared, strict=True))), *info)
        p = fsdp.gather_layer(p)  # a split base: this layer whole, one layer at a time
        x, kv = block(cfg, here, x, p, a, k)
        return x, (kv if collect_kv else None)

    # A gathered layer kept for the backward pass would put the whole base on every device
    # (measured: a policy saving all but the gathered kernels still kept their uses), so a
    # split base recomputes each layer, gathering it again, whatever ``remat`` says.
    if remat or fsdp.gathering():
        layer = jax.checkpoint(layer, prevent_cse=False)
    else:
        layer = jax.checkpoint(layer, prevent_cse=False, policy=KEEP_FOR_BACKWARD)

    def body(x, xs):
        return layer(x, *xs, shared)

    x = fsdp.split_rows(x)
    return jax.lax.scan(body, x, (layers, adapters, keys, layer_plan(cfg)), length=n)


def embed(cfg: DecoderConfig, base: Params, ids: jax.Array) -> jax.Array:
    """``[R, T]`` token ids -> float32 ``[R, T, d]`` (times ``sqrt(d)`` for Gemma)."""
    x = jnp.take(base["embed_tokens"]["embedding"], ids, axis=0).astype(jnp.float32)
    return x * np.float32(cfg.embed_scale) if cfg.embed_scale != 1.0 else x


def head_kernel(cfg: DecoderConfig, base: Params) -> tuple[jax.Array, str]:
    """``(w, axes)``: the output head as stored and the einsum letters of its axes,
    ``lm_head``'s ``[d, vocab]`` (``"dv"``) or, when tied, the embedding ``[vocab, d]``
    (``"vd"``). Products read it in place: a transposed view of the embedding would be
    copied whole on every training step (113 MB for SmolLM2, 3% of its step's time)."""
    if cfg.tie_embeddings:
        return base["embed_tokens"]["embedding"], "vd"
    return base["lm_head"]["kernel"], "dv"


def final_hidden(cfg: DecoderConfig, base: Params, x: jax.Array) -> jax.Array:
    """The last RMSNorm: float32 ``[..., d]``."""
    return _norm(cfg, x, base["norm"])


def output_logits(cfg: DecoderConfig, base: Params, x: jax.Array, dtype) -> jax.Array:
    """Residual ``x [..., d]`` -> float32 next-token logits ``[..., vocab]`` (final norm,
    head in ``dtype``, Gemma 2's soft-cap). Materializes every logit: not for training."""
    h = final_hidden(cfg, base, x).astype(dtype)
    w, axes = head_kernel(cfg, base)
    logits = jnp.einsum(f"...d,{axes}->...v", h, w.astype(dtype),
                        preferred_element_type=jnp.float32)  # fmt: skip
    return soft_cap(logits, cfg.final_softcap)


def attention_allowed(key_ok, causal) -> jax.Array:
    """``[R, T, S]`` bool: key ``s`` visible to query ``t`` when ``key_ok [R, S]`` (or
    ``[R, T, S]``) and ``causal [T, S]``; sliding windows are applied per layer."""
    ok = key_ok if key_ok.ndim == 3 else key_ok[:, None, :]
    return ok & causal[None]


def causal(T: int, S: int | None = None) -> jax.Array:
    """``[T, S]`` bool: key index ``<=`` query index (queries are the last ``T`` of ``S``)."""
    S = T if S is None else S
    return jnp.arange(S)[None, :] <= jnp.arange(S - T, S)[:, None]
