"""What a config needs on a device, before anything is loaded: ``--plan=DEVICE``.

    python launch.py --config=configs/gsm8k.py --plan=h100-80gb

builds the run with an abstract frozen base (shapes from the model folder's config.json;
no weight is read, see ``train.build(abstract=True)``), the real tokenizer, data and
partition, compiles every program of a round and of an evaluation ahead of time at the
shapes round 1 runs with, and prints per device their arguments, outputs, temporaries,
what the run holds beside them and the peak, the FLOPs per round and a round time at
40% of the device's peak bf16 FLOP/s; its last line is ``plan: fits ...`` (exit 0) or
``plan: does not fit: <program> needs X GB of Y GB per device; try <field>=<value>``
(exit 2). On an accelerator, ``launch.py`` runs the same check (:func:`check`) before it
loads any weight.

Modules: ``devices`` (the table of devices), ``programs`` (a round's programs at their
shapes), ``flops`` (FLOPs of a jaxpr), ``report`` (compile, measure, verdict).
"""

from __future__ import annotations

import jax

from floranna_jax.plan.devices import DEVICES, Device, parse
from floranna_jax.plan.report import Report, make


class DoesNotFit(Exception):
    """The plan's verdict that a program exceeds the device; the message is its line."""


def local_device() -> Device:
    """The first device of this process, with the memory its allocator may use."""
    d = jax.devices()[0]
    stats = d.memory_stats() or {}
    if "bytes_limit" not in stats:
        raise ValueError(f"{d.device_kind} reports no memory limit; plan with --plan=DEVICE")
    return Device(d.device_kind, int(stats["bytes_limit"]), None, d.platform)


def check(config, device: Device | None = None) -> Report:
    """The plan of ``config`` on ``device`` (default: this process's own); raises
    :class:`DoesNotFit` with the verdict line when a program does not fit."""
    report = make(config, device or local_device())
    if not report.fits:
        raise DoesNotFit(report.lines[-1])
    return report


__all__ = ["DEVICES", "Device", "DoesNotFit", "Report", "check", "local_device", "make", "parse"]
