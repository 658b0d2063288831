"""The frozen base's dtype and how a checkpoint reaches the devices (models/model.py,
models/loading.py): a bfloat16 base computes what the float32 one does within bfloat16
rounding, loading reads exactly the saved tensors in either dtype, and loading holds about
one tensor on the host, never a host copy of the model."""

import tracemalloc

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoder_cases import random_batch, randomize_B, tiny_config, tiny_model
from safetensors.numpy import load_file, save_file

from floranna_jax import models
from floranna_jax.errors import BadValue

BF16 = jnp.bfloat16


F32 = jnp.dtype(jnp.float32)


def _dtypes(tree) -> set:
    return {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree)}


def test_bf16_decoder_base_close_to_f32():
    f32, bf16 = tiny_model(), tiny_model(base_dtype=BF16)
    assert _dtypes(bf16.base) == {jnp.dtype(BF16)} and _dtypes(bf16.trainable) == {F32}
    trainable, batch = randomize_B(f32.trainable, 1), random_batch()

    def loss(model):
        def mean_nll(t):
            nll, tokens = model.apply(model.base, t, batch)
            return jnp.sum(nll) / jnp.sum(tokens)

        return jax.jit(jax.value_and_grad(mean_nll))(trainable)

    (l32, g32), (l16, g16) = loss(f32), loss(bf16)
    assert _dtypes(g16) == {F32}  # adapters train in float32 on a bf16 base
    assert l16 != l32  # the bf16 base really ran
    # bf16 weights are rounded by at most 2^-9 relative; through 2 layers the mean token
    # loss (~6) moves by well under 0.5% and the adapter gradients by a few percent of
    # their largest entry.
    np.testing.assert_allclose(l16, l32, rtol=5e-3)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
        np.testing.assert_allclose(a, b, atol=3e-2 * float(jnp.abs(b).max()))


def test_bf16_encoder_base_close_to_f32():
    config = dict(models.tiny_config("bert"), initializer_range=0.2)
    spec = models.LoraSpec(rank=4, alpha=8.0)
    f32 = models.build_random(config, lora=spec)
    bf16 = models.build_random(config, lora=spec, base_dtype=BF16)
    assert _dtypes(bf16.base) == {jnp.dtype(BF16)} and _dtypes(bf16.trainable) == {F32}
    ids = np.random.default_rng(0).integers(3, 1000, (3, 12)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    out32 = jax.jit(f32.apply)(f32.base, f32.trainable, batch)
    out16 = jax.jit(bf16.apply)(bf16.base, f32.trainable, batch)
    assert out16.dtype == jnp.float32 and not np.array_equal(out16, out32)
    # Logits of order 1 after 2 layers of bf16-rounded weights: within 2e-2.
    np.testing.assert_allclose(out16, out32, atol=2e-2)


def test_resolve_base_dtype():
    assert models.resolve_base_dtype("auto") == jnp.float32  # this test runs on a CPU
    assert models.resolve_base_dtype("bfloat16") == BF16
    with pytest.raises(BadValue, match="float16"):
        models.resolve_base_dtype("float16")


def test_load_gives_the_saved_tensors_in_either_dtype(tmp_path):
    spec = models.LoraSpec(rank=4)
    model = tiny_model(lora=spec)
    models.save_pretrained(model, tmp_path)
    chex.assert_trees_all_equal(models.load_pretrained(tmp_path, lora=spec).base, model.base)
    bf16 = models.load_pretrained(tmp_path, lora=spec, base_dtype=BF16)
    chex.assert_trees_all_equal(bf16.base, jax.tree.map(lambda x: x.astype(BF16), model.base))
    # A bfloat16 checkpoint loads as its exact float32 values.
    file = tmp_path / "model.safetensors"
    save_file({k: v.astype(BF16) for k, v in load_file(file).items()}, file)
    again = models.load_pretrained(tmp_path, lora=spec)
    chex.assert_trees_all_equal(again.base, jax.tree.map(lambda x: x.astype(F32), bf16.base))
    assert _dtypes(again.base) == {F32}


def test_encoder_head_stays_float32_on_a_bf16_base(tmp_path):
    model = models.build_random(models.tiny_config("bert"), num_labels=3)
    models.save_pretrained(model, tmp_path)
    loaded = models.load_pretrained(tmp_path, num_labels=3, base_dtype=BF16)
    assert _dtypes(loaded.base) == {jnp.dtype(BF16)}
    chex.assert_trees_all_equal(loaded.trainable["head"], model.trainable["head"])


def test_loading_holds_about_one_tensor_on_the_host(tmp_path):
    # 6 stacked layers: a stacked MLP leaf is 6 x 1 MiB. A loader that stacks layers on the
    # host (or reads the model whole) peaks at several MiB of numpy; one tensor at a time
    # peaks at the read tensor and its cast copy: below 3 tensors plus 1 MiB of Python.
    config = tiny_config(hidden_size=256, intermediate_size=1024, num_hidden_layers=6)
    spec = models.LoraSpec(rank=4)
    models.save_pretrained(models.build_random(config, lora=spec), tmp_path)
    largest = max(v.nbytes for v in load_file(tmp_path / "model.safetensors").values())
    models.load_pretrained(tmp_path, lora=spec)  # compiles the layer writes
    tracemalloc.start()
    try:
        model = models.load_pretrained(tmp_path, lora=spec)
        jax.block_until_ready(model.base)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = sum(x.nbytes for x in jax.tree.leaves(model.base))
    assert largest == 1 << 20 and total > 20 * largest
    assert peak < 3 * largest + (1 << 20), (peak, largest, total)
