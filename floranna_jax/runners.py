"""How many clients run at once, and on which devices: the runners of ``local_update``.

A runner (:func:`make_runner`) maps one client's ``local_update``
(:func:`floranna_jax.clients.make_local_update`) over ``U`` clients stacked along a leading
axis: ``jax.vmap`` with the base unbatched (``in_axes=None``), so every client reads the
same base buffer and XLA batches the base matmuls across clients. With a
:class:`jax.sharding.Mesh` whose axis is ``"clients"`` the stacked axis is sharded over
devices and the base replicated; ``U`` is padded to a multiple of the device count with
do-nothing clients and stripped after. ``chunk=k`` runs the vmapped clients ``k`` at a time
inside the same program (``lax.map`` with ``batch_size``), so the activation memory is that
of ``k`` clients whatever ``U`` is. ``mode="loop"`` runs the same jitted one-client function
client by client, for debugging and benchmarking. With a mesh spanning several processes
(``floranna_jax.distributed``) each process passes only its own rows of the stacked inputs
(:func:`local_rows`: its block of ``U`` padded to a multiple of the global device count; the
caller pads with do-nothing clients), they become one global array
(``jax.make_array_from_process_local_data``), the base is replicated (or, with a ``"model"``
axis, split over each process's own devices), and every process gets all rows of the outputs
back as numpy (an all-gather of the uploads).

Shapes: ``U`` clients stacked along the leading axis of every input but the base; a padded
client is one whose ``step_mask`` is all zero (its factors come back unchanged).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from floranna_jax import fsdp
from floranna_jax.clients import LocalUpdate
from floranna_jax.errors import BadValue

PyTree = Any

CLIENTS_AXIS = "clients"
MODES = ("vmap", "loop")


def make_mesh(num_devices: int | None = None, model_shards: int = 1) -> Mesh:
    """A mesh over the first ``num_devices`` of ``jax.devices()``, ordered by process, so
    each process holds one block of the clients axis: 1-D ``("clients",)``, or with
    ``model_shards > 1`` 2-D ``("clients", "model")`` whose model axis splits the base
    (:mod:`floranna_jax.fsdp`)."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are visible")
    if model_shards == 1:
        return Mesh(np.asarray(devices[:n]), (CLIENTS_AXIS,))
    if model_shards < 1 or n % model_shards:
        raise ValueError(f"model_shards={model_shards} does not divide {n} devices")
    grid = np.asarray(devices[:n]).reshape(n // model_shards, model_shards)
    return Mesh(grid, (CLIENTS_AXIS, fsdp.MODEL_AXIS))


def _pad_clients(tree: PyTree, pad: int, fill_zero: bool) -> PyTree:
    """Append ``pad`` clients: zeros (step masks) or copies of the last client (the rest)."""
    if pad == 0:
        return tree

    def pad_leaf(x):
        extra = jnp.zeros((pad, *x.shape[1:]), x.dtype) if fill_zero else jnp.repeat(x[-1:], pad, 0)
        return jnp.concatenate([x, extra])

    return jax.tree.map(pad_leaf, tree)


def _sharded(mapped: Callable, mesh: Mesh, stacked: tuple[str, ...] = ()) -> Callable:
    """``mapped`` with the client axis sharded on ``mesh`` and ``U`` padded to fit; the base
    split over the mesh's model axis if it has one (``fsdp.base_shardings``), else replicated."""
    if CLIENTS_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh needs an axis named {CLIENTS_AXIS!r}, has {mesh.axis_names}")
    n = mesh.shape[CLIENTS_AXIS]
    data = NamedSharding(mesh, P(CLIENTS_AXIS))

    def run(base, trainable, opt_state, batches, step_mask, keys):
        U = step_mask.shape[0]
        pad = -U % n
        rows = [_pad_clients(t, pad, False) for t in (trainable, opt_state, batches)]
        rows += [_pad_clients(step_mask, pad, True), _pad_clients(keys, pad, False)]
        base = jax.lax.with_sharding_constraint(base, fsdp.base_shardings(base, mesh, stacked))
        rows = jax.lax.with_sharding_constraint(rows, data)
        with fsdp.tracing(mesh):  # a model axis: gather the base one layer at a time
            out = mapped(base, *rows)
        out = jax.lax.with_sharding_constraint(out, data)
        return jax.tree.map(lambda x: x[:U], out)

    return run


def local_rows(U: int) -> np.ndarray:
    """The rows of the clients axis this process feeds: all ``U`` with one process; with
    several, its block of the axis padded to a multiple of the device count (rows ``>= U``
    are padding), for the mesh of every device (:func:`make_mesh`)."""
    if jax.process_count() == 1:
        return np.arange(U)
    per_process = -(-U // jax.device_count()) * jax.local_device_count()
    return jax.process_index() * per_process + np.arange(per_process)


def _from_processes(mapped: Callable, mesh: Mesh, stacked: tuple[str, ...] = ()) -> Callable:
    """``mapped`` sharded over ``mesh``, fed by every process with its own rows
    (:func:`local_rows`) of the stacked inputs; returns every row to every process, as numpy.
    The base is split over a model axis as with one process, and replicated without one."""
    data, replicated = NamedSharding(mesh, P(CLIENTS_AXIS)), NamedSharding(mesh, P())
    run = jax.jit(_sharded(mapped, mesh, stacked), out_shardings=replicated)  # gathers inside
    split = fsdp.MODEL_AXIS in mesh.axis_names

    def to_global(x):
        shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        return jax.make_array_from_process_local_data(data, np.asarray(x), shape)

    def runner(base, trainable, opt_state, batches, step_mask, keys):
        inputs = jax.tree.map(to_global, (trainable, opt_state, batches, step_mask))
        keys = jax.random.wrap_key_data(
            to_global(jax.random.key_data(keys)), impl=jax.random.key_impl(keys)
        )
        wanted = fsdp.base_shardings(base, mesh, stacked) if split else replicated
        out = run(fsdp.put(base, wanted), *inputs, keys)
        return jax.tree.map(np.asarray, out)

    return runner


def check_runner(mode: str, chunk: int, sharded: bool, split: bool = False) -> None:
    """Raise :class:`BadValue` for an unknown mode, a bad chunk, a runner that takes its
    clients one after another (``"loop"``, ``chunk > 0``) asked to spread them over devices
    (``sharded``), or a ``"loop"`` runner asked to split the base (``split``)."""
    if mode not in MODES:
        raise BadValue("mode", f"unknown {mode!r}; valid: {', '.join(MODES)}")
    if isinstance(chunk, bool) or not (isinstance(chunk, int) and chunk >= 0):
        raise BadValue("chunk", f"must be an int >= 0 (0: all clients at once), got {chunk!r}")
    if sharded and (mode == "loop" or chunk):
        raise BadValue("chunk", "loop and chunked runners use one device; use 0 to shard clients")
    if split and mode == "loop":
        raise BadValue("mode", "a split base runs vmapped clients; use vmap")


def make_runner(
    local_update: LocalUpdate,
    mode: str = "vmap",
    mesh: Mesh | None = None,
    chunk: int = 0,
    stacked: tuple[str, ...] = (),
):
    """Run ``local_update`` for ``U`` stacked clients; jitted once per input shapes.

    ``runner(base, trainable_U, opt_state_U, batches_U, step_mask_U, keys_U)`` ->
    ``(trainable_U, opt_state_U, metrics_U)``. Stacked trees have a leading ``[U]``
    axis; ``batches_U: [U, S, b, ...]``; ``step_mask_U: [U, S]``; ``keys_U: [U]`` typed
    keys; ``metrics_U: {"loss": [U], "steps": [U]}``. ``base`` is unbatched.

    Modes: ``"vmap"`` (optionally sharded over ``mesh``'s ``"clients"`` axis, or run
    ``chunk`` clients at a time when ``chunk > 0``) and ``"loop"`` (one jitted client call
    after another, single device). With a multi-process ``mesh`` the stacked inputs are this
    process's rows (:func:`local_rows`) and the outputs all rows, on every process. A
    mesh with a ``"model"`` axis splits the base over it (each process over its own
    devices), and may run ``chunk`` clients at a time if its clients axis is 1; ``stacked``
    names the base's top-level subtrees whose leading axis is the layer scan's.
    """
    split = mesh is not None and fsdp.MODEL_AXIS in mesh.axis_names
    spread = mesh is not None and mesh.shape[CLIENTS_AXIS] > 1
    check_runner(mode, chunk, sharded=spread or (mesh is not None and not split), split=split)
    if mode == "loop":
        return _loop_runner(jax.jit(local_update))
    if chunk:  # with a split base: on a mesh whose clients axis is 1, chunk after chunk
        chunked = _chunked(local_update, chunk)
        return jax.jit(_sharded(chunked, mesh, stacked) if split else chunked)
    mapped = jax.vmap(local_update, in_axes=(None, 0, 0, 0, 0, 0))
    if mesh is not None and mesh.is_multi_process:
        return _from_processes(mapped, mesh, stacked)
    return jax.jit(mapped if mesh is None else _sharded(mapped, mesh, stacked))


def sequential_passes(U: int, mode: str, chunk: int) -> int:
    """How many times a runner of ``mode``/``chunk`` (:func:`make_runner`) runs the ``S``
    local steps one after another for ``U`` clients: each client (``"loop"``), each chunk,
    or once (vmapped or sharded: a step of every client at once)."""
    if mode == "loop":
        return U
    return -(-U // chunk) if chunk else 1


def _chunked(local_update: LocalUpdate, chunk: int) -> Callable:
    """Clients ``chunk`` at a time: ``lax.map`` over chunks, ``vmap`` within one."""

    def run(base, trainable, opt_state, batches, step_mask, keys):
        def one(xs):
            return local_update(base, *xs)

        return jax.lax.map(one, (trainable, opt_state, batches, step_mask, keys), batch_size=chunk)

    return run


def _loop_runner(one_client: Callable) -> Callable:
    def run(base, trainable, opt_state, batches, step_mask, keys):
        outs = []
        for u in range(step_mask.shape[0]):
            client = jax.tree.map(lambda x, u=u: x[u], (trainable, opt_state, batches))
            outs.append(one_client(base, *client, step_mask[u], keys[u]))
        return stack(outs)

    return run


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack same-structured pytrees along a new leading client axis ``[U, ...]``."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def broadcast(tree: PyTree, U: int) -> PyTree:
    """``U`` copies of ``tree`` along a leading axis (the global state sent to ``U`` clients)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (U, *jnp.shape(x))), tree)
