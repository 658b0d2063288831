"""The frozen base split over a ``"model"`` mesh axis (FSDP style), beside the clients axis.

With :func:`floranna_jax.runners.make_mesh` given ``model_shards=m > 1`` the mesh is 2-D,
``("clients", "model")``: clients are split over the first axis as before, and every
frozen leaf of the base over the second, on its largest axis that ``m`` divides (never the
stacked layer axis of a scanned family, so the layer scan still slices whole layers).
Each device then holds about ``1/m`` of the base; a leaf with no axis that ``m`` divides
stays replicated.

Inside the sharded runner (traced under :func:`tracing`) a decoder's layer scan gathers
each layer whole (:func:`gather_layer`, a replicated constraint on the layer's slice) and
splits each client's rows over the model axis (:func:`split_rows`), so the ``m`` devices
that share a client's base each compute their share of its rows with whole kernels, as
FSDP does. The gathered layer is never kept for the backward pass: the layer is
recomputed, gathering it again, whether or not ``model.remat`` is set (see
``models/decoder/modules.run_layers``). Encoders have no layer scan: their split base is
left to XLA's partitioner. So are the evaluation programs, which run outside the runner.
Clients run in chunks (``train.clients_per_chunk > 0``) on a mesh of ``m`` devices whose
clients axis is 1 (``train.client_mesh``). With several processes the clients axis spans
them and each process splits the base over ``m`` of its own devices (:func:`put`), so
every process addresses a whole copy of it and its other programs take host inputs and
give host outputs as with one process. A checkpoint loads straight into the split
(:func:`sharding_of`, ``models.load_pretrained(sharding=...)``), tensor by tensor.

Measured on 8 CPU devices (2 x 4 mesh), one vmapped client step of 4 clients, a random
LLaMA 128 wide, remat on (``python -m benchmarks.fsdp``), per device, in MB:

    layers  scheme                       arguments  temporaries  peak
    4       base replicated              6.09       3.19         9.35
    4       partitioner (before)         1.57       0.86         2.45
    4       one layer gathered at once   1.57       1.53         3.16
    8       base replicated              10.09      3.57         13.77
    8       partitioner (before)         2.61       0.95         3.60
    8       one layer gathered at once   2.61       1.71         4.43

One layer's kernels are 0.98 MB: the per-layer gather holds about one gathered layer more
than XLA's own choice (which splits each matmul with its kernel and all-gathers
activations instead), and its temporaries grow by 0.18 MB for 4 more layers (each layer's
input, kept for the backward pass). What it buys is a fixed communication pattern, one
gather of the weights per layer and pass whatever the batch, where the partitioner
gathers activations at every matmul, which grow with the rows and tokens of a step.

The evaluation is left to the partitioner, measured the same way (4 rows of 64 tokens for
the forward; 16 tokens generated after 32), temporaries per device in MB:

    layers  program   replicated  partitioner  one layer gathered at once
    4       forward   2.23        0.73         1.37
    4       generate  5.51        1.55         2.33
    8       forward   2.24        0.73         1.40
    8       generate  9.74        2.66         3.35

Gathering (the forward and the prefill traced under :func:`tracing`) holds about one
gathered layer more and buys nothing a forward pass needs: no backward pass, and decoding
reads each weight once per token, where gathering it would move the whole base per token.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
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


def sharding_of(mesh: Mesh, stacked: tuple[str, ...] = ()) -> Callable[..., NamedSharding]:
    """``(path, shape) -> NamedSharding`` of one base leaf, ``path`` its keys from the top:
    split over ``mesh``'s ``"model"`` axis by :func:`leaf_spec`, replicated over the rest;
    leaves under the top-level keys in ``stacked`` keep their leading layer axis whole.
    What a checkpoint loads into, tensor by tensor (``models.load_pretrained``)."""
    shards = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)).get(MODEL_AXIS, 1)

    def one(path: tuple[str, ...], shape: tuple[int, ...]) -> NamedSharding:
        top = path[0] if path else None
        return NamedSharding(mesh, leaf_spec(tuple(shape), shards, top in stacked))

    return one


def base_shardings(base: PyTree, mesh: Mesh, stacked: tuple[str, ...] = ()) -> PyTree:
    """:func:`sharding_of` for every leaf of ``base`` (arrays or shape structs)."""
    of = sharding_of(mesh, stacked)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: of(tuple(getattr(k, "key", None) for k in path), leaf.shape), base
    )


def _put(x, sharding: jax.sharding.Sharding):
    """Leaf ``x`` on ``sharding``: as it is when it is there already; moved when this
    process addresses every device of ``sharding``; else (several processes, each holding
    the same whole leaf) each process gives its own devices their slices, unchecked
    (``device_put`` would compare the leaf across processes, one collective each)."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put(tree: PyTree, shardings) -> PyTree:
    """``tree`` leaf by leaf on ``shardings`` (a tree like it, or one sharding for all)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: _put(x, shardings), tree)
    return jax.tree.map(_put, tree, shardings)


def place(base: PyTree, mesh: Mesh, stacked: tuple[str, ...] = ()) -> PyTree:
    """``base`` moved leaf by leaf into :func:`base_shardings`: each device keeps its slices.
    Shape structs (an abstract base, what a plan compiles) get the sharding instead."""
    shardings = base_shardings(base, mesh, stacked)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(base)):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), base, shardings
        )
    return put(base, shardings)


def device_bytes(x) -> int:
    """Bytes of array or shape struct ``x`` on one device: its shard when it is split."""
    sharding = getattr(x, "sharding", None)
    shape = x.shape if sharding is None else sharding.shard_shape(x.shape)
    return math.prod(shape) * jax.numpy.dtype(x.dtype).itemsize


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
