"""SVD estimator: equals a dense truncated SVD, reaches rho_svd, handles degenerate input."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from server_cases import (
    SHAPES,
    R,
    dense_estimate,
    dense_rho_svd,
    random_clients,
    shared_A,
    truncated_svd,
)

from floranna_jax import server
from floranna_jax.server import svd as svd_module


class SvdTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0, 1, 2)
    def test_equals_dense_truncated_svd(self, seed):
        clients, w = random_clients(80 + seed)
        est = server.make("svd")
        lora, merge, m = self.variant(est.aggregate)(jax.tree.map(jnp.asarray, clients),
                                                     jnp.asarray(w, jnp.float32))  # fmt: skip
        self.assertEqual(merge, {})
        got = {n: np.float64(f["B"]) @ np.float64(f["A"]) for n, f in lora.items()}
        want = truncated_svd(clients, w)
        scale = max(np.abs(v).max() for v in want.values())
        # float32 factored computation vs float64 dense numpy SVD, relative to ||dW||_max.
        chex.assert_trees_all_close(got, want, atol=1e-4 * scale, rtol=0)
        np.testing.assert_allclose(m["rho"], m["rho_svd"], rtol=1e-4)
        np.testing.assert_allclose(m["rho_svd"], dense_rho_svd(clients, w), rtol=1e-4)
        for n, (do, di) in SHAPES.items():
            self.assertEqual((lora[n]["B"].shape, lora[n]["A"].shape), ((do, R), (R, di)))

    def test_balanced_split(self):
        # B = U S^1/2 and A = S^1/2 V^T: B^T B = A A^T = S_r (diagonal).
        clients, w = random_clients(83)
        lora = server.aggregate("svd", clients, w).lora
        for f in lora.values():
            BtB, AAt = np.float64(f["B"]).T @ f["B"], np.float64(f["A"]) @ f["A"].T
            np.testing.assert_allclose(BtB, AAt, atol=1e-4 * np.abs(BtB).max())
            np.testing.assert_allclose(BtB, np.diag(np.diag(BtB)), atol=1e-4 * np.abs(BtB).max())

    def test_low_rank_ideal_is_exact(self):
        # Shared A: dW_ideal has rank r, so the SVD reproduces it.
        clients, w = shared_A(random_clients(84))
        agg = server.aggregate("svd", clients, w)
        self.assertLess(agg.metrics["rho_rel"], 1e-5)

    @parameterized.parameters("svd", "fedit", "floranna", "fedex", "flora")
    def test_zero_B_round_zero(self, name):
        # Round 0: every client's B is still zero, dW_ideal = 0; nothing may turn NaN.
        clients, w = random_clients(85)
        for f in clients.values():
            f["B"] = np.zeros_like(f["B"])
        agg = server.aggregate(name, clients, w, **({"steps": 5} if name == "floranna" else {}))
        for k in ("rho", "rho_rel", "rho_svd"):
            self.assertEqual(agg.metrics[k], 0.0)
        for est in dense_estimate(agg).values():
            np.testing.assert_array_equal(est, 0.0)

    def test_canonical_signs_undo_any_joint_flip(self):
        rng = np.random.default_rng(0)
        B = jnp.asarray(rng.standard_normal((2, 12, 4)), jnp.float32)
        A = jnp.asarray(rng.standard_normal((2, 4, 9)), jnp.float32)
        flip = jnp.asarray([[1.0, -1.0, -1.0, 1.0], [-1.0, 1.0, -1.0, -1.0]])  # [L, r]
        ref = svd_module.canonical_signs(B, A)
        got = svd_module.canonical_signs(B * flip[:, None, :], A * flip[:, :, None])
        for x, y in zip(ref, got, strict=True):
            np.testing.assert_array_equal(x, y)
        top = jnp.take_along_axis(ref[0], jnp.argmax(jnp.abs(ref[0]), axis=1)[:, None], axis=1)
        self.assertTrue(bool(jnp.all(top > 0)))
        np.testing.assert_allclose(ref[0] @ ref[1], B @ A, rtol=1e-6, atol=1e-6)


if __name__ == "__main__":
    absltest.main()
