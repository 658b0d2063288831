"""lora.py: B = 0 is the base model, merged kernels equal the adapter forward, scales."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from floranna_jax import lora


class LoraTest(chex.TestCase):
    def _layer(self, d_in=6, d_out=5, r=3, seed=0):
        k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
        kernel = jax.random.normal(k1, (d_in, d_out))
        x = jax.random.normal(k2, (4, 7, d_in))
        return kernel, x, lora.init(k3, d_in, d_out, r)

    @chex.variants(with_jit=True, without_jit=True)
    def test_fresh_adapter_is_base(self):
        kernel, x, ad = self._layer()
        np.testing.assert_array_equal(ad["B"], 0.0)
        y = self.variant(lora.apply)(x, kernel, ad, 2.0)
        # B = 0 exactly: the low-rank branch adds exact zeros.
        chex.assert_trees_all_close(y, x @ kernel, rtol=0, atol=0)
        chex.assert_trees_all_close(lora.apply(x, kernel, None, 2.0), x @ kernel, rtol=0, atol=0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(False, True)
    def test_merged_kernel_equals_adapter_forward(self, rslora):
        kernel, x, ad = self._layer()
        ad = {"A": ad["A"], "B": jax.random.normal(jax.random.key(9), ad["B"].shape)}
        s = lora.scale(16.0, 3, rslora)
        y = self.variant(lora.apply)(x, kernel, ad, s)
        merged = self.variant(lora.merge_adapter)(kernel, ad, s)
        # Same math, different association order: float32 rounding only.
        chex.assert_trees_all_close(x @ merged, y, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(
            lora.merge_into_kernel(kernel, lora.delta(ad, 1.0), s), merged, rtol=1e-6, atol=1e-6
        )

    def test_scale(self):
        self.assertEqual(lora.scale(16, 8), 2.0)
        self.assertAlmostEqual(lora.scale(16, 16, rslora=True), 4.0)
        self.assertAlmostEqual(lora.scale(24, 16, rslora=True), 24 / math.sqrt(16))
        with self.assertRaisesRegex(ValueError, "rank"):
            lora.scale(16, 0)

    def test_init_shapes_and_bound(self):
        ad = lora.init(jax.random.key(1), 64, 32, 4)
        self.assertEqual((ad["A"].shape, ad["B"].shape), ((4, 64), (32, 4)))
        self.assertLessEqual(float(jnp.abs(ad["A"]).max()), 1 / math.sqrt(64))
        shapes = {"q": (8, 6), "v": (8, 6)}
        tree = lora.init_tree(jax.random.key(2), shapes, 2)
        chex.assert_trees_all_equal(tree, lora.init_tree(jax.random.key(2), shapes, 2))
        self.assertFalse(np.allclose(tree["q"]["A"], tree["v"]["A"]))

    def test_merge_shape_checked(self):
        kernel, _, ad = self._layer()
        with self.assertRaisesRegex(ValueError, "does not match"):
            lora.merge_into_kernel(kernel, jnp.zeros((6, 5)))


if __name__ == "__main__":
    absltest.main()
