"""The machine a benchmark ran on, recorded beside its figures."""

from __future__ import annotations

import os
import pathlib
import platform

import jax


def describe() -> dict:
    """CPU model, cores visible to this process, JAX backend, devices, versions, load."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "jax": jax.__version__,
        "platform": platform.platform(),
        "load_avg_1m_at_start": os.getloadavg()[0],
    }
