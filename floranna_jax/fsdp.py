"""The frozen base split over a ``"model"`` mesh axis (FSDP style), beside the clients axis.

With :func:`floranna_jax.clients.make_mesh` given ``model_shards=m > 1`` the mesh is 2-D,
``("clients", "model")``: clients are split over the first axis as before, and every
frozen leaf of the base over the second, on its largest axis that ``m`` divides (never the
stacked layer axis of a scanned family, so the layer scan still slices whole layers).
Each device then holds about ``1/m`` of the base; a leaf with no axis that ``m`` divides
stays replicated. Inside the jitted round XLA's partitioner chooses how to use the slices:
measured on CPU (tests/test_fsdp.py), it splits each layer's matmuls with its kernel and
all-gathers activations inside the layer scan, and never gathers a kernel, not even one
layer's. Forcing FSDP's one gather per layer (a replicated constraint on the layer slice)
is not done: without remat the scan would keep every gathered layer as a residual.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MODEL_AXIS = "model"

PyTree = Any


def leaf_spec(shape: tuple[int, ...], shards: int, skip_first: bool) -> P:
    """The :class:`PartitionSpec` splitting ``shape`` over :data:`MODEL_AXIS` on its
    largest axis divisible by ``shards`` (ties: the later axis), skipping axis 0 when
    ``skip_first``; ``P()`` (replicated) when no axis fits."""
    axes = [i for i, n in enumerate(shape) if n % shards == 0 and not (skip_first and i == 0)]
    if shards == 1 or not axes:
        return P()
    best = max(axes, key=lambda i: (shape[i], i))
    return P(*(MODEL_AXIS if i == best else None for i in range(len(shape))))


def base_shardings(base: PyTree, mesh: Mesh, stacked: tuple[str, ...] = ()) -> PyTree:
    """A :class:`NamedSharding` per leaf of ``base`` (arrays or shape structs): split over
    ``mesh``'s ``"model"`` axis by :func:`leaf_spec`, replicated over the rest; leaves under
    the top-level keys in ``stacked`` keep their leading layer axis whole."""
    shards = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)).get(MODEL_AXIS, 1)

    def one(path, leaf):
        top = getattr(path[0], "key", None) if path else None
        return NamedSharding(mesh, leaf_spec(tuple(leaf.shape), shards, top in stacked))

    return jax.tree_util.tree_map_with_path(one, base)


def place(base: PyTree, mesh: Mesh, stacked: tuple[str, ...] = ()) -> PyTree:
    """``base`` moved leaf by leaf into :func:`base_shardings`: each device keeps its slices."""
    return jax.tree.map(jax.device_put, base, base_shardings(base, mesh, stacked))


def tracing(mesh: Mesh):
    """The context to trace a program under so that :func:`gather_layer` and
    :func:`split_rows` apply: ``mesh``'s abstract mesh when it has a model axis, else
    nothing. Only tracing reads it; the program itself carries the constraints."""
    if MODEL_AXIS not in mesh.axis_names:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def _model_mesh():
    """The abstract mesh being traced under when it has a model axis, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh if MODEL_AXIS in mesh.axis_names else None


def gathering() -> bool:
    """Whether layers are gathered here (traced under :func:`tracing` of a split mesh)."""
    return _model_mesh() is not None


def gather_layer(layer: PyTree) -> PyTree:
    """One layer's slice of the stacked base, whole on every device (inside the layer
    scan); unchanged outside :func:`tracing`. The optimization barrier keeps XLA from
    moving the gather's layout onto the whole stacked base: without it XLA:CPU copied every
    stacked leaf into the gather's layout once, outside the scan, which added 1/m of the
    base to the temporaries (measured on the tiny decoder of tests/test_fsdp.py)."""
    mesh = _model_mesh()
    if mesh is None:
        return layer
    whole = NamedSharding(mesh, P())
    layer = jax.lax.optimization_barrier(layer)
    return jax.lax.with_sharding_constraint(layer, jax.tree.map(lambda _: whole, layer))


def split_rows(x: jax.Array) -> jax.Array:
    """``x [R, ...]`` (a client's rows) split over the model axis on ``R``, so that the
    devices sharing a client's base each compute their share of its rows; unchanged
    outside :func:`tracing`."""
    mesh = _model_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(MODEL_AXIS)))
