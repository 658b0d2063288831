"""Tests for floranna_jax.models.quant: NF4 levels, int8/NF4 round-trip error bounds, a
quantized decoder against its dequantized reference, training touches only the adapters,
no dense kernel saved for the backward pass, the quantized base's bytes, config checks."""

import contextlib
import io

import chex
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from decoder_cases import random_batch, randomize_B, tiny_config, tiny_model
from smoke_setup import config_file

from floranna_jax import config_check, models
from floranna_jax.errors import BadValue, ConfigError
from floranna_jax.models import decoder, quant
from floranna_jax.models.decoder import modules

# d_in = 128: two NF4 blocks per output channel; the last channel all zeros (scale 0).
_KERNEL = np.random.default_rng(0).normal(0.0, 0.05, (3, 128, 48)).astype(np.float32)
_KERNEL[..., -1] = 0.0
_EPS = 1e-6  # float32 round-off of the scale products, far below the bounds tested


def test_nf4_levels_are_qlora_normal_float():
    levels = quant.NF4_LEVELS
    assert levels.shape == (16,) and np.all(np.diff(levels) > 0)
    assert levels[0] == -1.0 and levels[-1] == 1.0 and 0.0 in levels
    assert (levels < 0).sum() == 7 and (levels > 0).sum() == 8
    # A few values as QLoRA's appendix prints them (4 decimals).
    for value in (-0.6962, -0.0911, 0.0796, 0.7230):
        assert np.min(np.abs(levels - value)) < 1e-4, value


def test_int8_round_trip_within_half_a_step_per_channel():
    leaf = quant.quantize_int8(jnp.asarray(_KERNEL))
    assert leaf["int8"].dtype == jnp.int8 and leaf["scale"].shape == (3, 48)
    err = np.abs(np.asarray(quant.dequantize(leaf)) - _KERNEL)
    bound = np.asarray(leaf["scale"])[:, None, :] / 2
    assert np.all(err <= bound + _EPS)
    assert np.all(err[..., -1] == 0.0)  # a zero channel stays exactly zero
    assert err.max() > 0.1 * bound.max()  # it does round: the bound is not vacuous


def test_nf4_round_trip_within_half_the_largest_gap_per_block():
    leaf = quant.quantize_nf4(jnp.asarray(_KERNEL))
    assert leaf["nf4"].shape == (3, 2, 32, 48) and leaf["nf4"].dtype == jnp.uint8
    assert leaf["absmax"].shape == (3, 2, 48)
    err = np.abs(np.asarray(quant.dequantize(leaf)) - _KERNEL).reshape(3, 2, 64, 48)
    half_gap = np.diff(quant.NF4_LEVELS).max() / 2
    absmax = np.asarray(leaf["absmax"])[:, :, None, :]
    assert np.all(err <= half_gap * absmax + _EPS)
    # Each block's largest weight is a level (+-1) exactly, up to round-off.
    blocks = _KERNEL.reshape(3, 2, 64, 48)
    at_max = np.abs(blocks) == absmax
    assert np.all(err[at_max] <= _EPS)


def _quantized(method: str) -> models.Model:
    """The shared tiny model (:func:`tiny_model`) with its projections quantized."""
    model = tiny_model()
    return model._replace(base=quant.quantize_base(model.base, method))


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantized_forward_equals_dequantized_reference(method):
    model = _quantized(method)
    layers = model.base["layers"]
    assert quant.is_quantized(layers["attn"]["q_proj"]["kernel"])
    assert not quant.is_quantized(model.base["embed_tokens"]["embedding"])
    adapters = randomize_B(model.trainable, seed=1)["lora"]
    ids = random_batch(b=2, L=12)["input_ids"]
    got = decoder.logits(tiny_config(), model.base, adapters, ids, lora_scale=2.0)
    reference = quant.dequantize_base(model.base)
    want = decoder.logits(tiny_config(), reference, adapters, ids, lora_scale=2.0)
    # Same weights, same float32 ops: only the fused order of round-off may differ.
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    plain = decoder.logits(tiny_config(), tiny_model().base, adapters, ids, lora_scale=2.0)
    assert float(jnp.max(jnp.abs(got - plain))) > 1e-4  # the quantized base does differ
    # What export --merged writes (result.merged_base): adapters folded into the
    # dequantized kernels; float32 round-off of W0 + s B A against the unfused sum.
    deltas = {n: a["B"] @ a["A"] for n, a in adapters.items()}
    merged = models.merge_into_base(reference, deltas, 2.0)
    folded = decoder.logits(tiny_config(), merged, {}, ids)
    chex.assert_trees_all_close(folded, got, atol=1e-4, rtol=1e-4)


