"""Tests of one federated round (floranna_jax/rounds.py): deterministic sampling and
batches, fail-fast on non-finite updates, FedIT with one client equals a centralized
step, and the client step compiling once for the whole run."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from smoke_setup import config_file, shared_compilation, smoke_config

from floranna_jax import keys, models, packing, rounds, train


@pytest.fixture(autouse=True, scope="module")
def _shared_compilation():
    with shared_compilation():
        yield


def test_sample_clients_is_deterministic_and_distinct():
    key = jax.random.key(3)
    a = rounds.sample_clients(key, 10, 4)
    np.testing.assert_array_equal(a, rounds.sample_clients(key, 10, 4))
    assert len(set(a.tolist())) == 4 and np.all(np.diff(a) > 0) and a.max() < 10
    draws = {tuple(rounds.sample_clients(jax.random.fold_in(key, r), 10, 4)) for r in range(8)}
    assert len(draws) > 1  # rounds differ


def test_client_order_cycles_short_clients_in_fresh_epochs():
    key = jax.random.key(0)
    take, real = rounds.client_order(np.array([1, 4, 7]), key, steps=3, batch=2)
    assert real.all()  # no masked step, no padded example
    flat = take.ravel().tolist()
    assert sorted(flat[:3]) == sorted(flat[3:]) == [1, 4, 7]  # two whole epochs
    epochs = {tuple(rounds.client_order(np.array([1, 4, 7]), jax.random.key(s), 2, 3)[0]
                    .ravel()[3:].tolist()) for s in range(8)}  # fmt: skip
    assert len(epochs) > 1  # the second epoch is shuffled afresh, not a copy of a fixed one
    again, _ = rounds.client_order(np.array([1, 4, 7]), key, steps=3, batch=2)
    np.testing.assert_array_equal(again, take)
    full, full_real = rounds.client_order(np.arange(10), key, steps=2, batch=3)
    assert full_real.all() and len(set(full.ravel().tolist())) == 6
    _, none_real = rounds.client_order(np.array([], np.int64), key, steps=2, batch=3)
    assert not none_real.any()  # a client without data: masked steps only


def test_round_runs_only_real_steps_and_counts_repeats():
    # 256 examples over 4 clients, 5 steps of 16: 80 per client, more than most hold.
    config = smoke_config(**{"server.name": "fedit", "client.local_steps": 5})
    run = train.build(config)
    sizes = np.asarray([len(i) for i in run.exp.part.train])
    assert sizes.min() > 0 and (sizes < 5 * 16).sum() >= 2  # clients that cycle
    _, out = run.round_fn(run.state)
    assert out.metrics["train/real_steps"] == 5
    assert out.metrics["train/examples"] == 5 * 16 * config.train.clients_per_round


def _padded_batches(arrays, index, data_key, steps, batch):
    take, real = rounds.client_order(index, data_key, steps, batch)
    return packing.batches(arrays, take, real)


def test_nonfinite_update_names_round_client_and_layer():
    good = jnp.ones((3, 2, 2))
    tree = {"lora": {"layer_0/query": {"A": good, "B": good.at[1, 0, 1].set(jnp.nan)}}}
    with pytest.raises(ValueError, match=r"round 5: client 12 .*layer_0/query.*B"):
        rounds.check_uploads(5, np.array([4, 12, 30]), np.zeros(3), tree)
    with pytest.raises(ValueError, match=r"round 5: client 30 has non-finite training loss"):
        rounds.check_uploads(5, np.array([4, 12, 30]), np.array([0.1, 0.2, np.inf]), tree)


def test_fedit_one_client_one_step_equals_centralized_step(tmp_path):
    config = smoke_config(**{
        "partition.num_clients": 1, "train.clients_per_round": 1, "partition.holdout_fraction": 0.0,
        "client.local_steps": 1, "client.batch_size": 256, "client.optimizer": "sgd",
        "client.learning_rate": 0.5, "server.name": "fedit", "lora.dropout": 0.0,
        "data.packing": False,  # the step below uses the same padded batch
    })  # fmt: skip
    run = train.build(config)
    state, _ = run.round_fn(run.state)

    # The same batch and dropout key the round used, then one plain SGD step.
    model, exp = run.exp.model, run.exp
    ckey = keys.client_key(keys.round_key(run.state.key, 0), 0)
    batches = _padded_batches(exp.train, exp.part.train[0], keys.data_key(ckey), 1, 256)
    batch = jax.tree.map(lambda x: x[0], batches)
    loss_fn = exp.task.make_loss(model)
    dropout_key = jax.random.fold_in(keys.dropout_key(ckey), 0)  # runner: step t=0
    grad_fn = jax.jit(jax.grad(loss_fn, argnums=1, has_aux=True))
    grads, _ = grad_fn(model.base, model.trainable, batch, dropout_key)
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, model.trainable, grads)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["lora"]))
    # vmapped runner vs plain jit reorder float sums: agree to float32 round-off.
    chex.assert_trees_all_close(
        {"lora": state.lora, "head": state.head}, expected, rtol=1e-5, atol=1e-6
    )


def test_round_step_compiles_once(tmp_path):
    chex.clear_trace_counter()
    config = smoke_config(**{"server.name": "fedit"})
    run = train.build(config, loss_wrapper=lambda f: chex.assert_max_traces(f, n=1))
    state = run.state
    for _ in range(3):  # a retrace would raise from inside the runner
        state, out = run.round_fn(state)
    assert int(state.round) == 3 and np.isfinite(out.metrics["train/loss"])


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("config_name", ["glue.py", "gsm8k.py"], ids=["encoder", "decoder"])
def test_micro_batches_equal_one_batch(config_name, packing, monkeypatch):
    # One round of 2 steps of 8 examples, whole or as 4 micro-batches of 2 (each packed on
    # its own): the uploads agree to float32 round-off of the regrouped sums (1e-5).
    # Without dropout: its masks are drawn per micro-batch, so they differ by design.
    tiny = models.tiny_config
    monkeypatch.setattr(models, "tiny_config", lambda t: {
        **tiny(t), "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})  # fmt: skip
    overrides = {"server.name": "fedit", "lora.dropout": 0.0, "data.packing": packing,
                 "client.local_steps": 2, "client.batch_size": 8}  # fmt: skip
    outs = []
    for micro in (0, 2):
        config = config_file(config_name, **overrides, **{"client.micro_batch_size": micro})
        run = train.build(config)
        _, out = run.round_fn(run.state)
        outs.append(out)
    whole, micro = outs
    assert any(float(jnp.abs(b["B"]).max()) > 0 for b in whole.trainable["lora"].values())
    chex.assert_trees_all_close(micro.trainable, whole.trainable, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(micro.metrics["train/loss"], whole.metrics["train/loss"], 1e-5)


def test_merging_round_keeps_one_bf16_base():
    # A FLoRA round on a bfloat16 base: the merged base shares every leaf the merges do not
    # touch with the pretrained base (no second base), and each touched kernel is
    # W0 + s * merged summed in float32 and rounded once into bfloat16.
    run = train.build(smoke_config(**{"server.name": "flora", "model.base_dtype": "bfloat16"}))
    state, _ = run.round_fn(run.state)
    delta = run.server_.method.base_delta(state.method)
    w0 = jax.tree_util.tree_flatten_with_path(run.exp.model.base)[0]
    merged = jax.tree.leaves(run.base_of(state))
    assert all(x.dtype == jnp.bfloat16 for x in merged)
    names = {f"{n}/kernel" for n in delta}
    new_bytes = 0
    for (path, old), new in zip(w0, merged, strict=True):
        name = "/".join(k.key for k in path)
        if name not in names:
            assert new is old, name
            continue
        new_bytes += new.nbytes
        dW = delta[name.removesuffix("/kernel")]
        want = (old.astype(jnp.float32) + run.exp.model.lora_scale * dW.T).astype(jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(new, np.float32), np.asarray(want, np.float32))
        assert bool(jnp.any(new != old)), name
    total = sum(x.nbytes for _, x in w0)
    assert 0 < new_bytes == sum(x.nbytes for (p, x) in w0 if "/".join(k.key for k in p) in names)
    assert new_bytes < total / 4  # only the adapted kernels are new
