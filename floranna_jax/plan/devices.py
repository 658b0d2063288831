"""The devices a plan can be made for: memory and peak bf16 FLOP/s of one device.

``parse("8xh100-80gb") -> (DEVICES["h100-80gb"], 8)``. Figures are the vendors' public
spec sheets, dense bf16 (without the 2:4 sparsity that doubles NVIDIA's headline figure):

- NVIDIA H100 SXM5 80 GB: 989 TFLOP/s (H100 Tensor Core GPU datasheet, "BF16 Tensor
  Core 1,979 teraFLOPS" with sparsity);
- NVIDIA H200 SXM 141 GB: 989 TFLOP/s (H200 datasheet, same Tensor Cores as H100);
- NVIDIA A100 SXM 80 GB: 312 TFLOP/s (A100 datasheet, "BF16 Tensor Core 312 | 624*");
- Google Cloud TPU v5e: 16 GB HBM, 197 TFLOP/s per chip (cloud.google.com/tpu/docs/v5e);
- Google Cloud TPU v5p: 95 GB HBM, 459 TFLOP/s per chip (cloud.google.com/tpu/docs/v5p).

Memory is the nominal size in GB (10^9 bytes), a little under what the chips carry (an
"80 GB" H100 holds 80 GiB), which leaves room for the runtime's own buffers. JAX on a GPU
preallocates 75% of the memory unless ``XLA_PYTHON_CLIENT_MEM_FRACTION`` says more (0.95
is a sound choice for a run that the plan says fits). ``cpu`` is this host's RAM, with no
peak figure (a plan for it gives no round time).
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from floranna_jax.errors import ConfigError

GB = 10**9


class Device(NamedTuple):
    """One device: ``memory_bytes`` it holds, ``peak_flops`` bf16 per second (None:
    unknown), its ``name`` in ``--plan`` and its jax ``backend`` (what ``"auto"`` settings
    such as ``model.base_dtype`` resolve for)."""

    name: str
    memory_bytes: int
    peak_flops: float | None
    backend: str = "gpu"


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


DEVICES: dict[str, Device] = {
    "cpu": Device("cpu", _host_memory(), None, "cpu"),
    "h100-80gb": Device("h100-80gb", 80 * GB, 989e12),
    "h200-141gb": Device("h200-141gb", 141 * GB, 989e12),
    "a100-80gb": Device("a100-80gb", 80 * GB, 312e12),
    "tpu-v5e": Device("tpu-v5e", 16 * GB, 197e12, "tpu"),
    "tpu-v5p": Device("tpu-v5p", 95 * GB, 459e12, "tpu"),
}
_SPEC = re.compile(r"^(?:(?P<count>[0-9]+)x)?(?P<name>[a-z0-9-]+)$")


def parse(text: str) -> tuple[Device, int]:
    """``"h100-80gb"`` or ``"8xh100-80gb"`` -> ``(Device, count)``; anything else raises
    :class:`ConfigError` naming the valid devices."""
    m = _SPEC.match(text.strip().lower())
    if m is None or m["name"] not in DEVICES or int(m["count"] or 1) < 1:
        raise ConfigError(
            f"--plan={text}: unknown device; valid: {', '.join(DEVICES)}, optionally with a "
            "count (8xh100-80gb)"
        )
    return DEVICES[m["name"]], int(m["count"] or 1)
