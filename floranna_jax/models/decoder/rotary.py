"""Rotary position embeddings: which frequencies a config asks for, computed as transformers does.

A config names its rotary base and scaling in one of three places: transformers 5's
``rope_parameters = {"rope_theta", "rope_type", ...}``, the older top-level ``rope_theta``
with ``rope_scaling`` (null, or ``{"type"|"rope_type", ...}``), or, for Gemma 3, one such
dict per layer type (``rope_parameters = {"full_attention": {...}, "sliding_attention":
{...}}``; older files: ``rope_theta``, ``rope_local_base_freq`` and ``rope_scaling`` for the
full layers). :func:`parse` reads one of them into a hashable :class:`Rope`;
:func:`inv_freq` gives its ``[hd / 2]`` frequencies.

Scalings implemented: ``default``; ``linear`` (every frequency divided by ``factor``:
Gemma 3's global layers); ``llama3`` (Llama 3.1/3.2: low frequencies divided by
``factor``, high ones kept, a smooth blend between). Others (``yarn``, ``longrope``,
``dynamic``) raise ``ValueError`` naming the type.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

DEFAULT_THETA = 10_000.0  # transformers' default_theta
SCALINGS = ("default", "linear", "llama3")


class Rope(NamedTuple):
    """One rotary table: base ``theta`` and scaling ``kind`` with its parameters."""

    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


def _number(params: dict, key: str, where: str) -> float:
    if key not in params:
        raise ValueError(f"{where} of rope_type {params.get('rope_type')!r} lacks {key!r}")
    return float(params[key])


def parse(params: dict | None, theta: float) -> Rope:
    """A :class:`Rope` from one rope dict (``rope_parameters`` or ``rope_scaling``; None is
    the default kind); ``theta``: the base when the dict does not name one."""
    params = params or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope_parameters must be a dict, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SCALINGS:
        raise ValueError(
            f"rope_type {kind!r} is not supported (only {', '.join(SCALINGS)}): "
            "its frequency scaling is not implemented"
        )
    partial = params.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    theta = float(params.get("rope_theta", theta))
    if kind == "default":
        return Rope(theta)
    factor = _number(params, "factor", "rope_parameters")
    if kind == "linear":
        return Rope(theta, kind, factor)
    return Rope(
        theta, kind, factor,
        low_freq_factor=_number(params, "low_freq_factor", "rope_parameters"),
        high_freq_factor=_number(params, "high_freq_factor", "rope_parameters"),
        original_max_positions=int(_number(params, "original_max_position_embeddings",
                                           "rope_parameters")),
    )  # fmt: skip


def from_config(hf_config: dict, default_theta: float = DEFAULT_THETA) -> Rope:
    """The single rotary table of a config (every family but Gemma 3)."""
    params = hf_config.get("rope_parameters") or hf_config.get("rope_scaling")
    if hf_config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"partial_rotary_factor={hf_config['partial_rotary_factor']} is not supported"
        )
    return parse(params, float(hf_config.get("rope_theta", default_theta)))


def per_layer_type(hf_config: dict, global_theta: float, local_theta: float) -> tuple[Rope, Rope]:
    """Gemma 3: ``(full_attention, sliding_attention)`` tables; the old top-level fields
    ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling`` (full layers) also read."""
    nested = hf_config.get("rope_parameters") or {}
    if "full_attention" in nested or "sliding_attention" in nested:
        return (parse(nested.get("full_attention"), global_theta),
                parse(nested.get("sliding_attention"), local_theta))  # fmt: skip
    full = parse(nested or hf_config.get("rope_scaling"),
                 float(hf_config.get("rope_theta", global_theta)))  # fmt: skip
    local = Rope(float(hf_config.get("rope_local_base_freq", local_theta)))
    return full, local


@functools.lru_cache(maxsize=32)
def inv_freq(head_dim: int, rope: Rope) -> np.ndarray:
    """``[hd / 2]`` float32 frequencies ``theta ** (-2k / hd)``, scaled, in float32 as
    transformers computes them (so a checkpoint's logits match to float32 rounding)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    freq = (np.float32(1.0) / np.power(np.float32(rope.theta), exponent)).astype(np.float32)
    if rope.kind == "linear":
        return (freq / np.float32(rope.factor)).astype(np.float32)
    if rope.kind == "llama3":
        return _llama3(freq, rope)
    return freq


def _llama3(freq: np.ndarray, rope: Rope) -> np.ndarray:
    """Llama 3.1 scaling: wavelengths above ``original / low_freq_factor`` are stretched by
    ``factor``, those below ``original / high_freq_factor`` kept, the band between blended
    linearly in ``original / wavelength``."""
    old, factor = rope.original_max_positions, rope.factor
    low, high = rope.low_freq_factor, rope.high_freq_factor
    wavelen = np.float32(2 * math.pi) / freq
    scaled = np.where(wavelen > old / low, freq / np.float32(factor), freq).astype(np.float32)
    smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
    blended = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, blended, scaled).astype(np.float32)
