"""Tests for floranna_jax/clients.py on a tiny pure-JAX LoRA classifier.

The toy model: ``logits = tanh(dropout(x) @ (W0 + s B A)^T) @ w + c`` with the frozen
``W0`` in ``base`` and ``{"lora": {"l0": {A, B}}, "head": {w, c}}`` trainable, so these
tests do not depend on floranna_jax/models.
"""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from floranna_jax import clients, lora, runners
from floranna_jax import keys as floranna_keys

D_IN, D_H, R, C, B_SZ = 6, 5, 2, 3, 4
SCALE = lora.scale(alpha=4.0, r=R)


def make_loss(dropout_rate: float = 0.0):
    def loss_fn(base, trainable, batch, dropout_key):
        x = batch["x"]
        if dropout_rate > 0:
            keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout_rate), 0.0)
        h = jnp.tanh(lora.apply(x, base["l0"], trainable["lora"]["l0"], SCALE))
        logits = h @ trainable["head"]["w"] + trainable["head"]["c"]
        per_ex = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        mask = batch["mask"]
        return jnp.sum(per_ex * mask) / jnp.maximum(jnp.sum(mask), 1.0), jnp.sum(mask)

    return loss_fn


def make_problem(U: int = 3, S: int = 4, seed: int = 0):
    """Base, one client's trainable, and ``[U, S, b, ...]`` batches with random data.

    NumPy draws: no per-op compilation, so the suite stays fast on a busy CPU.
    """
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    base = {"l0": normal(D_IN, D_H) / np.sqrt(D_IN)}
    # Non-zero B so that A receives a gradient (with B = 0, dL/dA = 0 and freezing is moot).
    adapter = {"A": normal(R, D_IN) / np.sqrt(D_IN), "B": 0.3 * normal(D_H, R)}
    trainable = {
        "lora": {"l0": adapter},
        "head": {"w": 0.5 * normal(D_H, C), "c": jnp.zeros((C,))},
    }
    batches = {
        "x": normal(U, S, B_SZ, D_IN),
        "y": jnp.asarray(rng.integers(0, C, (U, S, B_SZ)), jnp.int32),
        "mask": jnp.ones((U, S, B_SZ), jnp.float32),
    }
    return base, trainable, batches


def run_clients(
    U=3, S=4, opt_name="adamw", mode="vmap", mesh=None, frozen=None, dropout=0.0, chunk=0
):
    base, trainable, batches = make_problem(U, S)
    opt = clients.make_optimizer(opt_name, learning_rate=5e-2, weight_decay=1e-2)
    local_update = clients.make_local_update(make_loss(dropout), opt, frozen=frozen)
    runner = runners.make_runner(local_update, mode=mode, mesh=mesh, chunk=chunk)
    state = clients.init_opt_state(opt, trainable)
    keys = floranna_keys.dropout_keys(jax.random.key(7), np.arange(U))
    mask = jnp.ones((U, S), jnp.float32)
    args = (runners.broadcast(trainable, U), runners.broadcast(state, U), batches, mask, keys)
    return runner(base, *args)


def slice_client(tree, u):
    return jax.tree.map(lambda x: x[u], tree)


class LocalUpdateTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_one_client_one_sgd_step_is_one_centralized_step(self):
        # FedIT with one client and one local step is plain SGD on the same batch.
        base, trainable, batches = make_problem(U=1, S=1)
        batch = jax.tree.map(lambda x: x[0], batches)
        lr, key = 0.1, jax.random.key(3)
        loss_fn = make_loss(dropout_rate=0.3)
        opt = clients.make_optimizer("sgd", learning_rate=lr)
        local_update = self.variant(clients.make_local_update(loss_fn, opt))
        state = clients.init_opt_state(opt, trainable)
        new, _, metrics = local_update(base, trainable, state, batch, jnp.ones((1,)), key)

        step_key = jax.random.fold_in(key, 0)
        first = jax.tree.map(lambda x: x[0], batch)
        (loss, _), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
            base, trainable, first, step_key
        )
        expected = jax.tree.map(lambda p, g: p - lr * g, trainable, grads)
        # Same ops in the same order; 1e-6 only absorbs jit-vs-eager fusion rounding.
        chex.assert_trees_all_close(new, expected, atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
        self.assertEqual(int(metrics["steps"]), 1)

    @chex.variants(with_jit=True, without_jit=True)
    def test_step_key_is_fold_in_of_client_key_and_step(self):
        # Linear loss <key noise, params>: SGD(lr=1) subtracts exactly the noise of each step.
        def loss_fn(base, trainable, batch, key):
            del base, batch
            noise = jax.random.normal(key, trainable["w"].shape)
            return jnp.sum(trainable["w"] * noise), jnp.float32(1.0)

        opt = clients.make_optimizer("sgd", learning_rate=1.0)
        local_update = self.variant(clients.make_local_update(loss_fn, opt))
        params = {"w": jnp.zeros((3,))}
        key = jax.random.key(11)
        out, _, _ = local_update(
            {}, params, opt.init(params), {"x": jnp.zeros((2, 1))}, jnp.ones((2,)), key
        )
        noise = [jax.random.normal(jax.random.fold_in(key, t), (3,)) for t in range(2)]
        self.assertFalse(np.allclose(noise[0], noise[1]))  # distinct keys per step
        chex.assert_trees_all_close(out["w"], -(noise[0] + noise[1]), atol=1e-6)

    def test_padded_steps_equal_shorter_run(self):
        base, trainable, batches = make_problem(U=1, S=4)
        batches = jax.tree.map(lambda x: x[0], batches)
        opt = clients.make_optimizer("adamw", learning_rate=5e-2, weight_decay=1e-2)
        local_update = jax.jit(clients.make_local_update(make_loss(0.2), opt))
        state = clients.init_opt_state(opt, trainable)
        key = jax.random.key(5)
        # Padded steps carry garbage (NaN inputs, all-zero example masks -> NaN loss).
        padded = jax.tree.map(lambda x: x.at[2:].set(0), batches)
        padded["x"] = padded["x"].at[2:].set(jnp.nan)
        got = local_update(base, trainable, state, padded, jnp.array([1.0, 1, 0, 0]), key)
        short = jax.tree.map(lambda x: x[:2], batches)
        want = local_update(base, trainable, state, short, jnp.ones((2,)), key)
        # Same two steps with the same keys; identical up to compilation differences.
        chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)
        self.assertEqual(int(got[2]["steps"]), 2)

    @chex.variants(with_jit=True, without_jit=True)
    def test_micro_batches_equal_one_batch(self):
        # 4 steps of 4 examples, whole or as 2 micro-batches of 2, some examples masked so
        # that micro-batches weigh differently: the same AdamW steps up to float32 round-off.
        base, trainable, batches = make_problem(U=1, S=4)
        batches = jax.tree.map(lambda x: x[0], batches)
        batches["mask"] = batches["mask"].at[0, 1].set(0).at[2, 2:].set(0)
        opt = clients.make_optimizer("adamw", learning_rate=5e-2)
        args = (base, trainable, opt.init(trainable))
        tail = (jnp.ones((4,)), jax.random.key(1))
        whole = self.variant(clients.make_local_update(make_loss(), opt))(*args, batches, *tail)
        split = jax.tree.map(lambda x: x.reshape(4, 2, 2, *x.shape[2:]), batches)
        micro = clients.make_local_update(make_loss(), opt, micro_batched=True)
        got = self.variant(micro)(*args, split, *tail)
        chex.assert_trees_all_close(got, whole, rtol=1e-5, atol=1e-6)
        self.assertFalse(np.allclose(got[0]["head"]["w"], trainable["head"]["w"]))

    def test_frozen_A_is_bit_identical_and_B_trains(self):
        base, trainable, _ = make_problem()
        frozen = lambda path, _: path[-1] == "A"  # noqa: E731  (FFA-LoRA)
        new, state, metrics = run_clients(frozen=frozen)
        for u in range(3):
            np.testing.assert_array_equal(new["lora"]["l0"]["A"][u], trainable["lora"]["l0"]["A"])
            self.assertFalse(np.allclose(new["lora"]["l0"]["B"][u], trainable["lora"]["l0"]["B"]))
        adam = state[0]
        np.testing.assert_array_equal(adam.mu["lora"]["l0"]["A"], 0.0)
        np.testing.assert_array_equal(adam.nu["lora"]["l0"]["A"], 0.0)
        # Without freezing, A does move: the assertion above could fail.
        free, _, _ = run_clients()
        self.assertFalse(np.allclose(free["lora"]["l0"]["A"][0], trainable["lora"]["l0"]["A"]))

    def test_frozen_as_bool_tree(self):
        _, trainable, _ = make_problem()
        mask = jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key == "A", trainable)
        by_tree = run_clients(frozen=mask)
        by_fn = run_clients(frozen=lambda path, _: path[-1] == "A")
        chex.assert_trees_all_equal(by_tree, by_fn)

    def test_non_finite_loss_shows_in_metrics(self):
        base, trainable, batches = make_problem(U=2, S=2)
        batches["x"] = batches["x"].at[1, 0].set(jnp.inf)
        opt = clients.make_optimizer("sgd", learning_rate=1e-2)
        runner = runners.make_runner(clients.make_local_update(make_loss(), opt))
        state = runners.broadcast(clients.init_opt_state(opt, trainable), 2)
        keys = jax.random.split(jax.random.key(0), 2)
        _, _, m = runner(
            base, runners.broadcast(trainable, 2), state, batches, jnp.ones((2, 2)), keys
        )
        np.testing.assert_array_equal(np.isfinite(m["loss"]), [True, False])

    def test_bad_names_raise_with_valid_list(self):
        with self.assertRaisesRegex(ValueError, "adamw.*sgd"):
            clients.make_optimizer("adam", learning_rate=1e-3)
        with self.assertRaisesRegex(ValueError, "vmap.*loop"):
            runners.make_runner(lambda *a: a, mode="pmap")
        with self.assertRaisesRegex(ValueError, "one device"):
            runners.make_runner(lambda *a: a, mode="loop", mesh=runners.make_mesh())