def _loss(model, batch):
    def loss(trainable):
        nll, tokens = model.apply(model.base, trainable, batch)
        return jnp.sum(nll) / jnp.sum(tokens)

    return loss


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_training_step_updates_only_float32_adapters(method):
    model = _quantized(method)
    base_before = jax.tree.map(np.asarray, model.base)
    trainable = randomize_B(model.trainable, seed=2)
    opt = optax.adam(1e-2)
    state = opt.init(trainable)
    grads = jax.jit(jax.grad(_loss(model, random_batch())))(trainable)
    updates, state = opt.update(grads, state, trainable)
    new = optax.apply_updates(trainable, updates)
    for leaf in jax.tree.leaves((new, state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new, trainable)
    assert all(jax.tree.leaves(changed))  # every A and B moved
    chex.assert_trees_all_equal(model.base, base_before)


def test_clients_vmapped_over_one_quantized_base_equal_a_loop():
    model = _quantized("nf4")
    stacked = [randomize_B(model.trainable, seed=s) for s in (3, 4)]
    batch = random_batch(b=2)
    both = jax.tree.map(lambda *x: jnp.stack(x), *stacked)
    vmapped = jax.vmap(model.apply, in_axes=(None, 0, None))(model.base, both, batch)
    for u, trainable in enumerate(stacked):
        one = model.apply(model.base, trainable, batch)
        # vmap batches the adapter matmuls: float32 round-off only.
        chex.assert_trees_all_close((vmapped[0][u], vmapped[1][u]), one, rtol=1e-5)


def _saved_shapes(model, trainable, batch) -> set[str]:
    """What the backward pass of the loss keeps from the forward, as ``"f32[2,64,32]"``
    (jax's public :func:`print_saved_residuals` prints one residual a line)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(_loss(model, batch), trainable)
    return {line.split()[0] for line in out.getvalue().splitlines() if line.strip()}


def test_backward_keeps_no_dense_copy_of_a_quantized_kernel():
    model = _quantized("int8")
    leaves = jax.tree.leaves(model.base["layers"], is_leaf=quant.is_quantized)
    kernels = [leaf["int8"].shape for leaf in leaves if quant.is_quantized(leaf)]
    dense = {f"f32[{','.join(map(str, s[k:]))}]" for s in kernels for k in (0, 1)}
    saved = _saved_shapes(model, model.trainable, random_batch(b=2, L=8))
    assert not dense & saved, dense & saved
    # The check can fail: a plain float32 base saves its kernels for the backward pass.
    assert dense & _saved_shapes(tiny_model(), tiny_model().trainable, random_batch(b=2, L=8))


def test_quantized_base_bytes():
    """Bytes of the quantized projections against float32 (d_in = 512: scales are small)."""
    cfg = dict(tiny_config(), hidden_size=512, intermediate_size=1024, vocab_size=64)
    shapes = modules.param_shapes(decoder.parse_config(cfg))
    layers = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["layers"])
    dense = quant.tree_bytes({k: v for k, v in layers.items() if k in ("attn", "mlp")})
    for method, low, high in (("int8", 0.25, 0.26), ("nf4", 0.125, 0.1407)):
        q = quant.quantize_base({"layers": layers}, method)["layers"]
        ratio = quant.tree_bytes({k: q[k] for k in ("attn", "mlp")}) / dense
        assert low < ratio <= high, (method, ratio)


def test_bad_quantize_settings_raise():
    with pytest.raises(BadValue, match="int4"):
        quant.quantize_base(tiny_model().base, "int4")
    encoder = models.build_random(models.tiny_config("bert"), lora=models.LoraSpec(rank=2))
    with pytest.raises(BadValue, match="decoder"):
        quant.quantize_base(encoder.base, "int8")
    odd = models.build_random(dict(tiny_config(), intermediate_size=96), lora=models.LoraSpec(2))
    with pytest.raises(BadValue, match="multiple of 64"):
        quant.quantize_base(odd.base, "nf4")


@pytest.mark.parametrize(
    "overrides, words",
    [({"model.quantize": "int4"}, ["model.quantize", "int4"]),
     ({"model.quantize": "nf4", "server.name": "flora"}, ["model.quantize", "flora"])],
)  # fmt: skip
def test_config_check_names_quantize(overrides, words):
    config_check.validate(config_file("gsm8k.py", "smoke", **{"model.quantize": "nf4"}))
    with pytest.raises(ConfigError) as e:
        config_check.validate(config_file("gsm8k.py", "smoke", **overrides))
    assert all(w in str(e.value) for w in words), str(e.value)
