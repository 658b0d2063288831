"""Every task by name: ``get(name) -> Task`` over the task kinds in :data:`KINDS`."""

from __future__ import annotations

from floranna_jax.tasks import classification, generation
from floranna_jax.tasks.task import Task

KINDS = (classification, generation)  # each: NAMES, make(name) -> Task


def names() -> list[str]:
    return sorted(n for kind in KINDS for n in kind.NAMES)


def get(name: str) -> Task:
    """The task ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    for kind in KINDS:
        if kind.knows(name):
            return kind.make(name)
    raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(names())}")
