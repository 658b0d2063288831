"""What every server estimator shares: its types, input validation, layer stacking, bytes.

Notation mirrors METHOD.md: ``U`` clients, rank ``r``, one adapted layer
``B: [d_out, r]``, ``A: [r, d_in]``, client weights ``p_u``.

Clients arrive as ``layer_name -> {"A": [U, r, d_in], "B": [U, d_out, r]}``. Inside the
jitted estimators, layers of equal shape form a group (:func:`group_layers`); their
small ``r x r`` results are stacked along a leading layer axis ``L`` so that one batched
einsum / eigh / scan serves them all, while the large factors are read layer by layer.
The grouping is decided from static shapes at trace time, so it costs no retrace.

Validation (:func:`validate_clients`, :func:`validate_weights`) is eager, on concrete
arrays, and runs before anything is compiled: bad input raises ``ValueError`` naming
the layer, the factor or the parameter.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from floranna_jax.errors import BadValue

Clients = dict[str, dict[str, jax.Array]]  # layer -> {"A": [U, r, d_in], "B": [U, d_out, r]}
Lora = dict[str, dict[str, jax.Array]]  # layer -> {"A": [r, d_in], "B": [d_out, r]}
Shapes = dict[str, tuple[int, int, int]]  # layer -> (d_out, d_in, r)

BYTES_PER_NUMBER = 4  # float32 on the wire


class Aggregate(NamedTuple):
    """One server step's result.

    lora:    layer -> {"A": [r, d_in], "B": [d_out, r]}, the global factors to broadcast.
    merge:   layer -> [d_out, d_in] in ``B @ A`` units (before the LoRA scale), what the
             method folds into the frozen weight (flora, fedex); ``{}`` otherwise.
    metrics: "rho", "rho_rel", "rho_svd", "rho_per_layer", "bytes_up", "bytes_down", plus
             estimator-specific entries (see each module).
    """

    lora: Lora
    merge: dict[str, jax.Array]
    metrics: dict[str, Any]


def factor_bytes(shapes: Shapes, per_layer: Callable[[int, int, int], int]) -> int:
    """``4 * sum over layers of per_layer(d_out, d_in, r)`` numbers, in bytes."""
    return BYTES_PER_NUMBER * sum(per_layer(*s) for s in shapes.values())


def fedit_bytes(shapes: Shapes, U: int) -> tuple[int, int]:
    """One rank-r adapter each way: ``r (d_in + d_out)`` numbers per layer, up and down."""
    n = factor_bytes(shapes, lambda do, di, r: r * (di + do))
    return n, n


# ----------------------------------------------------------------------------- hparams


def check_hparams(name: str, factory: Callable[..., Any], hparams: Mapping[str, Any]) -> None:
    """Unknown hyperparameters raise ``ValueError`` listing the valid ones."""
    valid = sorted(inspect.signature(factory).parameters)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise BadValue(
            unknown[0],
            f"unknown hyperparameter(s) {unknown} for estimator {name!r}; valid: {valid}",
        )


def check_choice(param: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise BadValue(param, f"{param}={value!r} is not valid; choose one of {list(choices)}")


# ----------------------------------------------------------------------------- validation


def validate_clients(clients: Mapping[str, Mapping[str, Any]]) -> tuple[Clients, Shapes, int]:
    """Checks shapes and finiteness; returns float32 jax arrays, ``shapes`` and ``U``.

    Raises ``ValueError`` naming the layer (and ``A``/``B``) for: no layers, missing
    factors, wrong ranks, mismatched ``U`` or ``r`` between ``A`` and ``B`` or across
    layers, ``U = 0``, and NaN/Inf anywhere.
    """
    if not isinstance(clients, Mapping) or not clients:
        raise ValueError("clients must be a non-empty dict layer_name -> {'A', 'B'}")
    out: Clients = {}
    shapes: Shapes = {}
    U = None
    for name in sorted(clients):
        f = clients[name]
        if not isinstance(f, Mapping) or set(f) != {"A", "B"}:
            got = sorted(f) if isinstance(f, Mapping) else type(f).__name__
            raise ValueError(f"layer {name!r}: expected exactly keys ['A', 'B'], got {got}")
        A, B = jnp.asarray(f["A"], jnp.float32), jnp.asarray(f["B"], jnp.float32)
        if A.ndim != 3 or B.ndim != 3:
            raise ValueError(
                f"layer {name!r}: A must be [U, r, d_in] and B [U, d_out, r]; "
                f"got A{tuple(A.shape)} B{tuple(B.shape)}"
            )
        (Ua, r, d_in), (Ub, d_out, rb) = A.shape, B.shape
        if Ua != Ub or r != rb:
            raise ValueError(
                f"layer {name!r}: A{tuple(A.shape)} and B{tuple(B.shape)} disagree on U or r"
            )
        if Ua == 0:
            raise ValueError(f"layer {name!r}: U=0 clients, nothing to aggregate")
        if min(r, d_in, d_out) == 0:
            raise ValueError(f"layer {name!r}: empty factor A{A.shape} B{B.shape}")
        if U is not None and Ua != U:
            raise ValueError(f"layer {name!r}: has U={Ua} clients, other layers have U={U}")
        U = Ua
        out[name] = {"A": A, "B": B}
        shapes[name] = (d_out, d_in, r)
    ranks = {s[2] for s in shapes.values()}
    if len(ranks) > 1:
        raise ValueError(f"layers disagree on the rank r: {sorted(ranks)} ({shapes})")
    _check_finite(out)
    return out, shapes, U


@jax.jit
def _finite_flags(tree: Clients | Lora) -> dict[str, dict[str, jax.Array]]:
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)


def _check_finite(factors: Clients | Lora, what: str = "layer") -> None:
    """NaN never passes silently: one device call, then name the first bad layer/factor."""
    flags = jax.device_get(_finite_flags(factors))
    for name in sorted(flags):
        for k in ("A", "B"):
            if not flags[name][k]:
                raise ValueError(f"{what} {name!r}: factor {k} contains NaN or Inf")


def validate_weights(weights: Any, U: int) -> jax.Array:
    """``[U]`` non-negative, finite, not all zero -> normalized ``p`` (float32)."""
    w = np.asarray(weights, np.float64)
    if w.shape != (U,):
        raise ValueError(f"weights must have shape [U]=({U},), got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"weights contain NaN or Inf: {w}")
    if np.any(w < 0):
        raise ValueError(f"weights must be non-negative, got {w}")
    if not w.sum() > 0:
        raise ValueError("weights are all zero; at least one client needs a positive weight")
    return jnp.asarray(w / w.sum(), jnp.float32)


def validate_previous(previous: Any, shapes: Shapes) -> Lora:
    """The previous global adapter must match the clients' layers and shapes, finite."""
    if not isinstance(previous, Mapping) or set(previous) != set(shapes):
        got = sorted(previous) if isinstance(previous, Mapping) else type(previous).__name__
        raise ValueError(f"previous must be a dict with layers {sorted(shapes)}, got {got}")
    out = {}
    for name, (d_out, d_in, r) in shapes.items():
        A = jnp.asarray(previous[name]["A"], jnp.float32)
        B = jnp.asarray(previous[name]["B"], jnp.float32)
        if A.shape != (r, d_in) or B.shape != (d_out, r):
            raise ValueError(
                f"previous layer {name!r}: expected A{(r, d_in)} B{(d_out, r)}, "
                f"got A{tuple(A.shape)} B{tuple(B.shape)}"
            )
        out[name] = {"A": A, "B": B}
    _check_finite(out, "previous layer")
    return out


