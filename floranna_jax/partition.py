"""Federated partitions, pure numpy: labels -> per-client index arrays, deterministic by seed.

    part = partition.split(labels, 10, scheme="dirichlet", alpha=0.5, seed=0)
    part.train[u], part.holdout[u]     # int64 index arrays of client u, sorted
    print(partition.summary(labels, part))

Schemes (SCHEMES, chosen by name):
  iid          shuffled, near-equal sizes.
  dirichlet    label skew (Hsu et al. 2019): for each class c, q_c ~ Dir(alpha 1_U) splits
               the examples of c over the U clients. Smaller alpha -> more skew.
  quantity     size skew, labels iid: sizes ~ N Dir(alpha 1_U), or power law
               n_u ~ (rank+1)^-exponent (law="power").
  k_classes    each client holds `classes_per_client` classes (McMahan et al. 2017 shards);
               every class goes to at least one client; a class is split evenly over its holders.
Regression targets (float labels) are first binned into `num_bins` quantile bins.

Every example lands with exactly one client, in its train or its holdout split. A client
left with fewer than its minimum (2, or 1 without holdout) gets examples moved one at a time
from the largest client: the smallest fix that leaves no client empty. Each client's holdout
is a random `holdout_fraction` of its examples, at least 1, for personalized evaluation.
"""

import inspect
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from floranna_jax.errors import BadValue

LABEL_FREE = ("iid", "quantity")  # schemes that do not look at the labels


class Partition(NamedTuple):
    """train[u], holdout[u]: sorted int64 index arrays into the labels, for each client u."""

    train: list[np.ndarray]
    holdout: list[np.ndarray]


def label_ids(labels: np.ndarray, num_bins: int = 5) -> tuple[np.ndarray, int]:
    """Class ids int64 [N] and their count C: distinct labels in sorted order, or, for
    float labels with non-integer values (regression), `num_bins` quantile bins.
    """
    labels = np.asarray(labels).reshape(-1)
    if np.issubdtype(labels.dtype, np.floating) and np.any(labels != np.round(labels)):
        edges = np.quantile(labels, np.linspace(0, 1, num_bins + 1)[1:-1])
        labels = np.searchsorted(edges, labels, side="right")
    _, ids = np.unique(labels, return_inverse=True)
    return ids.astype(np.int64), int(ids.max(initial=-1)) + 1


