"""Factored algebra: independent members, the Cholesky root and its eigh fallback."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from server_cases import dense_rho_svd, identical_clients, random_clients

from floranna_jax import server
from floranna_jax.server import common, factored

SKEWED = np.array([0.5, 0.0, 2.0, 1.0])  # heaviest client not first, one client weightless


def _members(c, X):
    """float64 ``[c; X_1 - c; ..; X_U - c]`` as ``[M, r, d]``."""
    return np.concatenate([c[None], X - c[None]])


class IndependentMembersTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0, 1)
    def test_full_blocks_equal_all_members(self, seed):
        # Blocks of the heaviest client's offset come from the others' Grams; they must
        # equal the Gram of all U + 1 members, computed in float64 from the factors.
        clients, _ = random_clients(90 + seed, spread=0.1)
        p = common.normalize(jnp.asarray(SKEWED))
        jc = jax.tree.map(jnp.asarray, clients)
        qv = lambda c: [g for g in common.group_layers(c) if g.names == ("q", "v")][0]  # noqa: E731
        basis = self.variant(lambda c, p: factored.build_basis(qv(c), p))(jc, p)
        pn = np.float64(p)
        GB, GA = [], []
        for name in ("q", "v"):
            A, B = np.float64(clients[name]["A"]), np.float64(clients[name]["B"])
            mA = _members(np.einsum("u,urd->rd", pn, A), A)
            mB = _members(np.einsum("u,uor->or", pn, B), B)
            GA.append(np.einsum("mrd,nsd->mnrs", mA, mA))
            GB.append(np.einsum("mor,nos->mnrs", mB, mB))
        for got, want in ((basis.GA, GA), (basis.GB, GB)):
            want = np.stack(want)
            scale = np.abs(want[:, 1:, 1:]).max()  # the offsets' own scale, not the centre's
            # float32 Grams and centres vs float64; member k is a sum of U - 1 Gram blocks.
            np.testing.assert_allclose(got[:, 1:, 1:], want[:, 1:, 1:], atol=1e-5 * scale)
            np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())

    def test_all_members_as_they_are(self):
        k, kept, E = factored.independent_members(jnp.ones(4) / 4, all_members=True)
        self.assertIsNone(k)
        np.testing.assert_array_equal(kept, np.arange(4))
        np.testing.assert_array_equal(E, np.eye(5))

    def test_E_writes_mean_centred_members(self):
        p = common.normalize(jnp.asarray(SKEWED))
        k, kept, E = factored.independent_members(p, all_members=False)
        self.assertEqual(int(k), 2)  # the heaviest client
        np.testing.assert_array_equal(kept, [0, 1, 3])
        # From X_k and the differences X_u - X_k to the mean and the offsets from it.
        X = np.random.default_rng(0).normal(size=(4, 3))
        pn = np.float64(p)
        full = np.concatenate([[pn @ X], X - pn @ X])
        indep = np.concatenate([X[[2]], X[[0, 1, 3]] - X[2]])
        np.testing.assert_allclose(np.float64(E).T @ indep, full, atol=1e-6)  # float32 p


class SqrtFactorTest(chex.TestCase):
    def _grams(self, seed, n=12, rank=None):
        rng = np.random.default_rng(seed)
        X = rng.normal(size=(3, n, rank or n + 5)) * rng.uniform(0.1, 10, size=(3, n, 1))
        return np.einsum("lid,ljd->lij", X, X).astype(np.float32)

    @chex.variants(with_jit=True, without_jit=True)
    def test_positive_definite_takes_cholesky(self):
        G = self._grams(0)
        R = self.variant(factored.sqrt_factor)(jnp.asarray(G))
        np.testing.assert_array_equal(np.tril(R, -1), 0.0)  # triangular: no eigh root
        # float32 factorization, relative to each Gram's largest entry.
        RtR = np.einsum("lki,lkj->lij", np.float64(R), np.float64(R))
        np.testing.assert_allclose(RtR, G, atol=1e-5 * np.abs(G).max())

    @chex.variants(with_jit=True, without_jit=True)
    def test_singular_layer_takes_eigh_others_keep_cholesky(self):
        G = self._grams(1)
        G[1] = self._grams(2, rank=4)[1]  # rank 4 of 12: Cholesky breaks down there
        G[2, 3, :] = G[2, :, 3] = 0.0  # a zero column: padded, still Cholesky
        R = np.asarray(self.variant(factored.sqrt_factor)(jnp.asarray(G)))
        self.assertTrue(np.all(np.isfinite(R)))
        np.testing.assert_array_equal(np.tril(R[[0, 2]], -1), 0.0)
        self.assertGreater(np.abs(np.tril(R[1], -1)).max(), 0.0)  # the eigh root
        np.testing.assert_array_equal(R[2][:, 3], 0.0)
        for g, root in zip(G, R, strict=True):
            RtR = np.float64(root).T @ np.float64(root)
            np.testing.assert_allclose(RtR, g, atol=1e-5 * np.abs(g).max())


class RhoSvdTest(parameterized.TestCase):
    @parameterized.parameters(0, 1)
    def test_near_fedit_clients_match_dense(self, seed):
        # Clients 10% apart (the benchmark's regime) with a weightless client: the tail
        # is ~1e-3 of ||dW||, so centring and the dropped member both have to be right.
        clients, _ = random_clients(95 + seed, spread=0.1)
        m = server.aggregate("fedit", clients, SKEWED).metrics
        # float32 factored vs float64 dense SVD.
        np.testing.assert_allclose(m["rho_svd"], dense_rho_svd(clients, SKEWED), rtol=1e-4)

    def test_identical_clients_zero(self):
        clients, w = identical_clients(3)
        m = server.aggregate("svd", clients, w).metrics
        self.assertLess(m["rho_svd_rel"], 1e-5)  # rank r exactly; float32 rounding only


if __name__ == "__main__":
    absltest.main()
