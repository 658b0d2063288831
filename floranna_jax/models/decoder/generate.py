"""Batched decoding with a key/value cache: greedy, or sampling at a temperature (top-p).

    tokens = decoder.generate(model, base, adapters, prompt_ids, prompt_mask,
                              max_new_tokens=64, eos_ids=(2,),
                              stop_ids=[encode("Question:")])        # [b, 64] int32

Prompts are LEFT-padded (``prompt_mask [b, P]`` 0 on the padding), so every row's next
token goes to the same cache slot. One program per ``(b, P, max_new_tokens)`` (and per
greedy/sampling): the prompt fills each layer's cache ``[b, KV, hd, P + max_new_tokens]`` in
one pass, then a ``while_loop`` adds one token per step until every row has emitted one of
``eos_ids`` (or ended with one of the token sequences ``stop_ids``) or ``max_new_tokens``
are out. A finished row emits ``pad_id`` from then on. Stop sequences are matched on the
device against a window of each row's last tokens (``[b, M]``, ``M`` the longest sequence),
so a stop costs no host round trip; the caller still cuts the decoded text at its stop
strings, since a tokenizer may spell a string with other tokens than the sequences given.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from floranna_jax.models.decoder import modules
from floranna_jax.models.decoder.config import DecoderConfig
from floranna_jax.models.decoder.families import parse_config
from floranna_jax.models.decoder.family import padded_positions


def generate(model, base, adapters, prompt_ids, prompt_mask, *, max_new_tokens: int,
             eos_ids=None, stop_ids=(), temperature: float = 0.0, top_p: float = 1.0,
             key: jax.Array | None = None,
             pad_id: int | None = None, lora_scale: float | None = None,
             compute_dtype=jnp.float32) -> jax.Array:  # fmt: skip
    """``[b, max_new_tokens]`` int32 new tokens after left-padded prompts ``[b, P]``.

    Args:
      model: a :class:`floranna_jax.models.Model` (its ``config`` and ``lora_scale``) or
        a Hugging Face config dict (then ``lora_scale`` defaults to 1).
      base, adapters: the frozen weights and the per-layer adapters (``{}``: none).
      eos_ids: the ids that end a row (default: the config's ``eos_token_id``).
      stop_ids: token sequences that end a row once it has emitted one (they stay in
        the output); ``()``: none.
      temperature: 0 decodes greedily; above 0 samples ``softmax(logits / temperature)``
        with ``key`` (step ``t`` uses ``fold_in(key, t)``).
      top_p: when sampling, only from the most likely tokens whose probabilities sum to
        ``top_p`` (nucleus sampling; 1 keeps every token).
      pad_id: what a finished row emits (default: the config's pad id, else the first eos).
    """
    hf_config = model if isinstance(model, dict) else model.config
    if lora_scale is None:
        lora_scale = 1.0 if isinstance(model, dict) else model.lora_scale
    cfg = parse_config(hf_config)
    eos = cfg.eos_token_ids if eos_ids is None else tuple(int(e) for e in eos_ids)
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos or (0,))[0]
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    greedy = float(temperature) == 0.0
    if not greedy and key is None:
        raise ValueError("sampling (temperature > 0) needs a key")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    ids = jnp.asarray(prompt_ids, jnp.int32)
    mask = jnp.asarray(prompt_mask, jnp.int32)
    if ids.shape[1] + int(max_new_tokens) > cfg.max_positions:
        need = f"{ids.shape[1]} + {max_new_tokens} > {cfg.max_positions}"
        raise ValueError(f"prompt plus new tokens exceed the model's positions: {need}")
    unrolled = all(jnp.dtype(w.dtype) == jnp.float32 for w in jax.tree.leaves(base["layers"]))
    run = _decoder(cfg, float(lora_scale), jnp.dtype(compute_dtype).name, int(max_new_tokens),
                   greedy, unrolled)  # fmt: skip
    key = jax.random.key(0) if key is None else key
    return run(base, adapters or {}, ids, mask, jnp.asarray(eos, jnp.int32).reshape(-1),
               stop_table(stop_ids), jnp.int32(pad_id),
               jnp.float32(max(float(temperature), 1e-6)), jnp.float32(top_p), key)  # fmt: skip


def stop_table(stop_ids) -> jax.Array:
    """``[n, M]`` int32: the stop sequences right-aligned, ``-1`` before the shorter ones
    (``M``: the longest; ``[0, 1]`` for none). Raises ``ValueError`` for an empty sequence."""
    seqs = [[int(i) for i in s] for s in stop_ids]
    if any(not s for s in seqs):
        raise ValueError("stop_ids: every stop sequence needs at least one token")
    width = max([1, *map(len, seqs)])
    return jnp.asarray([[-1] * (width - len(s)) + s for s in seqs], jnp.int32).reshape(-1, width)


def _stopped(window: jax.Array, stops: jax.Array) -> jax.Array:
    """``[b]`` bool: the row's last tokens ``window [b, M]`` end with a sequence of
    ``stops [n, M]`` (``-1``: any token)."""
    same = (window[:, None, :] == stops[None]) | (stops[None] < 0)
    return jnp.any(jnp.all(same, axis=-1), axis=-1)


def _pick(logits, greedy, temperature, top_p, key):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = _nucleus(logits / temperature, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _nucleus(logits, top_p):
    """``logits [b, V]`` with every token outside the nucleus at ``-inf``: the nucleus is
    the most likely tokens up to the first whose cumulative probability reaches ``top_p``.
    ``top_p >= 1`` returns ``logits`` unchanged."""
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((top_p >= 1.0) | (logits >= cutoff), logits, -jnp.inf)


@functools.lru_cache(maxsize=32)
def _decoder(cfg: DecoderConfig, lora_scale: float, dtype: str, max_new: int, greedy: bool,
             unrolled: bool):  # fmt: skip
    """The jitted decoding program. ``unrolled``: the token loop runs the layers one after
    another, each sliced from the stack once per call, instead of a scan over the stack.
    On a CPU with a float32 base that is faster (a scan's slice copies every weight matrix
    at every token; docs/decoder_benchmark.md, change 9). Any other base (bfloat16 or
    quantized: accelerators, and saving memory) keeps the scan: unrolled, XLA:CPU holds a
    float32 copy of every bfloat16 layer through the loop, so a plan made on a CPU read a
    LLaMA-2-70B's generation on 8 devices 34 GB a device too high (README: GPUs and
    pods), and on an accelerator the unrolled loop was never measured."""
    dtype = jnp.dtype(dtype)

    def head(base, x):  # [b, d] residual -> [b, V] float32 logits
        return modules.output_logits(cfg, base, x, dtype)

    def prefill(base, stacked, ids, mask):
        b, P = ids.shape
        positions = padded_positions(mask)
        allowed = modules.attention_allowed(mask > 0, modules.causal(P))
        ctx = modules.context(cfg, positions, positions, allowed, dtype, lora_scale)
        x, (k, v) = modules.run_layers(cfg, ctx, base["layers"], stacked,
                                       modules.embed(cfg, base, ids), collect_kv=True)  # fmt: skip
        empty = ((0, 0), (0, 0), (0, 0), (0, max_new))
        if not unrolled:  # one [N, b, KV, hd, S] stack each of keys and values, for the scan
            stacks = tuple(jax.vmap(modules.cache_layout)(c) for c in (k, v))
            return head(base, x[:, -1]), tuple(jnp.pad(c, ((0, 0), *empty)) for c in stacks)
        caches = [tuple(jnp.pad(modules.cache_layout(c[i]), empty) for c in (k, v))
                  for i in range(cfg.num_layers)]  # fmt: skip
        return head(base, x[:, -1]), caches

    def step(base, layers, token, t, caches, key_mask, key_positions, P):
        """Feed ``token [b]`` at slot ``P + t``; next-token logits ``[b, V]`` and the caches."""
        slot = P + t
        key_mask = jax.lax.dynamic_update_slice(key_mask, jnp.ones_like(key_mask[:, :1]),
                                                (0, slot))  # fmt: skip
        position = key_positions[:, slot][:, None]  # [b, 1]
        allowed = modules.attention_allowed(key_mask > 0, jnp.ones((1, key_mask.shape[1]), bool))
        ctx = modules.context(cfg, position, key_positions, allowed, dtype, lora_scale)
        x = modules.embed(cfg, base, token[:, None])
        windows, local = modules.layer_plan(cfg)
        if not unrolled:

            def one(x, xs):
                p, a, k, v, window, is_local = xs
                here = modules.layer_view(cfg, ctx, window, is_local)
                return modules.block(cfg, here, x, p, a, None, (k, v, slot))

            x, caches = jax.lax.scan(one, x, (*layers, *caches, windows, local))
            return head(base, x[:, 0]), caches, key_mask
        caches = list(caches)
        for i, (p, a) in enumerate(layers):  # unrolled: no layer's weights are sliced per token
            here = modules.layer_view(cfg, ctx, windows[i], local[i])
            x, caches[i] = modules.block(cfg, here, x, p, a, None, (*caches[i], slot))
        return head(base, x[:, 0]), caches, key_mask

    @jax.jit
    def run(base, adapters, ids, mask, eos, stops, pad, temperature, top_p, key):
        b, P = ids.shape
        stacked = modules.stack_adapters(cfg, adapters)
        logits, cache = prefill(base, stacked, ids, mask)
        # Unrolled, each layer's weights and adapters are sliced once per call, outside the
        # token loop (see ``unrolled`` above).
        layers = (base["layers"], stacked)
        if unrolled:
            layers = [jax.tree.map(lambda w, i=i: w[i], layers) for i in range(cfg.num_layers)]
        key_mask = jnp.pad(mask, ((0, 0), (0, max_new)))
        n_real = jnp.sum(mask, axis=1)
        key_positions = jnp.concatenate(
            [padded_positions(mask), n_real[:, None] + jnp.arange(max_new)[None]], axis=1
        )
        token = _pick(logits, greedy, temperature, top_p, jax.random.fold_in(key, 0))
        out = jnp.full((b, max_new), pad, jnp.int32)
        done = jnp.zeros((b,), bool)
        window = jnp.full((b, stops.shape[1]), -1, jnp.int32)  # the last M tokens of a row

        def cond(state):
            t, _, done, *_ = state
            return (t < max_new) & ~jnp.all(done)

        def body(state):
            t, token, done, out, cache, key_mask, window = state
            out = out.at[:, t].set(jnp.where(done, pad, token))
            window = jnp.concatenate([window[:, 1:], token[:, None]], axis=1)
            done = done | jnp.any(token[:, None] == eos[None, :], axis=1) | _stopped(window, stops)
            logits, cache, key_mask = step(base, layers, token, t, cache, key_mask,
                                           key_positions, P)  # fmt: skip
            token = _pick(logits, greedy, temperature, top_p, jax.random.fold_in(key, t + 1))
            return t + 1, token, done, out, cache, key_mask, window

        state = (jnp.int32(0), token, done, out, cache, key_mask, window)
        return jax.lax.while_loop(cond, body, state)[3]

    return run
