"""What crosses the network in a Flower federation, and the checks on what comes back.

A trainable tree ``{"lora": {layer: {"A", "B"}}, "head": {...}}`` travels as one Flower
``ArrayRecord`` whose keys are leaf paths joined by ``|`` (layer names hold ``/``), e.g.
``lora|layer_0/attention/query|A``. Leaves the method calls ``private`` (FFA's frozen
``A``, FedSA's personal ``B``: ``server.Method.private``) are left out both ways; the
receiver fills them from a template tree (:func:`fill`).

:func:`check_update` is the server's gate: an upload with a missing or unexpected leaf,
another shape (another rank), another dtype or a non-finite value is rejected with one line
naming the leaf, and never reaches the aggregate; :func:`check_stats` gates a client's
evaluation statistics. :func:`message_bytes` measures a message
as Flower ships it: the summed contents of its object tree (each array, record and the
message itself, as pushed to and pulled from the SuperLink).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from floranna_jax.clients import path_names

SEP = "|"
PyTree = Any
Path = tuple[str, ...]


def leaves(tree: PyTree) -> dict[str, np.ndarray]:
    """``{"lora|layer|A": array, ...}``: every leaf of ``tree`` by its joined path."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {SEP.join(path_names(path)): np.asarray(x) for path, x in flat}


def to_record(tree: PyTree, keep: Callable[[Path], bool]) -> ArrayRecord:
    """The leaves of ``tree`` whose path ``keep`` accepts, as an ``ArrayRecord``."""
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in leaves(tree).items() if keep(split(k))}
    )


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{path: numpy array}`` of a received ``ArrayRecord``."""
    return {k: a.numpy() for k, a in record.items()}


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
    return check_update(from_record(content["update"]), expected)


def check_stats(content) -> str:
    """Why a client's evaluation reply ``content`` cannot be counted, or ``""``: it needs a
    non-empty ``stats`` record of finite counts and sums (``Evaluator.local_stats``)."""
    if "stats" not in content or not len(content["stats"]):
        return "the reply has no stats record"
    for k, v in from_record(content["stats"]).items():
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
    """Bytes Flower ships for the arrays of ``record`` whose path starts with ``prefix``."""
    return sum(_tree_bytes(a) for k, a in record.items() if split(k)[0] == prefix)


def _tree_bytes(obj) -> int:
    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())
