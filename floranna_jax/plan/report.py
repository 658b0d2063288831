"""Plan a config: compile its programs, measure them, say whether they fit a device.

``make(config, device, count) -> Report``: every program of :mod:`.programs` is measured
(:mod:`.figures`: compiled ahead of time on this backend); a program's peak per device is

    peak = arguments + outputs - aliased + temporaries + held,

``held`` what the run keeps beside it (:func:`.programs.held`). The FLOPs per round are
those of the round's programs times their calls, the round time that at
:data:`UTILIZATION` of the devices' peak. The report's last line is ``plan: fits ...`` or
``plan: does not fit: <program> needs X GB of Y GB per device; try <field>=<value>``
(:mod:`.knobs`, planned again with the change).

Made on a CPU for an accelerator: arguments (the frozen base, the adapters, the batches)
and the autodiff residuals a step saves are the same on every backend; the transients
are not. XLA:CPU computes bfloat16 matrix products in float32: with
``model.compute_dtype=bfloat16`` it converts the stacked layer weights to bfloat16 and
back to float32 outside the layer loop, a fixed extra of about 1.5x the float32 layer
weights whatever the batch (measured: +0.59 GB on a 0.68 GB base at batch 2 and at
batch 8), where an accelerator makes at most the bfloat16 copy (0.5x). A CPU plan's
temporaries are then an upper bound of the accelerator's.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np

from floranna_jax import models, train
from floranna_jax.plan import knobs
from floranna_jax.plan import programs as programs_lib
from floranna_jax.plan.devices import Device
from floranna_jax.plan.figures import Figures, gb, measure

UTILIZATION = 0.4  # the round time assumes this share of the peak bf16 FLOP/s


class Report(NamedTuple):
    """``lines`` to print (the last one the verdict); ``fits``; ``worst`` the program
    with the highest peak."""

    lines: list[str]
    fits: bool
    worst: Figures


def _table(figs: list[Figures]) -> list[str]:
    rows = ["| program | calls | arguments | outputs | temporaries | held by the run | peak "
            "| GFLOP per call |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for f in figs:
        rows.append(f"| {f.name} | {f.calls} | {gb(f.arguments)} | {gb(f.outputs)} | "
                    f"{gb(f.temporaries)} | {gb(f.held)} | {gb(f.peak)} | "
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
    if s["micro"] > 1:
        packed = f" as {s['micro']} micro-batches of {s['examples'] // s['micro']}{packed} each"
    lines = [
        f"plan: {config.server.name} on {config.data.task}, {run.exp.model.config['model_type']}"
        f" base of {params:.3g} parameters ({', '.join(dtypes)}), for {count} x "
        f"{device.name} ({gb(device.memory_bytes)} each); compiled on "
        f"{jax.default_backend()} for {used} device(s)",
        f"round 1: {s['clients']} clients x {s['steps']} steps x {s['examples']} examples{packed}",
    ]
    shards = config.train.get("model_shards", 1)
    if shards > 1:
        lines.append(f"base split over {shards} devices (train.model_shards; a decoder's "
                     "gathered one layer at a time): arguments and held bytes are one "
                     "device's")  # fmt: skip
    if used < count:
        lines.append(f"note: the run trains on {used} of the {count} devices: clients are "
                     "sharded over devices only with train.shard_clients=True and "
                     "train.clients_per_chunk=0, the base with train.model_shards")  # fmt: skip
    if jax.default_backend() == "cpu" and config.model.compute_dtype != "float32":
        lines.append("note: compiled on a CPU: arguments and autodiff residuals are as on the "
                     "device; temporaries read high: XLA:CPU computes bfloat16 in float32 and "
                     "holds about 1.5x the float32 layer weights in converted copies, an "
                     "accelerator at most 0.5x")  # fmt: skip
    return lines


def for_device(config, device: Device):
    """``config`` with ``model.base_dtype="auto"`` resolved for ``device`` (bfloat16 on a GPU
    or TPU) rather than for this process's backend, which makes a plan on a CPU."""
    if config.model.get("base_dtype") != "auto":
        return config
    config = config.copy_and_resolve_references()
    config.model.base_dtype = models.resolve_base_dtype("auto", device.backend).name
    return config


def make(config, device: Device, count: int = 1) -> Report:
    """The plan of ``config`` on ``count`` devices ``device`` (see the module)."""
    config = for_device(config, device)
    run = train.build(config, abstract=True)
    progs = programs_lib.programs(config, run)
    mesh = train.client_mesh(config)
    used = 1 if mesh is None else mesh.devices.size
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
    every = round_figs + eval_figs
    index = max(range(len(every)), key=lambda i: every[i].peak)
    worst = every[index]
    fits = worst.peak <= device.memory_bytes
    if fits:
        lines.append(f"plan: fits: peak {gb(worst.peak)} of {gb(device.memory_bytes)} per "
                     f"device ({worst.name})")  # fmt: skip
    else:
        lines.append(f"plan: does not fit: {worst.name} needs {gb(worst.peak)} of "
                     f"{gb(device.memory_bytes)} per device; "
                     f"{knobs.suggest(config, index, worst, device.memory_bytes)}")  # fmt: skip
    return Report(lines, fits, worst)
