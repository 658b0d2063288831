"""Round checkpoints: a thin wrapper over ``orbax.checkpoint.CheckpointManager``.

What is saved is the whole :class:`rounds.RoundState`: global factors and head, the
method's server state (FedSA's personal ``B``, FLoRA/FedEx merged base deltas), persistent
client optimizer states, the root key's data, the round number and the cumulative byte
counters. The frozen pretrained base is never saved: it is rebuilt from the config.

With several processes every process calls save and restore (Orbax coordinates them); the
state every process holds is the same, on its own devices, so it is handed to Orbax as
host numpy arrays, which one process writes and every process reads back.

A failed save or restore (a full disk, a damaged checkpoint) raises once, here. The first
Checkpointer installs two process-wide filters so that it is said only once: one drops the
failure tracebacks Orbax's worker threads log (absl logger), the other the "Event loop is
closed" reports its unfinished writes cause afterwards (``sys.unraisablehook``). Saves are
synchronous, since each is waited for anyway.

Restoring always passes a target (the freshly built state), because a restore without
one loses the pytree structure (NamedTuples come back as dicts or lists).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from floranna_jax.errors import WriteError, first_line


class _DropOrbaxThreadFailures(logging.Filter):
    """Drops the error records, with tracebacks, that Orbax's worker threads log when a
    read or write fails. The first failure reaches the caller as an exception, which says
    it once; the threads of the same save or restore that fail after it (a full disk fails
    them all) would each print another traceback, up to the end of the process."""

    def filter(self, record: logging.LogRecord) -> bool:
        failure = record.levelno >= logging.ERROR and record.exc_info is not None
        return not (failure and f"{os.sep}orbax{os.sep}" in record.pathname)


def _drop_closed_loop_callbacks(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A ``sys.unraisablehook`` that drops one harmless report and passes on the rest.

    When one write of a save fails, Orbax's event loop ends while TensorStore still
    completes the other writes; each completion then calls back into the closed loop, and
    Python reports ``RuntimeError: Event loop is closed`` as unraisable, a traceback apiece,
    at any time up to exit. The failure itself is raised once by :meth:`Checkpointer.save`.
    """

    def hook(unraisable) -> None:
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook.floranna_closed_loop = True
    return hook


def reason(e: BaseException) -> str:
    """An Orbax failure's first line, without the TensorStore spec it appends."""
    return first_line(e).split(" [tensorstore_spec=")[0]


def _portable(tree: Any) -> Any:
    """``tree`` as Orbax takes it: as it is with one process, host numpy with several (each
    process's arrays live on its own devices, which Orbax refuses to save)."""
    return tree if jax.process_count() == 1 else jax.tree.map(np.asarray, tree)


class Checkpointer:
    """``save(state)`` every ``every_rounds`` rounds (by ``state.round``), keep ``keep``.

    ``every_rounds=0`` disables saving; restoring still works.
    """

    def __init__(self, directory: str | os.PathLike, every_rounds: int, keep: int):
        if not getattr(sys.unraisablehook, "floranna_closed_loop", False):
            sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)
        absl = absl_logging.get_absl_logger()
        if not any(isinstance(f, _DropOrbaxThreadFailures) for f in absl.filters):
            absl.addFilter(_DropOrbaxThreadFailures())
        self.every_rounds = every_rounds
        # Synchronous with one process: save() waits for every write anyway, and a failed
        # write (a full disk) then raises here instead of in Orbax's background threads.
        # Several processes keep Orbax's asynchronous path, which coordinates them.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=jax.process_count() > 1
        )
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_round(self) -> int | None:
        """The round of the newest checkpoint, or None."""
        return self.manager.latest_step()

    def all_rounds(self) -> list[int]:
        """The rounds of every kept checkpoint, ascending."""
        return sorted(self.manager.all_steps())

    def save(self, state: Any, *, force: bool = False) -> bool:
        """Save ``state`` if its round is a multiple of ``every_rounds`` (or ``force``)."""
        r = int(state.round)
        due = self.every_rounds > 0 and r % self.every_rounds == 0
        if not (due or force) or r in self.manager.all_steps():
            return False
        try:
            self.manager.save(r, args=ocp.args.StandardSave(_portable(state._asdict())))
            self.manager.wait_until_finished()
        except Exception as e:  # Orbax wraps I/O failures (ENOSPC: RESOURCE_EXHAUSTED)
            # The unfinished round stays a temporary folder that restoring ignores.
            raise WriteError(
                f"{self.manager.directory}: saving round {r} failed: {reason(e)}"
            ) from e
        return True

    def restore(self, target: Any, round_: int | None = None) -> Any:
        """The state saved at ``round_`` (default: newest), with ``target``'s structure, or
        None when there is no checkpoint."""
        step = self.latest_round() if round_ is None else round_
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _portable(target._asdict()))
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return type(target)(**restored)

    def close(self) -> None:
        self.manager.close()
