"""Several processes, one run: starting ``jax.distributed`` and what differs per process.

One process (``dist.mode="off"``, the default) calls nothing here but cheap checks. With
``"auto"`` (``jax.distributed.initialize()`` reads the cluster: a TPU pod slice, SLURM,
Open MPI, or ``JAX_COORDINATOR_ADDRESS`` and friends) or ``"explicit"`` (the address,
process count and id from the config), :func:`initialize` starts the runtime before
anything touches a device. From then on ``jax.devices()`` lists every device of every
process: the client runner shards the clients axis over all of them, each process feeding
only its own clients' batches (``runners.local_rows``), and every process gets all trained
uploads back, so the server step runs on each exactly as with one process and every
process ends a round with the same state. Only process 0 writes files (:func:`is_primary`);
every process takes part in saving and restoring checkpoints (Orbax coordinates them).
"""

from __future__ import annotations

import re

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from floranna_jax.errors import BadValue, first_line

MODES = ("off", "auto", "explicit")
_ADDRESS = re.compile(r"^\S+:\d{1,5}$")


def section() -> ml_collections.ConfigDict:
    """The ``dist`` config section with its defaults: one process."""
    return ml_collections.ConfigDict(
        dict(
            # "off": one process; "auto": jax.distributed detects a TPU pod slice, SLURM or
            # Open MPI job; "explicit": the three fields below
            mode="off",
            coordinator_address="",  # explicit: host:port of process 0's coordinator
            num_processes=1,  # explicit: processes in the run
            process_id=0,  # explicit: this process, 0 .. num_processes - 1
        )
    )


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check(mode: str, coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Raise :class:`BadValue` for an unknown mode or, with ``"explicit"``, a bad field."""
    if mode not in MODES:
        raise BadValue("mode", f"unknown value {mode!r}; valid: {', '.join(MODES)}")
    if mode != "explicit":
        return
    if not isinstance(coordinator_address, str) or not _ADDRESS.match(coordinator_address):
        raise BadValue(
            "coordinator_address", f"must be host:port (process 0), got {coordinator_address!r}"
        )
    if not _count(num_processes) or num_processes < 1:
        raise BadValue("num_processes", f"must be a positive integer, got {num_processes!r}")
    if not _count(process_id) or not 0 <= process_id < num_processes:
        raise BadValue(
            "process_id", f"must be an integer in [0, {num_processes - 1}], got {process_id!r}"
        )


def initialize(mode: str, coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Start ``jax.distributed`` as the ``dist`` section asks; nothing for ``"off"`` or when
    it already runs (a second run in the same process). Call before anything touches a
    device; a failure is a :class:`BadValue` for ``mode``."""
    check(mode, coordinator_address, num_processes, process_id)
    if mode == "off" or jax.distributed.is_initialized():
        return
    explicit = dict(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id,
    )  # fmt: skip
    try:
        jax.distributed.initialize(**(explicit if mode == "explicit" else {}))
    except (ValueError, RuntimeError, TypeError) as e:
        message = f"{mode!r}: jax.distributed.initialize failed: {first_line(e)}"
        if mode == "auto":
            message += (
                " (no TPU pod, SLURM or Open MPI job found; name the coordinator with "
                "dist.mode=explicit, dist.coordinator_address, num_processes and process_id)"
            )
        raise BadValue("mode", message) from e


def is_primary() -> bool:
    """True in the process that writes the run's files (process 0; the only one alone)."""
    return jax.process_index() == 0


def max_over_processes(n: int) -> int:
    """The largest ``n`` any process holds (``n`` itself with one process)."""
    if jax.process_count() == 1:
        return n
    return int(np.max(multihost_utils.process_allgather(np.asarray(n, np.int64))))
