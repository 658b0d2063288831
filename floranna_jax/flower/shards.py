"""Each client's own data on its own disk: one ``.npz`` file per client.

In a real federation every site already holds its data; for a local federation (and the
tests) :func:`write` splits the config's task exactly as an in-process run does
(``experiment.load_data``) and writes client ``u``'s rows to ``client_<u>.npz``: its
training rows (in the in-process order) as ``train/<key>``, its held-out rows as
``holdout/<key>`` (with ``holdout/row``, their indices in the task's training split:
``tasks.task.ROW_KEY``) and its id as ``client_id``. A SuperNode names its file in its node
config (``data-path``); the server never sees or ships a partition. A generation task's
arrays hold tokens only: its client reads the problems' texts it scores (answers, tests)
from the config's data by those indices.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from floranna_jax import experiment
from floranna_jax.errors import ConfigError, first_line
from floranna_jax.tasks.task import ROW_KEY

Arrays = dict[str, np.ndarray]


class Shard(NamedTuple):
    """One client's data: its id in the federation and its train / holdout arrays."""

    client_id: int
    train: Arrays
    holdout: Arrays


def path(out_dir: str, client_id: int) -> str:
    return os.path.join(out_dir, f"client_{client_id}.npz")


def write(config, out_dir: str) -> list[str]:
    """Write every client's shard of ``config``'s data into ``out_dir``; the paths."""
    _, train, _, part = experiment.load_data(config)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for u, (rows, held) in enumerate(zip(part.train, part.holdout, strict=True)):
        arrays = {f"train/{k}": v[rows] for k, v in train.items()}
        arrays |= {f"holdout/{k}": v[held] for k, v in train.items()}
        arrays[f"holdout/{ROW_KEY}"] = np.asarray(held, np.int64)
        paths.append(path(out_dir, u))
        np.savez(paths[-1], client_id=np.int64(u), **arrays)
    return paths


def load(file: str, field: str = "data-path") -> Shard:
    """The shard in ``file``; a missing or malformed file is one ``ConfigError`` naming
    ``field`` (the node config key that gave the path)."""
    try:
        with np.load(file) as z:
            data = {k: z[k] for k in z.files}
        client_id = int(data.pop("client_id"))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"node config {field}: cannot read a client shard from {file!r}: {first_line(e)}"
        ) from e
    part = {s: {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith(s + "/")}
            for s in ("train", "holdout")}  # fmt: skip
    if not part["train"]:
        raise ConfigError(f"node config {field}: {file!r} holds no train/* arrays")
    return Shard(client_id, part["train"], part["holdout"])


def num_examples(shard: Shard) -> int:
    return len(next(iter(shard.train.values())))
