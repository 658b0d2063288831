"""Server estimators: every aggregation rule of METHOD.md, chosen by name.

    ESTIMATORS[name](**hparams) -> Estimator(aggregate, comm_bytes)   # pure functions
    aggregate(name, clients, weights, **hparams) -> Aggregate          # validated, jitted

``clients``: layer -> {"A": [U, r, d_in], "B": [U, d_out, r]} (float32, jax or numpy);
``weights``: ``[U]`` non-negative, normalized inside (``p_u``). The result holds the
global factors ``lora``, the dense ``merge`` of flora/fedex (``{}`` otherwise, in ``B @ A``
units) and ``metrics``: rho, rho_rel, rho_svd, rho_svd_rel, rho_per_layer, bytes_up,
bytes_down, plus estimator-specific entries. Validation is eager, before compiling.

To add an estimator: one module with ``make_<name>(**hparams) -> Estimator``, one entry
below, one test file.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from floranna_jax.server.common import Aggregate, Estimator
from floranna_jax.server.common import check_hparams as _check_hparams
from floranna_jax.server.common import validate_clients as _validate_clients
from floranna_jax.server.common import validate_previous as _validate_previous
from floranna_jax.server.common import validate_weights as _validate_weights
from floranna_jax.server.fedex import make_fedex
from floranna_jax.server.fedit import make_fedit
from floranna_jax.server.fedsa import make_fedsa
from floranna_jax.server.ffa import make_ffa
from floranna_jax.server.flora import make_flora
from floranna_jax.server.floranna import make_floranna
from floranna_jax.server.svd import make_svd

ESTIMATORS = {
    "fedit": make_fedit,
    "ffa": make_ffa,
    "fedsa": make_fedsa,
    "flora": make_flora,
    "fedex": make_fedex,
    "svd": make_svd,
    "floranna": make_floranna,
}

__all__ = ["ESTIMATORS", "Aggregate", "Estimator", "aggregate", "make"]


def make(name: str, **hparams: Any) -> Estimator:
    """``ESTIMATORS[name](**hparams)``; unknown names or hparams raise with the valid ones."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; valid: {sorted(ESTIMATORS)}")
    _check_hparams(name, ESTIMATORS[name], hparams)
    return ESTIMATORS[name](**hparams)


@functools.lru_cache(maxsize=64)
def _compiled(name: str, frozen: tuple) -> tuple[Estimator, Any]:
    est = make(name, **dict(frozen))
    return est, jax.jit(est.aggregate)


def _jitted(name: str, hparams: dict[str, Any]) -> tuple[Estimator, Any]:
    bound = inspect.signature(ESTIMATORS[name]).bind(**hparams)
    bound.apply_defaults()  # equal effective hparams share one compiled program
    full = {k: v for k, v in bound.arguments.items() if k != "previous"}
    try:
        return _compiled(name, tuple(sorted(full.items())))
    except TypeError:  # an unhashable hparam (e.g. a typed PRNG key): no cache
        est = make(name, **hparams)
        return est, jax.jit(est.aggregate)


def _to_host(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Scalars -> Python floats/ints, arrays -> numpy (one transfer)."""
    out = {}
    for k, v in jax.device_get(dict(metrics)).items():
        if isinstance(v, Mapping):
            out[k] = {n: (float(x) if np.ndim(x) == 0 else np.asarray(x)) for n, x in v.items()}
        elif np.ndim(v) == 0:
            out[k] = v.item() if hasattr(v, "item") else v
        else:
            out[k] = np.asarray(v)
    return out


def aggregate(name: str, clients: Mapping, weights: Any, **hparams: Any) -> Aggregate:
    """Validate, aggregate with estimator ``name`` (jitted, cached per hparams), add bytes.

    ``previous=`` (the last global adapter, layer -> {"A", "B"}) is passed to the jitted
    function as an argument, not baked into it, where the estimator takes it (floranna).
    Raises ``ValueError`` on any bad input, before compiling.
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; valid: {sorted(ESTIMATORS)}")
    _check_hparams(name, ESTIMATORS[name], hparams)
    previous = hparams.pop("previous", None)
    est, fn = _jitted(name, hparams)
    clients, shapes, U = _validate_clients(clients)
    p = _validate_weights(weights, U)
    if previous is not None:
        previous = _validate_previous(previous, shapes)
    lora, merge, metrics = fn(clients, p, previous)
    up, down = est.comm_bytes(shapes, U)
    metrics = {**_to_host(metrics), "bytes_up": float(up), "bytes_down": float(down)}
    return Aggregate(lora, merge, metrics)
