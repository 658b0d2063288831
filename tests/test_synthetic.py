"""The synthetic task: fixed shapes, deterministic, and the label is a rule of the tokens."""

import numpy as np
import pytest

from floranna_jax.data import synthetic


def test_shapes_dtypes_and_determinism():
    a = synthetic.make(64, seq_len=16, vocab_size=50, num_labels=3, seed=4)
    b = synthetic.make(64, seq_len=16, vocab_size=50, num_labels=3, seed=4)
    c = synthetic.make(64, seq_len=16, vocab_size=50, num_labels=3, seed=5)
    assert set(a) == {"input_ids", "attention_mask", "token_type_ids", "label"}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert a[key].shape == (64, 16) and a[key].dtype == np.int32
    assert a["label"].shape == (64,) and a["label"].dtype == np.int32
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["input_ids"], c["input_ids"])
    assert a["input_ids"].max() < 50 and set(np.unique(a["label"])) == {0, 1, 2}


def test_label_is_the_trigger_present():
    d = synthetic.make(2000, seq_len=32, num_labels=4, seed=0)
    ids, mask = d["input_ids"], d["attention_mask"]
    assert np.all(ids[:, 0] == synthetic.CLS_ID)
    assert np.all(ids[mask == 0] == synthetic.PAD_ID)
    assert np.all(mask[:, :-1] >= mask[:, 1:])  # padding only at the end
    present = np.stack([(ids == synthetic.FIRST_TRIGGER_ID + c).any(1) for c in range(4)], 1)
    assert np.all(present.sum(1) == 1)
    assert np.array_equal(present.argmax(1), d["label"])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="vocab_size"):
        synthetic.make(4, vocab_size=4, num_labels=2)
    with pytest.raises(ValueError, match="num_labels"):
        synthetic.make(4, num_labels=1)
