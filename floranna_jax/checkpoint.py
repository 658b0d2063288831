"""Round checkpoints: a thin wrapper over ``orbax.checkpoint.CheckpointManager``.

What is saved is the whole :class:`rounds.RoundState`: global factors and head, the
method's server state (FedSA's personal ``B``, FLoRA/FedEx merged base deltas), persistent
client optimizer states, the root key's data, the round number and the cumulative byte
counters. The frozen pretrained base is never saved: it is rebuilt from the config.

With several processes every process calls save and restore (Orbax coordinates them); the
state every process holds is the same, on its own devices, so it is handed to Orbax as
host numpy arrays, which one process writes and every process reads back.

Restoring always passes a target (the freshly built state), because a restore without
one loses the pytree structure (NamedTuples come back as dicts or lists).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _portable(tree: Any) -> Any:
    """``tree`` as Orbax takes it: as it is with one process, host numpy with several (each
    process's arrays live on its own devices, which Orbax refuses to save)."""
    return tree if jax.process_count() == 1 else jax.tree.map(np.asarray, tree)


class Checkpointer:
    """``save(state)`` every ``every_rounds`` rounds (by ``state.round``), keep ``keep``.

    ``every_rounds=0`` disables saving; restoring still works.
    """

    def __init__(self, directory: str | os.PathLike, every_rounds: int, keep: int):
        self.every_rounds = every_rounds
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
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
        self.manager.save(r, args=ocp.args.StandardSave(_portable(state._asdict())))
        self.manager.wait_until_finished()
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
