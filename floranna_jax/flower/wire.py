"""What crosses the network in a Flower federation, and the checks on what comes back.

A trainable tree ``{"lora": {layer: {"A", "B"}}, "head": {...}}`` travels as leaves keyed
by their paths joined by ``|`` (layer names hold ``/``), e.g. ``lora|layer_0/attention/query|A``,
packed into one Flower ``Array`` of bytes (:func:`pack`): Flower moves every array of a
message as objects of their own, one request each on every hop (SuperLink, SuperNode, its
ClientApp process and back), and a tree of 26 arrays spent about 2 s a round in those
requests on a loaded 2-core CPU. Leaves the method calls ``private`` (FFA's frozen ``A``,
FedSA's personal ``B``: ``server.Method.private``) are left out both ways; the receiver
fills them from a template tree (:func:`fill`).

:func:`check_update` is the server's gate: an upload with a missing or unexpected leaf,
another shape (another rank), another dtype or a non-finite value is rejected with one line
naming the leaf, and never reaches the aggregate; :func:`check_stats` gates a client's
evaluation statistics. :func:`message_bytes` measures a message
as Flower ships it: the summed contents of its object tree (each array, record and the
message itself, as pushed to and pulled from the SuperLink).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from floranna_jax.clients import path_names

SEP = "|"
PACKED = "leaves"  # the one Array of a packed record
PyTree = Any
Path = tuple[str, ...]


def leaves(tree: PyTree) -> dict[str, np.ndarray]:
    """``{"lora|layer|A": array, ...}``: every leaf of ``tree`` by its joined path."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {SEP.join(path_names(path)): np.asarray(x) for path, x in flat}


def to_record(tree: PyTree, keep: Callable[[Path], bool]) -> ArrayRecord:
    """The leaves of ``tree`` whose path ``keep`` accepts, packed (:func:`pack`)."""
    return pack({k: v for k, v in leaves(tree).items() if keep(split(k))})


def pack(values: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``values`` as an ``ArrayRecord`` of one uint8 ``Array`` (:data:`PACKED`): an 8-byte
    little-endian header length, a JSON header ``[[key, dtype, shape], ...]`` and each
    array's bytes in that order (C order). The same values give the same bytes."""
    arrays = {k: np.asarray(v) for k, v in values.items()}  # tobytes(): C order
    # dtype names, not numpy's codes: bfloat16's code is a raw "V2" (native byte order).
    header = json.dumps([[k, v.dtype.name, list(v.shape)] for k, v in arrays.items()]).encode()
    parts = [np.uint64(len(header)).astype("<u8").tobytes(), header,
             *(v.tobytes() for v in arrays.values())]  # fmt: skip
    return ArrayRecord({PACKED: Array(np.frombuffer(b"".join(parts), np.uint8))})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{path: numpy array}`` of a received record (:func:`pack`'s layout; an empty record
    holds none); ``ValueError`` saying what is wrong with a malformed one."""
    if not len(record):
        return {}
    if set(record) != {PACKED}:
        raise ValueError(f"a record of arrays {sorted(record)}, expected one {PACKED!r}")
    blob = record[PACKED].numpy().tobytes()
    try:
        size = int(np.frombuffer(blob[:8], "<u8")[0])
        entries = json.loads(blob[8 : 8 + size])
        out, offset = {}, 8 + size
        for key, dtype, shape in entries:
            dtype, shape = jnp.dtype(dtype), tuple(int(n) for n in shape)
            if not (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)):
                raise ValueError(f"{key} has dtype {dtype}, not numbers")
            end = offset + dtype.itemsize * int(np.prod(shape))
            if end > len(blob):
                raise ValueError(f"{key} runs past the end of the record")
            out[key] = np.frombuffer(blob[offset:end], dtype).reshape(shape)
            offset = end
        if offset != len(blob):
            raise ValueError(f"{len(blob) - offset} bytes after the last array")
    except (ValueError, IndexError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"malformed packed record: {e}") from e
    return out


def split(key: str) -> Path:
    return tuple(key.split(SEP))


def fill(template: PyTree, values: Mapping[str, np.ndarray]) -> PyTree:
    """``template`` with each leaf replaced by ``values[path]`` where present."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: values.get(SEP.join(path_names(path)), x), template
    )


def check_update(values: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> str:
    """Why an upload ``values`` cannot enter the aggregate, or ``""`` when it can.

    ``expected``: ``{path: array}`` of the leaves the client had to send (shapes, dtypes).
    """
    missing = sorted(set(expected) - set(values))
    if missing:
        return f"missing leaf {missing[0]}"
    unexpected = sorted(set(values) - set(expected))
    if unexpected:
        return f"unexpected leaf {unexpected[0]}"
    for k, want in expected.items():
        got = values[k]
        if got.shape != want.shape:
            return f"{k} has shape {got.shape}, expected {want.shape}{_rank_note(k, got, want)}"
        if got.dtype != want.dtype:
            return f"{k} has dtype {got.dtype}, expected {want.dtype}"
        if not np.all(np.isfinite(got)):
            return f"{k} has non-finite values"
    return ""


def check_reply(content, expected: Mapping[str, np.ndarray]) -> str:
    """Why a client's reply ``content`` (a ``RecordDict``) cannot enter the aggregate, or
    ``""``: it needs an ``update`` passing :func:`check_update` and ``metrics`` with a
    finite ``loss`` and ``num-examples >= 1``."""
    if "update" not in content or "metrics" not in content:
        return "the reply has no update or no metrics record"
    metrics = content["metrics"]
    for key in ("loss", "steps", "examples", "num-examples"):
        if key not in metrics:
            return f"metrics lack {key}"
    if not np.isfinite(metrics["loss"]):
        return f"non-finite training loss {metrics['loss']}"
    if not metrics["num-examples"] >= 1:
        return f"num-examples is {metrics['num-examples']}, expected >= 1"
    try:
        values = from_record(content["update"])
    except ValueError as e:
        return f"update: {e}"
    return check_update(values, expected)


def check_stats(content) -> str:
    """Why a client's evaluation reply ``content`` cannot be counted, or ``""``: it needs a
    non-empty ``stats`` record of finite counts and sums (``Evaluator.local_stats``)."""
    if "stats" not in content:
        return "the reply has no stats record"
    try:
        stats = from_record(content["stats"])
    except ValueError as e:
        return f"stats: {e}"
    if not stats:
        return "the reply's stats record is empty"
    for k, v in stats.items():
        if not np.all(np.isfinite(v)):
            return f"stats {k} has non-finite values"
    return ""


def _rank_note(key: str, got: np.ndarray, want: np.ndarray) -> str:
    """`` (rank 8, expected 4)`` for a LoRA factor of another rank; ``""`` otherwise."""
    path = split(key)
    if path[0] != "lora" or got.ndim != 2 or want.ndim != 2:
        return ""
    axis = 0 if path[-1] == "A" else 1
    if got.shape[axis] == want.shape[axis]:
        return ""
    return f" (rank {got.shape[axis]}, expected {want.shape[axis]})"


def message_bytes(message: Message) -> int:
    """Bytes of ``message`` as Flower ships it: the contents of every object in its tree."""
    return _tree_bytes(message)


def record_bytes(record: ArrayRecord, prefix: str) -> int:
    """Bytes of the arrays of the packed ``record`` whose path starts with ``prefix`` (their
    data in the shipped bytes; the header names them all)."""
    return sum(v.nbytes for k, v in from_record(record).items() if split(k)[0] == prefix)


def _tree_bytes(obj) -> int:
    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())
