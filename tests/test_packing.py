"""Packed batches (floranna_jax/packing.py): every example exactly once and whole, the
packed forward and local step equal the padded ones, and a bounded number of shapes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floranna_jax import clients, models, packing
from floranna_jax.tasks import classification

N, L = 60, 24


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, L + 1, N)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    return {
        "input_ids": (rng.integers(5, 900, (N, L)) * mask).astype(np.int32),
        "attention_mask": mask,
        "token_type_ids": (rng.integers(0, 2, (N, L)) * mask).astype(np.int32),
        "label": rng.integers(0, 2, N).astype(np.int32),
    }


def _take(seed=1, n=4, b=10):
    rng = np.random.default_rng(seed)
    take = rng.permutation(N)[: n * b].reshape(n, b)
    real = np.ones((n, b), bool)
    real[-1, 6:] = False  # a short last batch
    return take, real


@pytest.mark.parametrize("batch", [None, 10])  # rows of the longest example; dense rows
def test_every_example_is_packed_once_and_whole(batch):
    arrays = _arrays()
    take, real = _take()
    lengths, T = packing.layout(arrays, packing.decide(True, arrays, None, batch).train)
    out = packing.batches(arrays, take, real, (lengths, T))
    n, b = take.shape
    R = out["input_ids"].shape[1]
    assert out["input_ids"].shape == (n, R, T) and R < b  # fewer rows than examples
    for i in range(n):
        seg = out["segment_ids"][i].reshape(-1)
        for j in range(b):
            where = np.flatnonzero(seg == j + 1)
            if not real[i, j]:
                assert where.size == 0 and out["mask"][i, j] == 0
                continue
            row = take[i, j]
            k = lengths[row]
            assert where.size == k and out["mask"][i, j] == 1  # whole, and only once
            np.testing.assert_array_equal(np.diff(where), 1)  # contiguous, in one row
            assert where[0] // T == where[-1] // T and out["starts"][i, j] == where[0]
            for key in ("input_ids", "token_type_ids"):
                np.testing.assert_array_equal(out[key][i].reshape(-1)[where], arrays[key][row, :k])
            np.testing.assert_array_equal(out["positions"][i].reshape(-1)[where], np.arange(k))
            assert out["label"][i, j] == arrays["label"][row]
        assert np.count_nonzero(seg) == lengths[take[i][real[i]]].sum()  # nothing else


def test_row_counts_are_bounded():
    assert [packing.num_rows(k, 16) for k in (1, 5, 16)] == [1, 5, 16]
    assert [packing.num_rows(k, 128) for k in (1, 9, 17, 128)] == [8, 16, 24, 128]
    for b in (1, 7, 16, 100, 256):
        shapes = {packing.num_rows(k, b) for k in range(1, b + 1)}
        assert len(shapes) <= packing.MAX_SHAPES and max(shapes) == b
    with pytest.raises(ValueError, match="30 tokens does not fit a row of 24"):
        packing.place(np.array([3, 30]), 24)


def test_dense_rows_hold_several_examples_where_the_longest_rows_hold_one():
    lengths = np.full(40, 33)  # rows of the longest example (48 tokens) hold one each
    T = packing.dense_row_length(lengths, 8)
    assert T % 16 == 0 and T >= 2 * 33
    used = packing.place(np.full((2, 8), 33), T)[2]
    np.testing.assert_array_equal(used, used[0])
    assert used[0] * T < 8 * 48  # fewer token slots than one example a row
    assert packing.dense_row_length(lengths, 1) == 48  # one example a batch: nothing to share
    assert packing.decide(True, _arrays(), None, 10).train == packing.dense_row_length(
        packing.token_lengths(_arrays()), 10
    )
    assert packing.decide(True, _arrays(), None).train == packing.layout(_arrays())[1]


def test_place_packs_each_batch_on_its_own():
    lengths = np.array([[5, 3, 0, 4], [8, 8, 8, 8]])
    row, offset, used = packing.place(lengths, 8)
    np.testing.assert_array_equal(used, [2, 4])
    for i in range(2):  # the same rows as first-fit decreasing on one batch alone
        alone = packing.place(lengths[i], 8)
        np.testing.assert_array_equal(row[i], alone[0])
        np.testing.assert_array_equal(offset[i], alone[1])
    np.testing.assert_array_equal(row[0], [0, 0, 0, 1])  # 5, then 4 to row 1, 3 after the 5
    np.testing.assert_array_equal(offset[0], [0, 5, 0, 0])


def test_token_lengths_and_row_length():
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(packing.token_lengths({"attention_mask": mask}), [2, 4, 1])
    assert packing.row_length(np.array([3, 17]), 64) == 32
    assert packing.row_length(np.array([3, 60]), 62) == 62


def _model(model_type, dropout=0.1):
    config = dict(models.tiny_config(model_type), initializer_range=0.3,
                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)  # fmt: skip
    spec = models.LoraSpec(rank=4, targets=("query", "value", "mlp_up"))
    model = models.build_random(config, num_labels=2, lora=spec, key=jax.random.key(1))
    noise = lambda x, k: x + 0.3 * jax.random.normal(k, x.shape)  # noqa: E731
    leaves, tree = jax.tree.flatten(model.trainable)
    ks = jax.random.split(jax.random.key(2), len(leaves))
    return model._replace(
        trainable=jax.tree.unflatten(tree, [noise(x, k) for x, k in zip(leaves, ks, strict=True)])
    )


def _batch(batches, i):
    return {k: v[i] for k, v in batches.items()}


def _both(arrays, take, real):
    return packing.batches(arrays, take, real, packing.layout(arrays)), packing.batches(
        arrays, take, real
    )


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_packed_forward_gives_the_padded_logits(model_type):
    model = _model(model_type)
    arrays = _arrays()
    take, real = _take()
    packed, padded = _both(arrays, take, real)
    apply = jax.jit(model.apply)
    for i in range(take.shape[0]):
        got = np.asarray(apply(model.base, model.trainable, _batch(packed, i)))
        want = np.asarray(apply(model.base, model.trainable, _batch(padded, i)))
        assert np.abs(want).max() > 0.1  # logits far from zero: a wrong mask would show
        np.testing.assert_allclose(got[real[i]], want[real[i]], rtol=1e-5, atol=1e-5)
    # The check can fail: attention leaking across the examples of a row changes the logits.
    leaky = _batch(packed, 0)
    leaky["segment_ids"] = (leaky["segment_ids"] > 0).astype(np.int32)
    got = np.asarray(apply(model.base, model.trainable, leaky))
    want = np.asarray(apply(model.base, model.trainable, _batch(padded, 0)))
    assert np.abs(got - want).max() > 1e-3


def test_rows_of_padding_added_after_packing_change_no_logit():
    # Processes pack their own clients, then all grow to the most rows any of them needs.
    model = _model("roberta")
    arrays = _arrays()
    take, real = _take()
    packed = packing.batches(arrays, take, real, packing.layout(arrays))
    R = packing.rows(packed)
    grown = packing.pad_rows(packed, R + 3)
    assert packing.rows(grown) == R + 3 and packing.pad_rows(packed, R) is packed
    apply = jax.jit(model.apply)
    got = np.asarray(apply(model.base, model.trainable, _batch(grown, 0)))
    want = np.asarray(apply(model.base, model.trainable, _batch(packed, 0)))
    # Same tokens and segments, 3 more all-padding rows: the rows' sums differ only in order.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_local_steps_on_packed_rows_equal_the_padded_steps():
    model = _model("bert", dropout=0.0)  # same math; dropout masks differ with the layout
    arrays = _arrays(3)
    take, real = _take(4, n=2, b=12)
    packed, padded = _both(arrays, take, real)
    opt = clients.make_optimizer("adamw", 1e-2)
    update = jax.jit(clients.make_local_update(classification.loss_fn(model, False), opt))
    start = clients.init_opt_state(opt, model.trainable)
    step_mask, key = np.ones(2, np.float32), jax.random.key(0)
    a = update(model.base, model.trainable, start, packed, step_mask, key)
    b = update(model.base, model.trainable, start, padded, step_mask, key)
    moved = jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), b[0], model.trainable)
    assert min(jax.tree.leaves(moved)) > 1e-4  # every leaf trained
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)
