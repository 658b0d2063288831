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
varies is ``R``. Shapes stay static: ``R`` is the most rows any batch of the call needs,
rounded up to a multiple of ``ceil(b / 16)``, so at most 16 programs per ``b`` are ever
compiled, and ``R <= b`` (one example per row, never worse than padding).

``T`` is decided once per run, by :func:`decide` (:class:`Rows`, held by the run's
``experiment.Experiment``): the round, the evaluators and every Flower client (which
packs its own rows with the ``T`` the server sends) use it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

Arrays = dict[str, np.ndarray]
MAX_SHAPES = 16  # distinct row counts a batch size can compile to


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


def layout(arrays: Arrays, T: int | None = None) -> tuple[np.ndarray, int]:
    """``(lengths [N], T)``: what :func:`batches` needs to pack rows of ``arrays``;
    ``T``: the run's row length (:class:`Rows`), else that of ``arrays`` alone."""
    lengths = token_lengths(arrays)
    return lengths, T or row_length(lengths, np.shape(arrays["attention_mask"])[1])


class Rows(NamedTuple):
    """Tokens per packed row ``T`` of a run's training split (client batches and the
    clients' held-out rows, which are training rows) and of its validation split; ``None``:
    padded rows (``data.packing`` off)."""

    train: int | None
    validation: int | None


def decide(packed: bool, train: Arrays, validation: Arrays | None) -> Rows:
    """The run's :class:`Rows`: each split's longest example rounded up to 16 tokens
    (:func:`row_length`) when ``packed``, else padded."""
    if not packed:
        return Rows(None, None)
    T = lambda a: None if a is None else layout(a)[1]  # noqa: E731
    return Rows(T(train), T(validation))


def place(lengths: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray, int]:
    """First-fit decreasing: ``(row [b], offset [b], rows used)`` for examples of
    ``lengths`` (0: a padded example, placed nowhere: row 0, offset 0) in rows of ``T``."""
    b = len(lengths)
    row, offset = np.zeros(b, np.int64), np.zeros(b, np.int64)
    free = np.full(b, T, np.int64)  # b rows always suffice
    used = 0
    for j in np.argsort(-lengths, kind="stable"):
        n = lengths[j]
        if n == 0:
            break
        if n > T:
            raise ValueError(f"an example of {n} tokens does not fit a row of {T}")
        r = int(np.argmax(free >= n))
        row[j], offset[j] = r, T - free[r]
        free[r] -= n
        used = max(used, r + 1)
    return row, offset, used


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
    placed = [place(need[i], T) for i in range(n)]
    R = num_rows(max(p[2] for p in placed), b)
    row = np.stack([p[0] for p in placed])
    offset = np.stack([p[1] for p in placed])

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
