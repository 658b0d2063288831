"""FLoRA-NA: never worse than FedIT, scopes, solvers, a dense brute-force optimum."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from absl.testing import absltest, parameterized
from server_cases import U, dense_ideal, dense_rho, random_clients

from floranna_jax import server
from floranna_jax.server import common, factored, floranna


def _rho(name, clients, w, **hp):
    return server.aggregate(name, clients, w, **hp).metrics["rho"]


class FlorannaTest(parameterized.TestCase):
    @parameterized.parameters(*[(s, solver) for s in range(3) for solver in ("adam", "als")])
    def test_never_worse_than_fedit_and_better_on_generic(self, seed, solver):
        clients, w = random_clients(20 + seed)
        fedit = _rho("fedit", clients, w)
        agg = server.aggregate("floranna", clients, w, solver=solver)
        rho = agg.metrics["rho"]
        # Best iterate kept from a = b = p (FedIT); slack = float32 rounding only.
        self.assertLessEqual(rho, fedit * (1 + 1e-5))
        self.assertLess(rho, fedit * 0.99)  # generic random clients: a real gain
        self.assertAlmostEqual(dense_rho(clients, w, agg)[0], rho, delta=1e-4 * rho)

    def test_model_scope_not_better_than_layer(self):
        for seed in range(3):
            clients, w = random_clients(30 + seed)
            layer = _rho("floranna", clients, w, scope="layer", solver="als")
            model = _rho("floranna", clients, w, scope="model", solver="als")
            self.assertLessEqual(layer, model * (1 + 1e-5))

    def test_adam_and_als_agree(self):
        for seed in range(2):
            clients, w = random_clients(40 + seed)
            adam = _rho("floranna", clients, w, solver="adam")
            als = _rho("floranna", clients, w, solver="als")
            self.assertLess(abs(adam - als), 0.01 * als)

    def test_matches_dense_brute_force(self):
        # One layer, float64 dense objective, BFGS from the same start (FedIT).
        clients, w = random_clients(50, shapes={"x": (9, 6)})
        ideal = dense_ideal(clients, w)["x"]
        A, B = np.float64(clients["x"]["A"]), np.float64(clients["x"]["B"])
        p = np.asarray(w) / np.sum(w)

        def loss(x):
            a, b = x[:U], x[U:]
            est = np.einsum("u,uor->or", b, B) @ np.einsum("u,urd->rd", a, A)
            return np.sum((ideal - est) ** 2)

        bf = scipy.optimize.minimize(loss, np.concatenate([p, p]), method="BFGS", tol=1e-12)
        m = server.aggregate("floranna", clients, w, solver="als", steps=500).metrics
        # Same basin, both converged: float32 Gram solve vs float64 dense BFGS.
        np.testing.assert_allclose(m["loss_final"], bf.fun, rtol=1e-3)
        np.testing.assert_allclose(m["rho"] ** 2, bf.fun, rtol=1e-3)

    def test_metrics(self):
        clients, w = random_clients(60)
        m = server.aggregate("floranna", clients, w, steps=17).metrics
        fedit = _rho("fedit", clients, w)
        self.assertEqual(m["iterations"], 17)
        self.assertLessEqual(m["loss_final"], m["loss_init"])
        # At a = b = p the objective is FedIT's rho^2 (float32 Gram arithmetic).
        np.testing.assert_allclose(m["loss_init"], fedit**2, rtol=1e-4)
        np.testing.assert_allclose(m["loss_final"], m["rho"] ** 2, rtol=1e-4)
        self.assertEqual(set(m["a"]), set(clients))
        self.assertEqual(m["a"]["q"].shape, (U,))

    def test_steps_zero_is_fedit(self):
        clients, w = random_clients(61)
        agg = server.aggregate("floranna", clients, w, steps=0)
        ref = server.aggregate("fedit", clients, w)
        # Bit-identical factors: the kept iterate is a = b = p, i.e. the weighted mean.
        chex.assert_trees_all_close(agg.lora, ref.lora, rtol=0, atol=0)
        np.testing.assert_allclose(agg.metrics["a"]["q"], w / np.sum(w), rtol=1e-6)  # float32 p

    def test_deltas(self):
        clients, w = random_clients(62)
        prev = {n: {"A": f["A"].mean(0), "B": f["B"].mean(0)} for n, f in clients.items()}
        with self.assertRaisesRegex(ValueError, "deltas.*previous"):
            server.aggregate("floranna", clients, w, combine="deltas")
        m = server.aggregate("floranna", clients, w, combine="deltas", previous=prev).metrics
        fedit = _rho("fedit", clients, w)
        np.testing.assert_allclose(m["loss_init"], fedit**2, rtol=1e-4)  # start = FedIT
        self.assertLess(m["rho"], fedit)

    def test_uniform_target(self):
        clients, w = random_clients(63)
        m = server.aggregate("floranna", clients, w, target="uniform", solver="als").metrics
        self.assertLessEqual(m["loss_final"], m["loss_init"])
        uniform = dense_ideal(clients, np.ones(U))
        start = sum(np.sum((uniform[n] - _fedit_dense(f, w)) ** 2) for n, f in clients.items())
        np.testing.assert_allclose(m["loss_init"], start, rtol=1e-4)  # float32 vs float64

    def test_solve_is_one_scan(self):
        clients, w = random_clients(64)
        args = (jax.tree.map(jnp.asarray, clients), jnp.asarray(w, jnp.float32))
        sizes = []
        for steps in (3, 300):
            jaxpr = jax.make_jaxpr(server.make("floranna", steps=steps).aggregate)(*args)
            sizes.append(len(jaxpr.eqns))
            self.assertIn("scan", str(jaxpr))
        self.assertEqual(sizes[0], sizes[1])  # the program does not grow with steps


def _fedit_dense(f, w):
    p = np.asarray(w) / np.sum(w)
    B, A = np.float64(f["B"]), np.float64(f["A"])
    return np.einsum("u,uor->or", p, B) @ np.einsum("u,urd->rd", p, A)


class GramLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("factors", "weighted"), ("factors", "uniform"),
                              ("deltas", "weighted"))  # fmt: skip
    def test_gram_loss_equals_dense(self, combine, target):
        clients, w = random_clients(70)
        prev = {n: {"A": f["A"][0] * 0.5, "B": f["B"][0] * 0.5} for n, f in clients.items()}
        jc = jax.tree.map(jnp.asarray, clients)
        p = common.normalize(jnp.asarray(w))
        rng = np.random.default_rng(0)
        a, b = rng.normal(size=(2, 3, U)).astype(np.float32)

        def gram_losses(a, b):
            groups = common.group_layers(jc, jax.tree.map(jnp.asarray, prev))
            bases = [factored.build_basis(g, p, use_previous=combine == "deltas") for g in groups]
            prob = floranna.problem(bases, p, target, combine, "layer")
            return floranna.losses(a, b, prob), [n for g in groups for n in g.names]

        got = self.variant(lambda a, b: gram_losses(a, b)[0])(jnp.asarray(a), jnp.asarray(b))
        names = gram_losses(a, b)[1]  # group order: ("o",), then ("q", "v")
        q = w / np.sum(w) if target == "weighted" else np.full(U, 1.0 / U)
        want = []
        for i, n in enumerate(names):
            A, B = np.float64(clients[n]["A"]), np.float64(clients[n]["B"])
            ideal = np.einsum("u,uor,urd->od", q, B, A)
            if combine == "factors":
                Bh, Ah = np.einsum("u,uor->or", b[i], B), np.einsum("u,urd->rd", a[i], A)
            else:
                gA, gB = np.float64(prev[n]["A"]), np.float64(prev[n]["B"])
                Bh = gB + np.einsum("u,uor->or", b[i], B - gB)
                Ah = gA + np.einsum("u,urd->rd", a[i], A - gA)
            want.append(np.sum((ideal - Bh @ Ah) ** 2))
        # float32 Gram arithmetic against float64 dense.
        np.testing.assert_allclose(got, want, rtol=1e-4)


if __name__ == "__main__":
    absltest.main()