# ----------------------------------------------------------------------------- stacking


class LayerGroup(NamedTuple):
    """Layers of one shape, in sorted-name order: per-layer tuples, never one stacked copy.

    ``A[i]: [U, r, d_in]`` and ``B[i]: [U, d_out, r]`` are the caller's arrays as they are:
    at LLaMA-2-7B shapes a stacked copy of all clients' factors is 335 MB of memory
    traffic that no estimator needs, since each layer's Gram blocks read its own arrays.
    """

    names: tuple[str, ...]
    A: tuple[jax.Array, ...]
    B: tuple[jax.Array, ...]
    prev_A: tuple[jax.Array, ...] | None  # [r, d_in] previous global factors, if given
    prev_B: tuple[jax.Array, ...] | None  # [d_out, r]

    @property
    def r(self) -> int:
        return self.A[0].shape[1]

    @property
    def d_in(self) -> int:
        return self.A[0].shape[2]

    @property
    def d_out(self) -> int:
        return self.B[0].shape[1]


def group_layers(clients: Clients, previous: Lora | None = None) -> list[LayerGroup]:
    """Groups layers by shape (static, sorted by name); small results are stacked later."""
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name in sorted(clients):
        key = tuple(clients[name]["A"].shape) + tuple(clients[name]["B"].shape)
        by_shape.setdefault(key, []).append(name)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    groups = []
    for names in by_shape.values():
        A = tuple(f32(clients[n]["A"]) for n in names)
        B = tuple(f32(clients[n]["B"]) for n in names)
        pA = pB = None
        if previous is not None:
            pA = tuple(f32(previous[n]["A"]) for n in names)
            pB = tuple(f32(previous[n]["B"]) for n in names)
        groups.append(LayerGroup(tuple(names), A, B, pA, pB))
    return groups


def unstack(groups: list[LayerGroup], per_group: list[Any]) -> dict[str, Any]:
    """Per-layer results by name: ``per_group[i]`` is a pytree with leading axis ``L_i``."""
    out = {}
    for g, tree in zip(groups, per_group, strict=True):
        for i, name in enumerate(g.names):
            out[name] = jax.tree.map(lambda x, i=i: x[i], tree)
    return out


def weighted_mean(p: jax.Array, X: jax.Array) -> jax.Array:
    """``sum_u p_u X[u]`` for ``X [U, ...]`` -> ``[...]``."""
    return jnp.einsum("u,u...->...", p, X, precision=jax.lax.Precision.HIGHEST)


def normalize(weights: jax.Array) -> jax.Array:
    w = jnp.asarray(weights, jnp.float32)
    return w / jnp.sum(w)
