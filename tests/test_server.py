"""The shared server API: ESTIMATORS, aggregate(), validation, bytes, exactness, rho."""

from __future__ import annotations

import re
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from server_cases import (
    SHAPES,
    R,
    U,
    dense_rho,
    dense_rho_svd,
    identical_clients,
    random_clients,
    shared_A,
)

from floranna_jax import server

NAMES = ("fedit", "ffa", "fedsa", "flora", "fedex", "svd", "floranna")
RANK_R = ("fedit", "ffa", "fedsa", "svd", "floranna")  # no merge: rank-r global adapter
FAST = {}  # default hparams everywhere: one compiled program per method for the whole suite


class EstimatorTest(parameterized.TestCase):
    def test_registry_names(self):
        self.assertEqual(set(server.ESTIMATORS), set(NAMES))

    @parameterized.parameters(*NAMES)
    def test_identical_clients_exact(self, name):
        clients, w = identical_clients(0)
        agg = server.aggregate(name, clients, w, **FAST.get(name, {}))
        # Every method is exact here; float32 rounding of p and of the factors is ~1e-7.
        self.assertLess(agg.metrics["rho_rel"], 1e-5)
        self.assertLess(dense_rho(clients, w, agg)[1], 1e-5)

    @parameterized.parameters(*NAMES)
    def test_rho_matches_dense(self, name):
        clients, w = random_clients(1)
        agg = server.aggregate(name, clients, w, **FAST.get(name, {}))
        rho, rel = dense_rho(clients, w, agg)
        # float32 Gram/factor arithmetic against a float64 dense reference.
        np.testing.assert_allclose(agg.metrics["rho"], rho, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(agg.metrics["rho_rel"], rel, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(agg.metrics["rho_svd"], dense_rho_svd(clients, w), rtol=1e-4)
        per = agg.metrics["rho_per_layer"]
        self.assertEqual(set(per), set(SHAPES))
        np.testing.assert_allclose(np.sqrt(sum(v**2 for v in per.values())), agg.metrics["rho"],
                                   rtol=1e-5)  # fmt: skip

    @parameterized.parameters(*[(n, s) for n in RANK_R for s in range(3)])
    def test_rho_svd_is_lower_bound(self, name, seed):
        clients, w = random_clients(10 + seed)
        m = server.aggregate(name, clients, w, **FAST.get(name, {})).metrics
        # Eckart-Young; the slack covers float32 rounding of two separate computations.
        self.assertLessEqual(m["rho_svd"], m["rho"] * (1 + 1e-5) + 1e-6)

    def test_ffa_shared_A_exact(self):
        clients, w = shared_A(random_clients(2))
        agg = server.aggregate("ffa", clients, w)
        self.assertLess(agg.metrics["rho_rel"], 1e-6)
        self.assertLess(dense_rho(clients, w, agg)[1], 1e-6)
        for n, f in clients.items():  # the frozen A comes back unchanged (up to rounding)
            np.testing.assert_allclose(agg.lora[n]["A"], f["A"][0], rtol=1e-6, atol=1e-6)

    @parameterized.parameters("flora", "fedex")
    def test_merging_methods_exact(self, name):
        clients, w = random_clients(3)
        agg = server.aggregate(name, clients, w)
        self.assertLess(agg.metrics["rho_rel"], 1e-6)
        self.assertLess(dense_rho(clients, w, agg)[1], 1e-6)
        self.assertEqual(set(agg.merge), set(SHAPES))
        for n, (do, di) in SHAPES.items():
            self.assertEqual(agg.merge[n].shape, (do, di))

    def test_flora_restarts_adapter(self):
        clients, w = random_clients(4)
        a1 = server.aggregate("flora", clients, w)
        a2 = server.aggregate("flora", clients, w, key=1)
        for n, (do, di) in SHAPES.items():
            np.testing.assert_array_equal(a1.lora[n]["B"], np.zeros((do, R)))
            self.assertEqual(a1.lora[n]["A"].shape, (R, di))
            self.assertFalse(np.allclose(a1.lora[n]["A"], a2.lora[n]["A"]))

    def test_fedsa_global_model_is_average(self):
        clients, w = random_clients(5)
        p = w / w.sum()
        agg = server.aggregate("fedsa", clients, w)
        for n, f in clients.items():
            np.testing.assert_allclose(agg.lora[n]["A"], np.einsum("u,urd->rd", p, f["A"]),
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
            np.testing.assert_allclose(agg.lora[n]["B"], np.einsum("u,uor->or", p, f["B"]),
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
        self.assertEqual(agg.merge, {})

    @parameterized.parameters(*NAMES)
    def test_bytes_match_method_table(self, name):
        clients, w = random_clients(6)
        m = server.aggregate(name, clients, w, **FAST.get(name, {})).metrics
        per = {n: (R * (di + do), R * do, R * di, do * di) for n, (do, di) in SHAPES.items()}
        both, ffa_, fedsa_, dense = (4 * sum(v[i] for v in per.values()) for i in range(4))
        want = {"fedit": (both, both), "svd": (both, both), "floranna": (both, both),
                "ffa": (ffa_, ffa_), "fedsa": (fedsa_, fedsa_), "flora": (both, U * both),
                "fedex": (both, both + dense)}[name]  # fmt: skip
        self.assertEqual((m["bytes_up"], m["bytes_down"]), want)


class PureFunctionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("fedit", "flora", "svd", "floranna")
    def test_pure_aggregate_matches_entry(self, name):
        clients, w = random_clients(7)
        est = server.make(name, **FAST.get(name, {}))
        jc = jax.tree.map(jnp.asarray, clients)
        lora, merge, metrics = self.variant(est.aggregate)(jc, jnp.asarray(w, jnp.float32))
        agg = server.aggregate(name, clients, w, **FAST.get(name, {}))
        # jit and eager differ only in float32 op fusion order. Products, not factors: the
        # SVD's singular vectors are defined up to sign. FLoRA-NA's Adam path is flat near its
        # optimum, so that rounding can make "keep the best iterate" pick a different step of
        # near-equal loss: its factors then agree to ~1e-3 while rho agrees to 1e-4.
        tol = 2e-3 if name == "floranna" else 1e-5
        prod = lambda t: {n: f["B"] @ f["A"] for n, f in t.items()}  # noqa: E731
        chex.assert_trees_all_close(prod(lora), prod(agg.lora), rtol=1e-4, atol=tol)
        chex.assert_trees_all_close(merge, agg.merge, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(metrics["rho"], agg.metrics["rho"], rtol=1e-4, atol=1e-6)

    def test_no_retrace(self):
        clients, w = random_clients(8)
        est = server.make("fedit")
        fn = jax.jit(chex.assert_max_traces(est.aggregate, n=1))
        for s in range(3):
            c, w = random_clients(8 + s)
            fn(jax.tree.map(jnp.asarray, c), jnp.asarray(w, jnp.float32))

    def test_public_aggregate_compiles_once_per_hparams_and_shapes(self):
        traces = []

        def make_counted(tag: int = 0) -> server.Method:  # fedit, counting its traces
            method = server.make("fedit")

            def aggregate(*args):
                traces.append(tag)
                return method.aggregate(*args)

            return method._replace(aggregate=aggregate)

        with mock.patch.dict(server.ESTIMATORS, counted=make_counted):
            for s in range(3):  # new values, same shapes and hparams: one trace
                server.aggregate("counted", *random_clients(20 + s))
            self.assertEqual(traces, [0])
            server.aggregate("counted", *random_clients(23, U=U + 1))  # new shapes
            server.aggregate("counted", *random_clients(24), tag=1)  # new hparams
            server.aggregate("counted", *random_clients(25), tag=1)
            self.assertEqual(traces, [0, 0, 1])


def _dense_shapes_in(text: str) -> list[str]:
    pats = []
    for do, di in SHAPES.values():
        pats += [rf"(?<![0-9]){do}x{di}x", rf"(?<![0-9]){di}x{do}x",
                 rf"\[(?:[0-9]+,)*{do},{di}\]", rf"\[(?:[0-9]+,)*{di},{do}\]"]  # fmt: skip
    return [m.group(0) for p in pats for m in re.finditer(p, text)]


class NoDenseTest(parameterized.TestCase):
    """The factored methods never hold a [d_out, d_in] array, in StableHLO or compiled HLO."""

    def _texts(self, name, compiled=False, **hp):
        clients, w = random_clients(9)
        args = (jax.tree.map(jnp.asarray, clients), jnp.asarray(w, jnp.float32))
        lowered = jax.jit(server.make(name, **hp).aggregate).lower(*args)
        return [lowered.as_text()] + ([lowered.compile().as_text()] if compiled else [])

    @parameterized.parameters(("svd", True, {}), ("floranna", True, {}),
                              ("floranna", False, {"solver": "als", "scope": "model"}),
                              ("fedit", False, {}))  # fmt: skip
    def test_no_dense_matrix(self, name, compiled, hp):
        for text in self._texts(name, compiled, **hp):
            self.assertEqual(_dense_shapes_in(text), [])

    def test_check_sees_dense(self):  # the check can fail: fedex forms dW densely
        self.assertNotEqual(_dense_shapes_in(self._texts("fedex")[0]), [])


class OneDecompositionTest(parameterized.TestCase):
    """jaxlib's CPU eigh/svd wait on XLA's thread pool: two of them side by side hung a
    2-core run forever. Every layer group (SHAPES has two) must share one call of each."""

    @parameterized.parameters("fedit", "ffa", "fedsa", "flora", "fedex", "svd", "floranna")
    def test_one_eigh_and_one_svd_for_all_groups(self, name):
        clients, w = random_clients(9)
        args = (jax.tree.map(jnp.asarray, clients), jnp.asarray(w, jnp.float32))
        text = jax.jit(server.make(name).aggregate).lower(*args).compile().as_text()
        self.assertEqual(len(re.findall("syevd", text)), 1)
        self.assertEqual(len(re.findall("gesdd", text)), 1)


class ValidationTest(parameterized.TestCase):
    def _ok(self):
        return random_clients(11)

    def test_unknown_method(self):
        c, w = self._ok()
        with self.assertRaisesRegex(ValueError, "valid: .*fedit.*floranna"):
            server.aggregate("fedavg", c, w)

    def test_unknown_hparam(self):
        c, w = self._ok()
        with self.assertRaisesRegex(ValueError, "learnin_rate.*valid: .*learning_rate"):
            server.aggregate("floranna", c, w, learnin_rate=0.1)
        with self.assertRaisesRegex(ValueError, "steps.*valid: \\[\\]"):
            server.aggregate("fedit", c, w, steps=3)

    @parameterized.parameters(("scope", "net"), ("target", "x"), ("combine", "sum"),
                              ("solver", "sgd"))  # fmt: skip
    def test_bad_choice(self, param, value):
        c, w = self._ok()
        with self.assertRaisesRegex(ValueError, f"{param}=.*choose one of"):
            server.aggregate("floranna", c, w, **{param: value})

    def test_bad_weights(self):
        c, _ = self._ok()
        for w, msg in (([1.0, -1, 1, 1], "non-negative"), ([0.0] * U, "all zero"),
                       ([1.0] * (U + 1), "shape"), ([1, np.nan, 1, 1], "NaN")):  # fmt: skip
            with self.assertRaisesRegex(ValueError, msg):
                server.aggregate("fedit", c, w)

    @parameterized.parameters(("A", np.nan), ("B", np.inf))
    def test_non_finite_named(self, factor, value):
        c, w = self._ok()
        c["v"][factor][1, 0, 0] = value
        with self.assertRaisesRegex(ValueError, f"layer 'v': factor {factor} contains NaN"):
            server.aggregate("floranna", c, w)

    def test_non_finite_previous_named(self):
        c, w = self._ok()
        prev = {n: {"A": f["A"][0].copy(), "B": f["B"][0].copy()} for n, f in c.items()}
        prev["q"]["B"][0, 0] = np.nan
        with self.assertRaisesRegex(ValueError, "previous layer 'q': factor B contains NaN"):
            server.aggregate("floranna", c, w, combine="deltas", previous=prev)

    def test_shape_mismatches(self):
        c, w = self._ok()
        c["q"]["A"] = c["q"]["A"][:3]
        with self.assertRaisesRegex(ValueError, "layer 'q'.*disagree"):
            server.aggregate("fedit", c, w)
        c, w = self._ok()
        c["o"] = {"A": c["o"]["A"][:3], "B": c["o"]["B"][:3]}
        with self.assertRaisesRegex(ValueError, "layer 'q'.*U=4.*U=3|layer 'v'.*U=|U=3"):
            server.aggregate("fedit", c, w)
        c, w = self._ok()
        c["o"] = {"A": c["o"]["A"][:, :1], "B": c["o"]["B"][:, :, :1]}
        with self.assertRaisesRegex(ValueError, "rank r"):
            server.aggregate("fedit", c, w)
        c, w = self._ok()
        c["o"]["A"] = c["o"]["A"][0]
        with self.assertRaisesRegex(ValueError, "layer 'o'.*\\[U, r, d_in\\]"):
            server.aggregate("fedit", c, w)

    def test_zero_clients(self):
        c = {n: {"A": np.zeros((0, R, di), np.float32), "B": np.zeros((0, do, R), np.float32)}
             for n, (do, di) in SHAPES.items()}  # fmt: skip
        with self.assertRaisesRegex(ValueError, "U=0"):
            server.aggregate("fedit", c, np.zeros(0))

    def test_empty_and_missing(self):
        with self.assertRaisesRegex(ValueError, "non-empty"):
            server.aggregate("fedit", {}, [1.0])
        c, w = self._ok()
        del c["q"]["B"]
        with self.assertRaisesRegex(ValueError, "layer 'q'.*\\['A', 'B'\\]"):
            server.aggregate("fedit", c, w)


if __name__ == "__main__":
    absltest.main()
