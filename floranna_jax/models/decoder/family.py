"""Any decoder family as one :class:`~floranna_jax.models.architecture.Architecture`.

``make(hf_config, num_labels=..., targets=..., lora_scale=...)`` ties together the
family's record (:mod:`.families`: config, LoRA targets, checkpoint names) and the layer
functions (:mod:`.modules`). Its ``apply(base, trainable, batch)`` is the training output: the
per-example causal-LM sums ``(nll [b], tokens [b])`` float32 over completion tokens,

    nll[j] = sum over tokens t of example j with loss_mask[t] = 1 of -log p(x_t | x_<t),

computed over chunks of the sequence (:func:`token_nll`), so the ``[b, T, vocab]``
float32 logits of a whole batch are never formed. ``trainable["head"]`` is ``{}``.

Batches, right-padded: ``input_ids``, ``attention_mask``, ``loss_mask`` int32 ``[b, L]``
(``loss_mask[t] = 1``: token ``t`` is a completion token, predicted from position
``t - 1``). Or packed by :mod:`floranna_jax.packing`: ``input_ids``, ``loss_mask``,
``segment_ids``, ``positions`` ``[R, T]`` and ``starts`` ``[b]``; a token attends causally
within its own segment (example ``j`` is segment ``j + 1``). Both give the same sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from floranna_jax.models.architecture import Architecture, Params, init_like
from floranna_jax.models.decoder import families, modules
from floranna_jax.models.decoder.checkpoint import canonical_key
from floranna_jax.models.decoder.config import DecoderConfig
from floranna_jax.models.decoder.families import parse_config

# Logits elements per loss chunk ([chunk, vocab] float32: 64 MB); the chunk is the largest
# power of two of positions that fits, taken over the batch's flattened rows, so a step
# runs a few large head matmuls rather than many small ones (SmolLM2: 256 positions).
LOSS_CHUNK_ELEMENTS = 1 << 24


def layer_names(cfg: DecoderConfig, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """``layer_name -> (d_in, d_out)`` for ``targets`` in every layer, sorted by name."""
    unknown = sorted(set(targets) - set(cfg.projections))
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; valid: {list(cfg.projections)}")
    dims = modules.target_dims(cfg)
    shapes = {}
    for i in range(cfg.num_layers):
        for t in targets:
            shapes[f"layers_{i}/{modules.block_of(t)}/{t}"] = dims[t]
    return dict(sorted(shapes.items()))


def chunk_length(rows: int, T: int, vocab: int, budget: int = LOSS_CHUNK_ELEMENTS) -> int:
    """Positions per loss chunk, counted over all ``rows * T`` positions of a batch: a power
    of two with ``chunk * vocab <= budget`` (at least 1), at most ``rows * T``."""
    fits = max(1, budget // max(1, vocab))
    return min(rows * T, 1 << (fits.bit_length() - 1))


def token_nll(h, kernel, labels, active, dtype, chunk: int, softcap: float | None = None,
              axes: str = "dv") -> jax.Array:  # fmt: skip
    """``[R, T]`` float32 ``-log softmax(h @ kernel)[labels]`` where ``active`` is true, 0
    elsewhere, ``chunk`` positions at a time.

    ``h [R, T, d]``, ``kernel`` (frozen: it gets no gradient) ``[d, V]``, or ``[V, d]``
    with ``axes="vd"`` (a tied embedding, read in place), ``labels, active [R, T]``;
    ``softcap``: the logits' soft-cap (Gemma 2), None for none. The active positions (those
    whose loss counts: completion tokens) are gathered to the front, in order, and only
    the chunks holding any are computed, so prompts and padding cost the head nothing. No
    pass holds more than one chunk's ``[chunk, V]`` logits: the gradient of ``h`` is formed
    with them, in the same pass (:func:`_chunked_nll`), so the backward pass never
    recomputes them.
    """
    R, T, d = h.shape
    n = R * T
    k = -(-n // chunk)
    active = active.reshape(n)
    order = jnp.pad(jnp.argsort(~active, stable=True), (0, k * chunk - n))  # active first
    runs = (jnp.sum(active, dtype=jnp.int32) + chunk - 1) // chunk
    hs = h.reshape(n, d)[order].reshape(k, chunk, d)
    ys = labels.reshape(n)[order].reshape(k, chunk)
    nll = _chunked_nll(hs, jax.lax.stop_gradient(kernel), ys, runs, jnp.dtype(dtype), softcap,
                       axes)  # fmt: skip
    nll = jnp.zeros(n, jnp.float32).at[order[:n]].set(nll.reshape(k * chunk)[:n])
    return jnp.where(active, nll, 0.0).reshape(R, T)


def _chunk_logits(h, w, y, dtype, softcap, axes):
    """``(nll [C], logits [C, V] float32 after the soft-cap, logsumexp [C])`` of one chunk;
    ``w``'s axes are named by ``axes`` (:func:`token_nll`)."""
    logits = jnp.einsum(f"cd,{axes}->cv", h.astype(dtype), w, preferred_element_type=jnp.float32)
    logits = modules.soft_cap(logits, softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    return lse - picked, logits, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_nll(h, w, y, runs, dtype, softcap, axes):
    """``[k, C]`` nll of the first ``runs`` chunks of ``h [k, C, d]`` (a loop whose trip
    count is ``runs``), zeros after them; ``w`` as ``axes``."""
    w = w.astype(dtype)

    def one(i, nll):
        return nll.at[i].set(_chunk_logits(h[i], w, y[i], dtype, softcap, axes)[0])

    return jax.lax.fori_loop(0, runs, one, jnp.zeros(y.shape, jnp.float32))


def _chunked_nll_fwd(h, w, y, runs, dtype, softcap, axes):
    """The nll and, from the same logits, ``d nll / d h [k, C, d]``: ``(softmax - onehot)
    @ w.T`` (times the soft-cap's ``1 - (logits / cap)^2``); two head matmuls per token,
    where differentiating a rematerialized chunk takes three."""
    wd = w.astype(dtype)

    def one(i, out):
        nll, dh = out
        c_nll, logits, lse = _chunk_logits(h[i], wd, y[i], dtype, softcap, axes)
        hit = jnp.arange(logits.shape[-1])[None, :] == y[i][:, None]
        g = jnp.exp(logits - lse[:, None]) - hit
        if softcap is not None:
            g = g * (1.0 - jnp.square(logits / softcap))
        c_dh = jnp.einsum(f"cv,{axes}->cd", g.astype(dtype), wd, preferred_element_type=jnp.float32)
        return nll.at[i].set(c_nll), dh.at[i].set(c_dh.astype(h.dtype))

    empty = (jnp.zeros(y.shape, jnp.float32), jnp.zeros_like(h))
    nll, dh = jax.lax.fori_loop(0, runs, one, empty)
    return nll, (dh, w)


def _chunked_nll_bwd(dtype, softcap, axes, residuals, g):
    """``h`` gets ``g * dh``; ``w`` zeros (frozen, behind stop_gradient); ``y``, ``runs``
    none."""
    del dtype, softcap, axes
    dh, w = residuals
    return g[..., None] * dh, jnp.zeros_like(w), None, None


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def _shift(x: jax.Array) -> jax.Array:
    """``x[:, t + 1]`` at ``t`` (0 at the end): what position ``t`` predicts."""
    return jnp.pad(x[:, 1:], ((0, 0), (0, 1)))


def prepare(cfg: DecoderConfig, batch: dict):
    """``(ids, positions, allowed, labels, weights, sum_fn)`` of a padded or packed batch.

    ``weights [R, T]`` float32 is 1 where position ``t`` predicts a completion token of
    the same example; ``sum_fn`` turns ``[R, T]`` per-token values into ``[b]`` sums.
    """
    if "loss_mask" not in batch:
        raise ValueError("a decoder batch needs loss_mask [b, L] (1 on completion tokens)")
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    loss_mask = jnp.asarray(batch["loss_mask"], jnp.int32)
    T = ids.shape[1]
    if "segment_ids" in batch:
        seg = jnp.asarray(batch["segment_ids"], jnp.int32)
        positions = jnp.asarray(batch["positions"], jnp.int32)
        same = seg[:, :, None] == seg[:, None, :]
        allowed = modules.attention_allowed(same, modules.causal(T))
        weights = _shift(loss_mask) * (_shift(seg) == seg) * (seg > 0)
        b = batch["starts"].shape[0]

        def sum_fn(x):  # segment j + 1 holds example j; segment 0 is padding
            return jnp.zeros(b + 1, jnp.float32).at[seg.reshape(-1)].add(x.reshape(-1))[1:]

    else:
        mask = batch.get("attention_mask")
        mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask, jnp.int32)
        positions = padded_positions(mask)
        allowed = modules.attention_allowed(mask > 0, modules.causal(T))
        weights = _shift(loss_mask) * _shift(mask)

        def sum_fn(x):
            return jnp.sum(x, axis=1)

    return ids, positions, allowed, _shift(ids), weights.astype(jnp.float32), sum_fn


