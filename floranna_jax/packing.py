"""Padding-free batches: the examples of a batch share rows of ``T`` tokens (packing).

Padding every example to the dataset's length spends most of the compute on padding
(SST-2 sentences average 13 tokens of 66). Here a batch of ``b`` examples is laid out as
``R`` rows of ``T`` tokens, each example whole in one row, rows filled first-fit
decreasing. A packed batch (:func:`pack`) holds:

- every token array of the data (``[N, L]``, e.g. ``input_ids``, ``token_type_ids``) as
  ``[R, T]``; ``attention_mask`` is replaced by
- ``"segment_ids"`` ``[R, T]`` int32: ``j + 1`` on the tokens of the batch's example ``j``,
  0 on padding. A model attends only within a segment;
- ``"positions"`` ``[R, T]`` int32: a token's position within its own example, from 0;
- ``"starts"`` ``[b]`` int32: where example ``j`` begins, as the flat index ``row * T +
  offset`` (a classifier reads its first token there);
- every per-example array (``[N]``, e.g. ``label``) as ``[b]``, and ``"mask"`` ``[b]``
  float32 (1: a real example, 0: padding of a short batch).

Examples per step stay exactly ``b`` (``client.batch_size`` keeps its meaning); what
varies is ``R``. ``T`` is decided once per run, by :func:`decide` (:class:`Rows`, held by
the run's ``experiment.Experiment``): per split the longest example, or for training with
``data.dense_rows`` the length that packs batches of ``b`` most cheaply
(:func:`dense_row_length`). The round, the evaluators and every Flower client (which packs
its own rows with the ``T`` the server sends) use it. Shapes stay static: ``R`` is the most
rows any batch of the call needs, rounded up to a multiple of ``ceil(b / 16)``, so at most
16 programs per ``b`` are ever compiled, and ``R <= b`` (one example per row: rows of the
longest example are never worse than padding, and a dense ``T`` is taken only where its
modeled cost is lower still).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

Arrays = dict[str, np.ndarray]
MAX_SHAPES = 16  # distinct row counts a batch size can compile to
DRAWS = 64  # batches drawn to choose a row length (dense_row_length)
# The row length at which attention doubles a token's cost in a training step
# (dense_row_length): SmolLM2-135M on the 2-core CPU, from steps timed at several row
# lengths and attention timed alone (docs/decoder_benchmark.md). The FLOP count alone
# says 2,600; the masked T x T scores are memory-bound and cost far more per FLOP.
ATTENTION_LENGTH = 900.0


def token_lengths(arrays: Arrays) -> np.ndarray:
    """``[N]`` tokens each row needs: up to its last real token. Rows are right-padded
    (a left-padded row counts as full length, so it is never cut)."""
    mask = np.asarray(arrays["attention_mask"]) > 0
    L = mask.shape[1]
    last = L - np.argmax(mask[:, ::-1], axis=1)
    return np.where(mask.any(axis=1), last, 1).astype(np.int64)


def row_length(lengths: np.ndarray, full: int, multiple: int = 16) -> int:
    """Tokens per packed row: the longest example rounded up to ``multiple``, at most ``full``."""
    longest = int(np.max(lengths, initial=1))
    return min(full, -(-longest // multiple) * multiple)


def dense_row_length(lengths: np.ndarray, batch: int, multiple: int = 16,
                     attention_length: float = ATTENTION_LENGTH) -> int:  # fmt: skip
    """Tokens per packed row for batches of ``batch`` examples of ``lengths``: the ``T``
    (a multiple of ``multiple``, from the longest example to 4x it) that minimizes the
    modeled cost of a step, ``R(T) * T * (1 + T / attention_length)``.

    ``R(T)``: the rows of :func:`pack` for :data:`DRAWS` batches drawn from ``lengths``
    (fixed seed), the most any needs, rounded as :func:`num_rows` does. Longer rows leave
    less of a batch's last row empty, but every token's attention reads all ``T`` keys of
    its row (XLA computes the full ``T x T`` scores, masked), which ``attention_length``
    prices: the row length at which attention doubles a token's cost."""
    lengths = np.asarray(lengths, np.int64)
    shortest = row_length(lengths, np.iinfo(np.int64).max, multiple)
    draws = np.random.default_rng(0).choice(lengths, (DRAWS, batch))
    best, best_cost = shortest, np.inf
    for T in range(shortest, max(1, min(4, batch)) * shortest + 1, multiple):
        R = num_rows(int(place(draws, T)[2].max()), batch)
        cost = R * T * (1.0 + T / attention_length)
        if cost < best_cost:
            best, best_cost = T, cost
    return best


def layout(arrays: Arrays, T: int | None = None) -> tuple[np.ndarray, int]:
    """``(lengths [N], T)``: what :func:`batches` needs to pack rows of ``arrays``;
    ``T``: the run's row length (:class:`Rows`), else that of ``arrays`` alone (the longest
    example, rounded up to 16 tokens)."""
    lengths = token_lengths(arrays)
    return lengths, T or row_length(lengths, np.shape(arrays["attention_mask"])[1])


class Rows(NamedTuple):
    """Tokens per packed row ``T`` of a run's training split (client batches and the
    clients' held-out rows, which are training rows) and of its validation split; ``None``:
    padded rows (``data.packing`` off)."""

    train: int | None
    validation: int | None