def _chunks(indices: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return np.split(indices, np.cumsum(sizes)[:-1])


def _sizes(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer sizes summing to `total` closest to proportions * total (largest remainder)."""
    raw = proportions / proportions.sum() * total
    sizes = np.floor(raw).astype(np.int64)
    sizes[np.argsort(sizes - raw)[: total - sizes.sum()]] += 1
    return sizes


def iid(ids: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled, sizes differing by at most one."""
    return np.array_split(rng.permutation(len(ids)), num_clients)


def dirichlet(
    ids: np.ndarray, num_clients: int, rng: np.random.Generator, *, alpha: float = 0.5
) -> list[np.ndarray]:
    """Label skew: class c's examples split over clients by q_c ~ Dir(alpha 1_U)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(int(ids.max(initial=-1)) + 1):
        members = rng.permutation(np.nonzero(ids == c)[0])
        q = rng.dirichlet(np.full(num_clients, alpha))
        for u, chunk in enumerate(_chunks(members, _sizes(q, len(members)))):
            parts[u].append(chunk)
    return [np.concatenate(p) for p in parts]


def quantity(
    ids: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    law: str = "dirichlet",
    exponent: float = 1.0,
) -> list[np.ndarray]:
    """Size skew with iid labels: proportions ~ Dir(alpha 1_U) or (rank+1)^-exponent."""
    if law == "dirichlet":
        q = rng.dirichlet(np.full(num_clients, alpha))
    elif law == "power":
        q = rng.permutation(np.arange(1, num_clients + 1, dtype=np.float64) ** -exponent)
    else:
        raise BadValue("law", f"unknown {law!r}; valid: dirichlet, power")
    return _chunks(rng.permutation(len(ids)), _sizes(q, len(ids)))


def k_classes(
    ids: np.ndarray, num_clients: int, rng: np.random.Generator, *, classes_per_client: int = 2
) -> list[np.ndarray]:
    """Client u holds classes perm[(u k + j) mod C], j < k: each class has >= 1 holder."""
    num_classes, k = int(ids.max(initial=-1)) + 1, classes_per_client
    if not 1 <= k <= num_classes or num_clients * k < num_classes:
        raise ValueError(
            f"k_classes needs 1 <= classes_per_client <= {num_classes} classes and "
            f"num_clients * classes_per_client >= {num_classes}; got {k} with {num_clients} clients"
        )
    perm = rng.permutation(num_classes)
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for u in range(num_clients):
        for j in range(k):
            holders[perm[(u * k + j) % num_classes]].append(u)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, owners in enumerate(holders):
        members = rng.permutation(np.nonzero(ids == c)[0])
        for u, chunk in zip(owners, np.array_split(members, len(owners)), strict=True):
            parts[u].append(chunk)
    return [np.concatenate(p) for p in parts]


SCHEMES: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "quantity": quantity,
    "k_classes": k_classes,
}


def _fill_small(parts: list[np.ndarray], minimum: int, rng: np.random.Generator) -> None:
    """Moves random examples, one at a time, from the largest client to any below `minimum`."""
    for u in range(len(parts)):
        while len(parts[u]) < minimum:
            donor = int(np.argmax([len(p) for p in parts]))
            pick = rng.integers(len(parts[donor]))
            parts[u] = np.append(parts[u], parts[donor][pick])
            parts[donor] = np.delete(parts[donor], pick)


def check(scheme: str, num_clients: int, *, alpha: float = 0.5, holdout_fraction: float = 0.1,
          **scheme_kwargs) -> dict:  # fmt: skip
    """Raise :class:`BadValue` naming the first bad parameter; return the scheme's own
    keyword arguments. Needs no data: what depends on the labels is checked by ``split``."""
    if scheme not in SCHEMES:
        raise BadValue("scheme", f"unknown {scheme!r}; valid: {', '.join(SCHEMES)}")
    if isinstance(num_clients, bool) or not (isinstance(num_clients, int) and num_clients >= 1):
        raise BadValue("num_clients", f"must be a positive integer, got {num_clients!r}")
    if not (isinstance(holdout_fraction, int | float) and 0 <= holdout_fraction < 1):
        raise BadValue("holdout_fraction", f"must be in [0, 1), got {holdout_fraction!r}")
    k = scheme_kwargs.get("classes_per_client", 1)
    if isinstance(k, bool) or not (isinstance(k, int) and k >= 1):
        raise BadValue("classes_per_client", f"must be a positive integer, got {k!r}")
    params = list(inspect.signature(SCHEMES[scheme]).parameters)[3:]
    ok = isinstance(alpha, int | float) and not isinstance(alpha, bool) and 0 < alpha < np.inf
    if "alpha" in params and not ok:
        raise BadValue("alpha", f"must be a finite number > 0, got {alpha!r}")
    unknown = sorted(set(scheme_kwargs) - set(params))
    if unknown:
        valid = ", ".join(params) or "none"
        raise BadValue(
            unknown[0], f"{unknown} not parameter(s) of scheme {scheme!r}; valid: {valid}"
        )
    return {k: v for k, v in {"alpha": alpha, **scheme_kwargs}.items() if k in params}


def split(
    labels: np.ndarray,
    num_clients: int,
    *,
    scheme: str = "dirichlet",
    seed: int = 0,
    alpha: float = 0.5,
    holdout_fraction: float = 0.1,
    num_bins: int = 5,
    **scheme_kwargs,
) -> Partition:
    """Splits N examples with `labels` [N] (class ids or float targets) over `num_clients`.

    alpha goes to the schemes that take it (dirichlet, quantity); other keyword arguments are
    the scheme's own (see SCHEMES); num_bins bins float targets. Each client's holdout holds
    round(holdout_fraction * n_u) of its examples, at least 1 (none if the fraction is 0).
    """
    params = check(scheme, num_clients, alpha=alpha, holdout_fraction=holdout_fraction,
                   **scheme_kwargs)  # fmt: skip
    ids, _ = label_ids(labels, num_bins)
    minimum = 2 if holdout_fraction > 0 else 1
    if len(ids) < minimum * num_clients:
        raise ValueError(
            f"{len(ids)} examples cannot give {num_clients} clients {minimum} example(s) each"
        )
    assign_seq, fix_seq, holdout_seq = np.random.SeedSequence(seed).spawn(3)
    parts = SCHEMES[scheme](ids, num_clients, np.random.default_rng(assign_seq), **params)
    _fill_small(parts, minimum, np.random.default_rng(fix_seq))
    rng = np.random.default_rng(holdout_seq)
    train, holdout = [], []
    for part in parts:
        part = rng.permutation(part)
        n_hold = (
            0
            if holdout_fraction == 0
            else min(max(1, round(holdout_fraction * len(part))), len(part) - 1)
        )
        holdout.append(np.sort(part[:n_hold]).astype(np.int64))
        train.append(np.sort(part[n_hold:]).astype(np.int64))
    return Partition(train, holdout)


def histogram(labels: np.ndarray, part: Partition, num_bins: int = 5) -> np.ndarray:
    """Label counts int64 [U, C] of each client's train split (classes as in label_ids)."""
    ids, num_classes = label_ids(labels, num_bins)
    return np.stack([np.bincount(ids[t], minlength=num_classes) for t in part.train])


def summary(labels: np.ndarray, part: Partition, num_bins: int = 5) -> str:
    """A text table: per client, train and holdout sizes and the train label histogram."""
    counts = histogram(labels, part, num_bins)
    head = ["client", "train", "holdout", *[f"c{c}" for c in range(counts.shape[1])]]
    rows = [
        [str(u), str(len(t)), str(len(h)), *map(str, counts[u])]
        for u, (t, h) in enumerate(zip(part.train, part.holdout, strict=True))
    ]
    sizes = [sum(map(len, part.train)), sum(map(len, part.holdout))]
    rows.append(["all", *map(str, sizes), *map(str, counts.sum(0))])
    width = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(cell.rjust(w) for cell, w in zip(r, width, strict=True)) for r in [head, *rows]
    ]
    return "\n".join(lines)


def plot(labels: np.ndarray, part: Partition, path: str, num_bins: int = 5) -> None:
    """Writes a PNG: one stacked bar per client, its train examples by label (Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = histogram(labels, part, num_bins)
    fig = Figure(figsize=(max(4.0, 0.4 * len(counts) + 2), 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bottom = np.zeros(len(counts))
    for c in range(counts.shape[1]):
        ax.bar(np.arange(len(counts)), counts[:, c], bottom=bottom, label=f"c{c}")
        bottom += counts[:, c]
    ax.set_xlabel("client")
    ax.set_ylabel("train examples")
    ax.legend(fontsize="small", ncol=min(counts.shape[1], 5))
    fig.tight_layout()
    fig.savefig(path)