class RunnerTest(parameterized.TestCase):
    @parameterized.parameters("adamw", "sgd")
    def test_vmap_equals_loop(self, opt_name):
        got = run_clients(opt_name=opt_name, mode="vmap", dropout=0.2)
        want = run_clients(opt_name=opt_name, mode="loop", dropout=0.2)
        # Batched vs per-client matmuls may sum in a different order: float32 rounding only.
        chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)

    @parameterized.parameters(1, 2, 3)
    def test_chunked_equals_vmap(self, chunk):
        # U=5 with chunk 2 or 3 leaves a remainder chunk: it must train the same clients.
        got = run_clients(U=5, mode="vmap", dropout=0.2, chunk=chunk)
        want = run_clients(U=5, mode="vmap", dropout=0.2)
        # Same per-client math, batched over fewer clients: float32 rounding only.
        chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)

    def test_chunk_is_validated(self):
        with self.assertRaisesRegex(ValueError, "chunk: must be an int >= 0"):
            runners.make_runner(lambda *a: a, chunk=-1)
        with self.assertRaisesRegex(ValueError, "one device"):
            runners.make_runner(lambda *a: a, chunk=2, mesh=runners.make_mesh())

    def test_padded_client_returns_its_input_exactly(self):
        U, S = 3, 4
        base, trainable, batches = make_problem(U, S)
        opt = clients.make_optimizer("adamw", learning_rate=5e-2)
        runner = runners.make_runner(clients.make_local_update(make_loss(0.2), opt))
        tr_U = runners.broadcast(trainable, U)
        st_U = runners.broadcast(clients.init_opt_state(opt, trainable), U)
        mask = jnp.ones((U, S)).at[2].set(0.0)
        batches = jax.tree.map(lambda x: x.at[2].set(0), batches)  # padded client: no data
        keys = jax.random.split(jax.random.key(1), U)
        new, state, metrics = runner(base, tr_U, st_U, batches, mask, keys)
        chex.assert_trees_all_equal(slice_client(new, 2), trainable)
        chex.assert_trees_all_equal(slice_client(state, 2), slice_client(st_U, 2))
        np.testing.assert_array_equal(metrics["steps"], [S, S, 0])
        self.assertEqual(float(metrics["loss"][2]), 0.0)
        # The real clients are unaffected by the padded one.
        solo = runners.make_runner(clients.make_local_update(make_loss(0.2), opt))
        two = jax.tree.map(lambda x: x[:2], (tr_U, st_U, batches, mask, keys))
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x[:2], (new, state)), solo(base, *two)[:2], atol=1e-6
        )

    def test_dropout_keys_differ_per_client_and_are_deterministic(self):
        U, S = 2, 3
        base, trainable, batches = make_problem(U, S)
        batches = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), batches)  # same data
        opt = clients.make_optimizer("sgd", learning_rate=0.1)
        args = (runners.broadcast(trainable, U), runners.broadcast(opt.init(trainable), U))
        keys = floranna_keys.dropout_keys(jax.random.fold_in(jax.random.key(0), 4), np.arange(U))

        def run(dropout, keys):
            runner = runners.make_runner(clients.make_local_update(make_loss(dropout), opt))
            return runner(base, *args, batches, jnp.ones((U, S)), keys)

        on, again = run(0.5, keys), run(0.5, keys)
        chex.assert_trees_all_equal(on, again)
        self.assertFalse(np.allclose(on[0]["head"]["w"][0], on[0]["head"]["w"][1]))
        off = run(0.0, keys)[0]  # without dropout, identical data gives identical clients
        chex.assert_trees_all_equal(slice_client(off, 0), slice_client(off, 1))

    @parameterized.parameters(("vmap", 0), ("vmap", 2), ("loop", 0))
    def test_step_callback_counts_steps_and_changes_no_number(self, mode, chunk):
        U, S = 3, 4
        base, trainable, batches = make_problem(U, S)
        opt = clients.make_optimizer("adamw", learning_rate=5e-2)
        state = runners.broadcast(clients.init_opt_state(opt, trainable), U)
        keys = jax.random.split(jax.random.key(2), U)
        args = (base, runners.broadcast(trainable, U), state, batches, jnp.ones((U, S)), keys)
        steps = []
        outs = []
        for on_step in (None, steps.append):
            local_update = clients.make_local_update(make_loss(0.2), opt, on_step=on_step)
            runner = runners.make_runner(local_update, mode=mode, chunk=chunk)
            outs.append(jax.block_until_ready(runner(*args)))
        chex.assert_trees_all_equal(*outs)  # bit-identical: the callback reads no parameter
        passes = runners.sequential_passes(U, mode, chunk)
        self.assertEqual(passes, {"vmap": 2 if chunk else 1, "loop": U}[mode])
        self.assertEqual(len(steps), S * passes)
        self.assertEqual(sorted(int(t) for t in steps), sorted(list(range(S)) * passes))

    @parameterized.parameters("vmap", "loop")
    def test_runner_traces_once(self, mode):
        base, trainable, batches = make_problem(U=2, S=2)
        opt = clients.make_optimizer("adamw", learning_rate=1e-2)
        traced = chex.assert_max_traces(n=1)(clients.make_local_update(make_loss(0.1), opt))
        runner = runners.make_runner(traced, mode=mode)
        tr = runners.broadcast(trainable, 2)
        st = runners.broadcast(opt.init(trainable), 2)
        for seed in range(2):  # same shapes, new values: no retrace
            keys = jax.random.split(jax.random.key(seed), 2)
            tr, st, _ = runner(base, tr, st, batches, jnp.ones((2, 2)), keys)
        chex.clear_trace_counter()

    def test_sharded_on_four_devices_equals_one_device(self):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
        env["JAX_PLATFORMS"] = "cpu"
        here = pathlib.Path(__file__).resolve().parent
        code = f"import sys; sys.path.insert(0, {str(here)!r}); import test_clients; "
        code += "test_clients.sharded_main()"
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        self.assertEqual(report["devices"], 4)
        for U, diff in report["max_abs_diff"].items():
            # Per-device vs single-device compilation may fuse differently: float32 rounding.
            self.assertLess(diff, 1e-5, f"U={U}")
        self.assertEqual(report["out_devices"], 4)


def sharded_main():
    """Run in a subprocess with 4 fake CPU devices; prints one JSON line."""
    mesh = runners.make_mesh()
    diffs = {}
    for U in (4, 6):  # 6 is not a multiple of 4: two padded clients are added and stripped
        one = run_clients(U=U, dropout=0.2, frozen=lambda p, _: p[-1] == "A")
        many = run_clients(U=U, mesh=mesh, dropout=0.2, frozen=lambda p, _: p[-1] == "A")
        assert jax.tree.structure(one) == jax.tree.structure(many)
        leaves = zip(jax.tree.leaves(one), jax.tree.leaves(many), strict=True)
        diffs[U] = max(float(jnp.max(jnp.abs(a - b))) for a, b in leaves)
    print(
        json.dumps(
            {
                "devices": len(mesh.devices.flat),
                "out_devices": len(many[0]["head"]["w"].sharding.device_set),
                "max_abs_diff": diffs,
            }
        )
    )


if __name__ == "__main__":
    absltest.main()
