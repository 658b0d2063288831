"""Compile a config's programs, measure them, and say whether they fit a device.

``make(config, device, count) -> Report``: every program of :mod:`.programs` is traced
and compiled ahead of time (``fn.trace(*args).lower().compile()``) for the backend this
process runs on, then measured: ``memory_analysis()`` gives its arguments, outputs
(less what aliases an argument) and temporaries per device, :mod:`.flops` its FLOPs.
Its peak is

    peak = arguments + outputs - aliased + temporaries + held,

``held`` what the run keeps beside it (:func:`.programs.held`). The report's last line
is ``plan: fits ...`` or ``plan: does not fit: <program> needs X GB of Y GB per device;
try <field>=<value>``, the first of :data:`KNOBS` that the config has and that can help.

Made on a CPU for an accelerator: arguments (the frozen base, the adapters, the batches)
and the autodiff residuals a step saves are the same on every backend. What differs is
one layer's transient: XLA:CPU computes bfloat16 matrix products in float32, so with
``model.compute_dtype=bfloat16`` a CPU plan's temporaries hold float32 copies an
accelerator does not make, and read high (an upper bound, by at most one layer's
activations in float32 per client at once).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from floranna_jax import train
from floranna_jax.plan import flops
from floranna_jax.plan import programs as programs_lib
from floranna_jax.plan.devices import GB, Device
from floranna_jax.tasks import Program

UTILIZATION = 0.4  # the round time assumes this share of the peak bf16 FLOP/s


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


class Report(NamedTuple):
    """``lines`` to print (the last one the verdict); ``fits``; ``worst`` the program
    with the highest peak."""

    lines: list[str]
    fits: bool
    worst: Figures


def measure(program: Program, held: int = 0) -> Figures:
    """Compile ``program`` ahead of time on this backend and read its figures."""
    traced = program.fn.trace(*program.args)
    memory = traced.lower().compile().memory_analysis()
    return Figures(
        program.name, program.calls, memory.argument_size_in_bytes,
        memory.output_size_in_bytes - memory.alias_size_in_bytes, memory.temp_size_in_bytes,
        held, flops.count(traced.jaxpr, program.loop_trips),
    )  # fmt: skip


def _gb(n: float) -> str:
    """Bytes in GB (10^9), or in MB or kB below 1 GB."""
    for unit, size in (("GB", GB), ("MB", 10**6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def _halved(value: int, fig: Figures, capacity: int) -> int:
    """``value`` scaled by the share of the temporaries that would fit, to a power of 2."""
    room = capacity - (fig.peak - fig.temporaries)
    if room <= 0 or value <= 1:
        return 0
    target = value * room / max(fig.temporaries, 1)
    return min(value // 2, 1 << max(0, int(math.floor(math.log2(max(target, 1))))))


# What can shrink a program, tried in order: (applies to a program?, field, new value or
# None when it cannot help).
Knob = tuple[Callable[[str], bool], str, Callable[..., object]]
KNOBS: list[Knob] = [
    (lambda name: name.startswith("client step"), "train.clients_per_chunk",
     lambda c, fig, cap: 1 if c.train.client_mode == "vmap" and c.train.clients_per_chunk != 1
     and c.train.clients_per_round > 1 else None),
    (lambda name: name.startswith("client step"), "client.batch_size",
     lambda c, fig, cap: _halved(c.client.batch_size, fig, cap) or None),
    (lambda name: name.startswith("server"), "train.clients_per_round",
     lambda c, fig, cap: c.train.clients_per_round // 2 or None),
    (lambda name: not name.startswith(("client step", "server", "merge")), "eval.batch_size",
     lambda c, fig, cap: _halved(c.eval.batch_size, fig, cap) or None),
]  # fmt: skip


def _has(config, field: str) -> bool:
    section, name = field.split(".")
    return section in config and name in config[section]


def suggestion(config, fig: Figures, capacity: int) -> str:
    """``try <field>=<value>`` from the first knob that the config has and that helps."""
    for applies, field, propose in KNOBS:
        if applies(fig.name) and _has(config, field):
            value = propose(config, fig, capacity)
            if value is not None:
                return f"try {field}={value}"
    return f"try a device with more memory (its arguments alone take {_gb(fig.arguments)})"


def _table(figs: list[Figures]) -> list[str]:
    rows = ["| program | calls | arguments | outputs | temporaries | held by the run | peak "
            "| GFLOP per call |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for f in figs:
        rows.append(f"| {f.name} | {f.calls} | {_gb(f.arguments)} | {_gb(f.outputs)} | "
                    f"{_gb(f.temporaries)} | {_gb(f.held)} | {_gb(f.peak)} | "
                    f"{f.flops / 1e9:,.1f} |")  # fmt: skip
    return rows


def _time(total_flops: float, device: Device, used: int) -> str:
    if device.peak_flops is None:
        return "no round time (no peak figure for a CPU)"
    seconds = total_flops / (UTILIZATION * device.peak_flops * used)
    return (f"{seconds:.3g} s at {UTILIZATION:.0%} of {used} x {device.peak_flops / 1e12:g} "
            "TFLOP/s")  # fmt: skip


def _header(config, run, progs, device: Device, count: int, used: int) -> list[str]:
    base = run.exp.model.base
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(base))
    dtypes = sorted({np.dtype(x.dtype).name for x in jax.tree.leaves(base)})
    s = progs.shapes
    packed = f", packed in {s['rows']} rows of {s['tokens']} tokens" if "rows" in s else ""
    lines = [
        f"plan: {config.server.name} on {config.data.task}, {run.exp.model.config['model_type']}"
        f" base of {params:.3g} parameters ({', '.join(dtypes)}), for {count} x "
        f"{device.name} ({_gb(device.memory_bytes)} each); compiled on "
        f"{jax.default_backend()} for {used} device(s)",
        f"round 1: {s['clients']} clients x {s['steps']} steps x {s['examples']} examples{packed}",
    ]
    if jax.default_backend() == "cpu" and config.model.compute_dtype != "float32":
        lines.append("note: compiled on a CPU: arguments and autodiff residuals are as on the "
                     "device; temporaries read high where XLA:CPU computes bfloat16 in "
                     "float32 (one layer's transient)")  # fmt: skip
    return lines


def make(config, device: Device, count: int = 1) -> Report:
    """The plan of ``config`` on ``count`` devices ``device`` (see the module)."""
    run = train.build(config, abstract=True)
    progs = programs_lib.programs(config, run)
    sharded = config.train.shard_clients and jax.device_count() > 1
    used = jax.device_count() if sharded else 1
    round_figs = [measure(p, progs.held[p.name]) for p in progs.round]
    eval_figs = [measure(p, progs.held[p.name]) for p in progs.evaluation]
    per_round = sum(f.flops * f.calls for f in round_figs)
    per_eval = sum(f.flops * f.calls for f in eval_figs)
    lines = _header(config, run, progs, device, count, used) + _table(round_figs + eval_figs)
    lines += [
        f"FLOPs per round: {per_round:.3g} (matrix products, forward and backward); "
        f"{_time(per_round, device, used)}",
        f"FLOPs per evaluation: {per_eval:.3g}; {_time(per_eval, device, used)}",
    ]
    worst = max(round_figs + eval_figs, key=lambda f: f.peak)
    fits = worst.peak <= device.memory_bytes
    if fits:
        lines.append(f"plan: fits: peak {_gb(worst.peak)} of {_gb(device.memory_bytes)} per "
                     f"device ({worst.name})")  # fmt: skip
    else:
        lines.append(f"plan: does not fit: {worst.name} needs {_gb(worst.peak)} of "
                     f"{_gb(device.memory_bytes)} per device; "
                     f"{suggestion(config, worst, device.memory_bytes)}")  # fmt: skip
    return Report(lines, fits, worst)
