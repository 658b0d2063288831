"""Partitions: every example with exactly one client, deterministic, skew follows alpha."""

import numpy as np
import pytest

from floranna_jax import partition

LABELS = np.random.default_rng(0).integers(0, 4, 2000)
CASES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.1}),
    ("dirichlet", {"alpha": 10.0}),
    ("quantity", {"alpha": 0.5}),
    ("quantity", {"law": "power", "exponent": 1.5}),
    ("k_classes", {"classes_per_client": 2}),
]


def _check_cover(part, n, num_clients):
    assert len(part.train) == len(part.holdout) == num_clients
    everything = np.concatenate(part.train + part.holdout)
    assert np.array_equal(np.sort(everything), np.arange(n))  # all covered, none twice
    assert all(len(t) >= 1 and len(h) >= 1 for t, h in zip(part.train, part.holdout, strict=True))
    assert all(np.all(np.diff(a) > 0) for a in part.train + part.holdout)


@pytest.mark.parametrize(("scheme", "kwargs"), CASES)
def test_cover_once_and_deterministic(scheme, kwargs):
    part = partition.split(LABELS, 10, scheme=scheme, seed=3, **kwargs)
    _check_cover(part, len(LABELS), 10)
    again = partition.split(LABELS, 10, scheme=scheme, seed=3, **kwargs)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(part.train + part.holdout, again.train + again.holdout, strict=True)
    )
    other = partition.split(LABELS, 10, scheme=scheme, seed=4, **kwargs)
    assert not all(np.array_equal(a, b) for a, b in zip(part.train, other.train, strict=True))


def test_holdout_is_the_fraction_at_least_one():
    part = partition.split(LABELS, 8, scheme="iid", holdout_fraction=0.1)
    for t, h in zip(part.train, part.holdout, strict=True):
        assert len(h) == round(0.1 * (len(t) + len(h)))
    none = partition.split(LABELS, 8, scheme="iid", holdout_fraction=0.0)
    assert all(len(h) == 0 for h in none.holdout)
    _, small = partition.split(LABELS[:16], 8, scheme="iid", holdout_fraction=0.01)
    assert all(len(h) == 1 for h in small)


def _mean_tv(alpha, seeds=5):
    """Mean total variation between each client's label distribution and the global one."""
    global_p = np.bincount(LABELS) / len(LABELS)
    tvs = []
    for seed in range(seeds):
        part = partition.split(LABELS, 10, scheme="dirichlet", alpha=alpha, seed=seed)
        hist = partition.histogram(LABELS, part)
        p = hist / hist.sum(1, keepdims=True)
        tvs.append(0.5 * np.abs(p - global_p).sum(1).mean())
    return np.mean(tvs)


def test_dirichlet_skew_grows_as_alpha_falls():
    tv = [_mean_tv(alpha) for alpha in (100.0, 1.0, 0.1)]
    assert tv[0] < 0.1 < tv[1] < tv[2]


def test_iid_and_quantity_keep_labels_iid_and_quantity_skews_sizes():
    iid = partition.split(LABELS, 10, scheme="iid")
    qty = partition.split(LABELS, 10, scheme="quantity", alpha=0.5)
    sizes = [
        np.array([len(t) + len(h) for t, h in zip(p.train, p.holdout, strict=True)])
        for p in (iid, qty)
    ]
    assert sizes[0].max() - sizes[0].min() <= 1
    assert sizes[1].max() > 3 * sizes[1].min()
    for p in (iid, qty):
        hist = partition.histogram(LABELS, p)
        big = hist.sum(1) > 100
        assert np.all(np.abs(hist[big] / hist[big].sum(1, keepdims=True) - 0.25) < 0.1)


def test_k_classes_limits_labels_per_client():
    part = partition.split(LABELS, 6, scheme="k_classes", classes_per_client=2, seed=1)
    for t, h in zip(part.train, part.holdout, strict=True):
        assert len(np.unique(LABELS[np.concatenate([t, h])])) == 2
    with pytest.raises(ValueError, match="num_clients \\* classes_per_client >= 4"):
        partition.split(LABELS, 1, scheme="k_classes", classes_per_client=2)


def test_regression_targets_are_binned():
    scores = np.random.default_rng(0).uniform(0, 5, 1000).astype(np.float32)
    ids, num = partition.label_ids(scores, num_bins=5)
    assert num == 5 and np.all(np.abs(np.bincount(ids) - 200) <= 1)
    part = partition.split(scores, 5, scheme="dirichlet", alpha=0.1)
    _check_cover(part, 1000, 5)


def test_no_client_left_empty_with_extreme_skew():
    labels = np.repeat(np.arange(2), 20)
    for seed in range(5):
        part = partition.split(labels, 20, scheme="dirichlet", alpha=0.01, seed=seed)
        _check_cover(part, 40, 20)  # exactly 2 each: 1 train + 1 holdout
    with pytest.raises(ValueError, match="cannot give 21 clients 2"):
        partition.split(labels, 21, scheme="iid")


def test_unknown_scheme_or_parameter_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: iid, dirichlet, quantity, k_classes"):
        partition.split(LABELS, 4, scheme="shards")
    with pytest.raises(ValueError, match="'beta'.*'dirichlet'; valid: alpha"):
        partition.split(LABELS, 4, scheme="dirichlet", beta=1.0)
    with pytest.raises(ValueError, match="valid: none"):
        partition.split(LABELS, 4, scheme="iid", classes_per_client=2)
    assert set(partition.SCHEMES) == {"iid", "dirichlet", "quantity", "k_classes"}


def test_summary_and_plot(tmp_path):
    part = partition.split(LABELS, 3, scheme="dirichlet", seed=0)
    table = partition.summary(LABELS, part)
    lines = table.splitlines()
    assert lines[0].split() == ["client", "train", "holdout", "c0", "c1", "c2", "c3"]
    assert len(lines) == 5
    total = lines[-1].split()
    assert total[0] == "all" and int(total[1]) + int(total[2]) == len(LABELS)
    assert [int(v) for v in total[3:]] == np.bincount(LABELS[np.concatenate(part.train)]).tolist()
    partition.plot(LABELS, part, tmp_path / "clients.png")
    assert (tmp_path / "clients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
