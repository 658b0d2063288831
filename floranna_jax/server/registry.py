"""Every method by name, built once per run into a validated, jitted server step.

    ESTIMATORS[name](**hparams) -> Method                 # pure functions (server.method)
    server_ = build(name, **hparams)                      # once per run
    server_ = serve(method)                               # the same, for a built (wrapped) method
    server_.aggregate(uploads, weights, state) -> Aggregate   # validated, jitted, bytes added
    aggregate(name, clients, weights, **hparams) -> Aggregate # one call, for scripts and tests
                                                          # (built once per name and hparams)
    compare(labels, uploads, weights) -> {label: rho_rel}     # COMPARISONS on the same uploads
    section() -> ConfigDict                               # a run config's ``server`` defaults

Validation is eager, on concrete arrays, before anything compiles: unknown names and
hyperparameters, bad shapes, weights or NaNs raise ``ValueError`` naming the culprit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from ml_collections import config_dict

from floranna_jax.server import common
from floranna_jax.server.fedex import make_fedex
from floranna_jax.server.fedit import make_fedit
from floranna_jax.server.fedsa import make_fedsa
from floranna_jax.server.ffa import make_ffa
from floranna_jax.server.flora import make_flora
from floranna_jax.server.floranna import make_floranna
from floranna_jax.server.method import Method
from floranna_jax.server.svd import make_svd

ESTIMATORS: dict[str, Callable[..., Method]] = {
    "fedit": make_fedit,
    "ffa": make_ffa,
    "fedsa": make_fedsa,
    "flora": make_flora,
    "fedex": make_fedex,
    "svd": make_svd,
    "floranna": make_floranna,
}
# What ``compare=`` can also run on each round's uploads: label -> (name, hparams).
COMPARISONS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedit": ("fedit", {}),
    "svd": ("svd", {}),
    "floranna_layer": ("floranna", {"scope": "layer"}),
    "floranna_model": ("floranna", {"scope": "model"}),
}


def section() -> ml_collections.ConfigDict:
    """The ``server`` config section with its defaults: FLoRA-NA, one (a, b) per layer."""
    return ml_collections.ConfigDict(
        dict(
            name="floranna",  # estimator: fedit ffa fedsa flora fedex svd floranna
            scope="layer",  # floranna: one (a, b) per "layer" (fits best, same cost) or "model"
            target="weighted",  # floranna: fit sum p_u B_u A_u ("weighted") or 1/U ("uniform")
            combine="factors",  # floranna: combine raw "factors" or "deltas" from the global
            solver="adam",  # floranna: "adam" (AdamW, best iterate kept) or "als"
            steps=200,  # floranna: solver iterations
            learning_rate=1e-2,  # floranna: solver learning rate
            end_learning_rate=config_dict.placeholder(float),  # floranna: cosine decay to this
            weight_decay=0.0,  # floranna: solver weight decay
            compare=(),  # also log rho_rel of these on each round's uploads: COMPARISONS
        )
    )


def make(name: str, **hparams: Any) -> Method:
    """``ESTIMATORS[name](**hparams)``; unknown names or hparams raise with the valid ones."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; valid: {sorted(ESTIMATORS)}")
    common.check_hparams(name, ESTIMATORS[name], hparams)
    return ESTIMATORS[name](**hparams)


class Server(NamedTuple):
    """A method built for one run. ``aggregate(uploads, weights, state) -> Aggregate``
    validates its inputs, runs the method's estimator (jitted once, here) and adds the
    per-client bytes to the metrics, which come back on the host."""

    method: Method
    aggregate: Callable[..., common.Aggregate]


def build(name: str, **hparams: Any) -> Server:
    """The method ``name`` with its estimator jitted once; raises on bad names/hparams."""
    return serve(make(name, **hparams))


def serve(method: Method) -> Server:
    """``method`` (a :func:`make` result, possibly wrapped: ``server.dp``) with its
    estimator jitted once."""
    jitted = jax.jit(method.aggregate)

    def aggregate(uploads: Mapping, weights: Any, state: Any = None) -> common.Aggregate:
        uploads, shapes, U = common.validate_clients(uploads)
        p = common.validate_weights(weights, U)
        lora, merge, metrics = jitted(uploads, p, state)
        up, down = method.comm_bytes(shapes, U)
        metrics = {**_to_host(metrics), "bytes_up": float(up), "bytes_down": float(down)}
        return common.Aggregate(lora, merge, metrics)

    return Server(method, aggregate)


# Servers that :func:`aggregate` built, kept for later calls: each holds its jitted
# estimator, whose own cache then serves every shape it has seen. Bounded, so a script
# sweeping hyperparameters does not keep every compiled program alive.
AGGREGATE_CACHE_SIZE = 32


@functools.lru_cache(maxsize=AGGREGATE_CACHE_SIZE)
def _cached_build(name: str, key: tuple) -> Server:
    return build(name, **{k: v for k, _, v in key})


def _built(name: str, hparams: dict[str, Any]) -> Server:
    """``build(name, **hparams)``, reused across calls with equal hyperparameters (their
    types too: ``True`` is not ``1``); unhashable values build anew."""
    key = tuple(sorted((k, type(v), v) for k, v in hparams.items()))
    try:
        hash(key)
    except TypeError:
        return build(name, **hparams)
    return _cached_build(name, key)


def aggregate(name: str, clients: Mapping, weights: Any, **hparams: Any) -> common.Aggregate:
    """Validate, aggregate with estimator ``name``, add bytes: one call.

    The estimator compiles once per name, hyperparameters and input shapes (the last
    :data:`AGGREGATE_CACHE_SIZE` hyperparameter sets are kept), so calling this in a loop
    costs what ``build(name, **hparams).aggregate`` does. ``previous=`` (the last global
    adapter, layer -> {"A", "B"}) is the method state's history where the estimator uses
    one (floranna with ``combine="deltas"``): the state is ``method.init(previous, U)``.
    Raises ``ValueError`` on any bad input, before compiling.
    """
    previous = hparams.pop("previous", None)
    server_ = _built(name, hparams)
    state = None
    if previous is not None:
        _, shapes, U = common.validate_clients(clients)
        state = server_.method.init(common.validate_previous(previous, shapes), U)
    return server_.aggregate(clients, weights, state)


def check_comparisons(labels: tuple[str, ...]) -> None:
    """Unknown labels raise ``ValueError`` listing :data:`COMPARISONS`."""
    bad = [label for label in labels if label not in COMPARISONS]
    if bad:
        raise ValueError(f"unknown comparison(s) {bad}; valid: {', '.join(COMPARISONS)}")


def make_compare(labels: tuple[str, ...]) -> Callable[[Mapping, Any], dict[str, float]]:
    """``compare(uploads, weights) -> {label: rho_rel}`` of the :data:`COMPARISONS` named by
    ``labels``, each jitted once: estimators compared on identical client factors, free of
    the differences their own histories would cause."""
    check_comparisons(labels)
    servers = {label: build(COMPARISONS[label][0], **COMPARISONS[label][1]) for label in labels}

    def compare(uploads: Mapping, weights: Any) -> dict[str, float]:
        return {label: float(s.aggregate(uploads, weights).metrics["rho_rel"])
                for label, s in servers.items()}  # fmt: skip

    return compare


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