def padded_positions(mask: jax.Array) -> jax.Array:
    """``[b, L]`` positions of padded rows: the count of real tokens before each token, so
    right and left padding both number a row's real tokens ``0, 1, ...``."""
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


def hidden_states(cfg, base, adapters, ids, positions, allowed, *, dtype, scale, dropout=None,
                  key=None, remat=False) -> jax.Array:  # fmt: skip
    """The last layer's float32 residual ``[R, T, d]`` (before the final norm);
    ``adapters`` per layer_name."""
    ctx = modules.context(cfg, positions, positions, allowed, dtype, scale, dropout)
    stacked = modules.stack_adapters(cfg, adapters)
    x = modules.embed(cfg, base, ids)
    return modules.run_layers(cfg, ctx, base["layers"], stacked, x, key=key, remat=remat)[0]


def _init_base(cfg: DecoderConfig, shapes: Params, key: jax.Array) -> Params:
    """Hugging Face's random init: norms start at an effective weight of 1, which Gemma
    stores as 0 (its norms multiply by ``1 + weight``)."""
    base = init_like(shapes, key, std=cfg.initializer_range)
    if not cfg.norm_offset:
        return base
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x - cfg.norm_offset if path[-1].key == "scale" else x, base
    )


def make(
    hf_config: dict,
    *,
    num_labels: int = 0,
    targets: tuple[str, ...],
    lora_scale: float,
    lora_dropout: float = 0.0,
    compute_dtype=jnp.float32,
    remat: bool = False,
    loss_chunk_elements: int = LOSS_CHUNK_ELEMENTS,
) -> Architecture:
    """The :class:`Architecture` of a decoder config (``num_labels`` is unused: the
    vocabulary is the output). ``remat``: recompute each layer in the backward pass;
    ``loss_chunk_elements``: the logits elements one loss chunk may hold."""
    del num_labels
    cfg = parse_config(hf_config)
    family = families.get(cfg.model_type)
    dtype = jnp.dtype(compute_dtype)
    shapes = modules.param_shapes(cfg)

    def apply(base, trainable, batch, *, deterministic=True, dropout_key=None):
        if not deterministic and dropout_key is None:
            raise ValueError("deterministic=False needs a dropout_key")
        dropout = None if deterministic else (lora_dropout, cfg.attention_dropout)
        ids, positions, allowed, labels, weights, sum_fn = prepare(cfg, batch)
        x = hidden_states(
            cfg, base, trainable["lora"], ids, positions, allowed,
            dtype=dtype, scale=lora_scale, dropout=dropout, key=dropout_key, remat=remat,
        )  # fmt: skip
        h = modules.final_hidden(cfg, base, x)
        chunk = chunk_length(ids.shape[0], ids.shape[1], cfg.vocab_size, loss_chunk_elements)
        w, axes = modules.head_kernel(cfg, base)
        nll = token_nll(h, w, labels, weights != 0, dtype, chunk, cfg.final_softcap, axes)
        return sum_fn(nll * weights), sum_fn(weights)

    return Architecture(
        base_shapes=shapes,
        head_shapes={},
        init_base=functools.partial(_init_base, cfg, shapes),
        init_head=lambda key: {},
        apply=apply,
        lora_shapes=layer_names(cfg, tuple(targets)),
        checkpoint_name=family.checkpoint_name,
        canonical_key=functools.partial(canonical_key, cfg.tie_embeddings),
        checkpoint_prefix="",
        stacked=("layers",),
        name=cfg.model_type,
    )


def logits(hf_config: dict, base: Params, adapters: dict, input_ids, attention_mask=None, *,
           lora_scale: float = 1.0, compute_dtype=jnp.float32) -> jax.Array:  # fmt: skip
    """``[b, L, vocab]`` float32 next-token logits of padded rows (left or right padding;
    positions count real tokens). Materializes the full logits: for tests and small inputs."""
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    run = _logits_fn(parse_config(hf_config), float(lora_scale), jnp.dtype(compute_dtype).name)
    return run(base, adapters or {}, ids, mask)


@functools.lru_cache(maxsize=16)
def _logits_fn(cfg: DecoderConfig, lora_scale: float, dtype: str):
    dtype = jnp.dtype(dtype)

    @jax.jit
    def run(base, adapters, ids, mask):
        positions = padded_positions(mask)
        allowed = modules.attention_allowed(mask > 0, modules.causal(ids.shape[1]))
        x = hidden_states(cfg, base, adapters, ids, positions, allowed, dtype=dtype,
                          scale=lora_scale)  # fmt: skip
        return modules.output_logits(cfg, base, x, dtype)

    return run
