"""One compiled program measured: ``measure(program, held) -> Figures``.

The program is traced and compiled ahead of time (``fn.trace(*args).lower().compile()``)
for the backend this process runs on. ``memory_analysis()`` gives its arguments, outputs
(less what aliases an argument) and temporaries per device, :mod:`.flops` its FLOPs.
"""

from __future__ import annotations

from typing import NamedTuple

from floranna_jax.plan import flops
from floranna_jax.plan.devices import GB
from floranna_jax.tasks import Program


class Figures(NamedTuple):
    """One program measured, per device: bytes and FLOPs (whole program) per call."""

    name: str
    calls: int
    arguments: int
    outputs: int
    temporaries: int
    held: int
    flops: int

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs + self.temporaries + self.held


def measure(program: Program, held: int = 0) -> Figures:
    """Compile ``program`` ahead of time on this backend and read its figures."""
    traced = program.fn.trace(*program.args)
    memory = traced.lower().compile().memory_analysis()
    return Figures(
        program.name, program.calls, memory.argument_size_in_bytes,
        memory.output_size_in_bytes - memory.alias_size_in_bytes, memory.temp_size_in_bytes,
        held, flops.count(traced.jaxpr, program.loop_trips),
    )  # fmt: skip


def gb(n: float) -> str:
    """Bytes in GB (10^9), or in MB or kB below 1 GB."""
    for unit, size in (("GB", GB), ("MB", 10**6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"