def decide(packed: bool, train: Arrays, validation: Arrays | None,
           dense_batch: int | None = None) -> Rows:  # fmt: skip
    """The run's :class:`Rows` when ``packed`` (else padded): each split's longest example
    rounded up to 16 tokens (:func:`row_length`), except that with ``dense_batch`` (the
    examples of a packed training batch, ``data.dense_rows``) the training split's ``T``
    is :func:`dense_row_length`, which may exceed the arrays' length ``L``."""
    if not packed:
        return Rows(None, None)
    T = lambda a: None if a is None else layout(a)[1]  # noqa: E731
    if dense_batch:
        return Rows(dense_row_length(token_lengths(train), dense_batch), T(validation))
    return Rows(T(train), T(validation))


def place(lengths: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First-fit decreasing, each batch on its own: ``(row, offset, rows used)`` for examples
    of ``lengths [n, b]`` (0: a padded example, placed nowhere: row 0, offset 0) in rows of
    ``T``; ``row, offset [n, b]``, ``used [n]``. A 1-D ``lengths [b]`` is one batch: ``row,
    offset [b]`` and ``used`` an int. All batches advance together, one example each."""
    need = np.atleast_2d(np.asarray(lengths, np.int64))
    if need.max(initial=0) > T:
        raise ValueError(f"an example of {need.max()} tokens does not fit a row of {T}")
    n, b = need.shape
    every = np.arange(n)
    row, offset = np.zeros((n, b), np.int64), np.zeros((n, b), np.int64)
    free = np.full((n, b), T, np.int64)  # b rows always suffice
    for j in np.argsort(-need, axis=1, kind="stable").T:  # the i-th longest of each batch
        k = need[every, j]
        r = np.argmax(free >= k[:, None], axis=1)
        row[every, j] = np.where(k > 0, r, 0)
        offset[every, j] = np.where(k > 0, T - free[every, r], 0)
        free[every, r] -= k
    used = np.max(np.where(need > 0, row + 1, 0), axis=1)
    return (row, offset, used) if np.ndim(lengths) == 2 else (row[0], offset[0], int(used[0]))


def num_rows(needed: int, b: int) -> int:
    """``needed`` rounded up to a multiple of ``ceil(b / MAX_SHAPES)``, at most ``b``."""
    step = -(-b // MAX_SHAPES)
    return min(b, max(step, -(-needed // step) * step))


def batches(arrays: Arrays, take: np.ndarray, real: np.ndarray,
            packed: tuple[np.ndarray, int] | None = None) -> Arrays:  # fmt: skip
    """The examples ``take [n, b]`` (rows of ``arrays``; ``real [n, b]`` False for padding)
    as ``n`` batches: padded (every array ``[n, b, ...]``) or, with ``packed = (lengths,
    T)``, packed by :func:`pack`. Both carry ``"mask" [n, b]``."""
    if packed is not None:
        return pack(arrays, *packed, take, real)
    out = {k: np.asarray(v)[take] for k, v in arrays.items()}
    out["mask"] = np.asarray(real, np.float32)
    return out


def pack(arrays: Arrays, lengths: np.ndarray, T: int, take: np.ndarray,
         real: np.ndarray) -> Arrays:  # fmt: skip
    """Packed batches of the examples ``take [n, b]`` (rows of ``arrays``; ``real [n, b]``
    False for padding): ``[n, R, T]`` token arrays, ``[n, b]`` per-example arrays, one
    ``R`` for all ``n`` batches. ``lengths``: :func:`token_lengths` of ``arrays``."""
    take = np.asarray(take, np.int64)
    n, b = take.shape
    need = np.where(real, lengths[take], 0)
    row, offset, used = place(need, T)
    R = num_rows(int(used.max()), b)

    # One flat list of every real token: its batch, example, position, destination.
    per = need.reshape(-1)
    example = np.repeat(np.arange(n * b), per)
    position = np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
    batch = example // b
    dest = batch * R * T + np.repeat((row * T + offset).reshape(-1), per) + position
    source = take.reshape(-1)[example]

    out: Arrays = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        if k == "attention_mask":
            continue
        if v.ndim >= 2:  # token arrays [N, L, ...]
            flat = np.zeros((n * R * T, *v.shape[2:]), v.dtype)
            flat[dest] = v[source, position]
            out[k] = flat.reshape(n, R, T, *v.shape[2:])
        else:
            out[k] = v[np.where(real, take, 0)]
    segment = np.zeros(n * R * T, np.int32)
    segment[dest] = example % b + 1
    positions = np.zeros(n * R * T, np.int32)
    positions[dest] = position
    out["segment_ids"] = segment.reshape(n, R, T)
    out["positions"] = positions.reshape(n, R, T)
    out["starts"] = np.where(real, row * T + offset, 0).astype(np.int32)
    out["mask"] = np.asarray(real, np.float32)
    return out


def rows(packed: Arrays) -> int:
    """``R``, the rows per batch of packed batches."""
    return packed["segment_ids"].shape[1]


def pad_rows(packed: Arrays, R: int) -> Arrays:
    """Packed batches ``[n, R0, T]`` grown to ``R >= R0`` rows of padding (segment 0), which
    no example reads: the same batches as packed with ``R`` rows."""
    extra = R - rows(packed)
    if extra == 0:
        return packed
    grow = lambda v: np.pad(v, [(0, 0), (0, extra)] + [(0, 0)] * (v.ndim - 2))  # noqa: E731
    return {k: grow(v) if v.ndim >= 3 else v for k, v in packed.items()}
