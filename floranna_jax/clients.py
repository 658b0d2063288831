"""What one client computes in a round, and how many clients are run at once.

A client starts from the broadcast global trainable tree (LoRA factors ``A``, ``B``
and any head) and takes ``E`` optimizer steps on its own data (:func:`make_local_update`,
a ``lax.scan`` over steps). The frozen base is an argument, never part of the carried
state, so it is neither differentiated nor stored in optimizer state.

The runner (:func:`make_runner`) maps that one-client function over ``U`` clients
stacked along a leading axis: ``jax.vmap`` with the base unbatched (``in_axes=None``),
so every client reads the same base buffer and XLA batches the base matmuls across
clients. With a :class:`jax.sharding.Mesh` whose axis is ``"clients"`` the stacked axis
is sharded over devices and the base replicated; ``U`` is padded to a multiple of the
device count with do-nothing clients and stripped after. ``chunk=k`` runs the vmapped
clients ``k`` at a time inside the same program (``lax.map`` with ``batch_size``), so the
activation memory is that of ``k`` clients whatever ``U`` is. ``mode="loop"`` runs the
same jitted one-client function client by client, for debugging and benchmarking.
With a mesh spanning several processes (``floranna_jax.distributed``) each process passes
only its own rows of the stacked inputs (:func:`local_rows`: its block of ``U`` padded to a
multiple of the global device count; the caller pads with do-nothing clients), they become
one global array (``jax.make_array_from_process_local_data``), the base is replicated (or,
with a ``"model"`` axis, split over each process's own devices), and every process gets all
rows of the outputs back as numpy (an all-gather of the uploads).

Shapes: ``U`` clients, ``S`` local steps (padded), ``b`` examples per step, as one batch
or as ``M`` micro-batches of ``b/M`` whose gradients make the step's one update. Unequal
clients are padded to ``S`` steps with ``step_mask`` (1 real, 0 padded); a padded
step leaves parameters and optimizer state bit-identical, and a padded client is a
client whose ``step_mask`` is all zero.

Randomness: the caller gives each client its dropout key (``keys.dropout_keys``); step
``t`` uses ``fold_in(key, t)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from floranna_jax import fsdp
from floranna_jax.errors import BadValue

PyTree = Any
LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array], jax.Array]
Frozen = Callable[[tuple[str, ...], jax.Array], bool] | PyTree | None
LocalUpdate = Callable[..., tuple[PyTree, PyTree, dict[str, jax.Array]]]

CLIENTS_AXIS = "clients"


def _adamw(learning_rate, weight_decay):
    return optax.adamw(learning_rate, weight_decay=weight_decay)


def _sgd(learning_rate, weight_decay):
    if weight_decay == 0.0:
        return optax.sgd(learning_rate)
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate))


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": _adamw,
    "sgd": _sgd,
}
MODES = ("vmap", "loop")


def make_optimizer(
    name: str, learning_rate: float, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """The client optimizer chosen by name from :data:`OPTIMIZERS` (``"adamw"``, ``"sgd"``).

    ``weight_decay`` is decoupled for AdamW and added to the gradient for SGD.
    """
    if name not in OPTIMIZERS:
        raise BadValue("optimizer", f"unknown {name!r}; valid: {', '.join(sorted(OPTIMIZERS))}")
    if not finite_float32(learning_rate) or not learning_rate > 0:
        raise BadValue(
            "learning_rate", f"must be a number > 0, finite in float32; got {learning_rate!r}"
        )
    if not finite_float32(weight_decay) or weight_decay < 0:
        raise BadValue(
            "weight_decay", f"must be a number >= 0, finite in float32; got {weight_decay!r}"
        )
    return OPTIMIZERS[name](learning_rate, weight_decay)


def finite_float32(value) -> bool:
    """A real number that float32, the dtype of every update, holds as a finite value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.float32(value)))


def path_names(path) -> tuple[str, ...]:
    """A jax key path as a tuple of str names, e.g. ``("lora", "layer_0/attention/query", "A")``."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            names.append(str(entry))
    return tuple(names)


def frozen_mask(frozen: Frozen, trainable: PyTree) -> PyTree:
    """Static bool tree shaped like ``trainable``: True where the leaf is frozen.

    ``frozen`` is None (nothing frozen), a callable ``(path, leaf) -> bool`` whose
    path is a tuple of str keys (e.g. ``("lora", "l0", "A")``), or a bool tree.
    """
    if frozen is None:
        return jax.tree.map(lambda _: False, trainable)
    if callable(frozen):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: bool(frozen(path_names(p), x)), trainable
        )
    return jax.tree.map(bool, frozen)


def _state_mask(opt: optax.GradientTransformation, state: PyTree, mask: PyTree) -> PyTree:
    """``mask`` copied onto every parameter-shaped tree inside ``state``; False elsewhere."""
    return optax.tree_utils.tree_map_params(
        opt,
        lambda _, m: m,
        state,
        mask,
        transform_non_params=lambda v: jax.tree.map(lambda _: False, v),
    )


def init_opt_state(opt: optax.GradientTransformation, trainable: PyTree) -> PyTree:
    """One client's optimizer state: ``opt.init(trainable)``.

    Frozen leaves keep a state slot, but :func:`make_local_update` never changes it,
    so the same state serves any ``frozen`` choice.
    """
    return opt.init(trainable)


def _select(keep_new: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


def _micro_grads(grad_fn, base, params, batches, key) -> tuple[jax.Array, PyTree]:
    """``(loss, grads)`` of one step whose batch comes as ``M`` micro-batches ``[M, b/M,
    ...]``, one after another in a ``lax.scan`` (activations of one micro-batch at a time).

    With ``(loss_k, w_k)`` the mean loss of micro-batch ``k`` and its weight (examples or
    tokens), the step's mean is ``sum_k w_k loss_k / sum_k w_k``, so its gradient is
    ``sum_k w_k grad loss_k / sum_k w_k``: the whole batch's gradient, summed in float32.
    Micro-batch ``k`` draws its dropout from ``fold_in(key, k)``.
    """

    def micro(acc, xs):
        batch, k = xs
        (loss, weight), grads = grad_fn(base, params, batch, jax.random.fold_in(key, k))
        total, grad_sum, weights = acc
        grad_sum = jax.tree.map(lambda s, g: s + weight * g, grad_sum, grads)
        return (total + weight * loss, grad_sum, weights + weight), None

    M = jax.tree.leaves(batches)[0].shape[0]
    zero = jnp.zeros((), jnp.float32)
    start = (zero, jax.tree.map(jnp.zeros_like, params), zero)
    (total, grad_sum, weights), _ = jax.lax.scan(
        micro, start, (batches, jnp.arange(M, dtype=jnp.int32))
    )
    weights = jnp.maximum(weights, 1.0)  # as the losses do: an all-padding batch is 0
    return total / weights, jax.tree.map(lambda g: g / weights, grad_sum)


def make_local_update(
    loss_fn: LossFn,
    opt: optax.GradientTransformation,
    frozen: Frozen = None,
    on_step: Callable[..., None] | None = None,
    micro_batched: bool = False,
) -> LocalUpdate:
    """Build ``local_update`` for ONE client: ``S`` masked optimizer steps in a ``lax.scan``.

    Args:
      loss_fn: ``(base, trainable, batch, dropout_key) -> (loss, weight)``: the mean loss
        over the batch and what it averages over (real examples or tokens); the batch
        carries ``"mask": [b]`` for padded examples.
      opt: the client optimizer (:func:`make_optimizer`).
      frozen: leaves that never train (FFA-LoRA: ``lambda path, _: path[-1] == "A"``);
        their gradient is zeroed before ``opt.update``, their update after it, and
        their optimizer state is kept as it was, so they stay bit-identical.
      on_step: a host function called (``jax.debug.callback``, no result) once per step
        of the scan, with the step index; vmapped clients share one call per step (the
        index is the same for all). A progress bar (:mod:`floranna_jax.progress`); it
        reads no parameter, so the numbers are the same with or without it.
      micro_batched: each step's batch comes as ``M`` micro-batches whose gradients are
        summed, weighted, before the step's one optimizer update (:func:`_micro_grads`).

    Returns:
      ``local_update(base, trainable, opt_state, batches, step_mask, key)`` ->
      ``(trainable, opt_state, metrics)`` with ``batches`` a tree of ``[S, b, ...]``
      (micro-batched: ``[S, M, b/M, ...]``), ``step_mask: [S]`` float32 and ``key`` the
      client's typed PRNG key. ``metrics``: ``"loss"`` the mean pre-update loss over real
      steps (0 if none; NaN/inf if any real step was non-finite) and ``"steps"`` the
      number of real steps (int32).
    """
    grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)

    def step_grads(base, params, batch, key):
        if micro_batched:
            return _micro_grads(grad_fn, base, params, batch, key)
        (loss, _), grads = grad_fn(base, params, batch, key)
        return loss, grads

    def local_update(base, trainable, opt_state, batches, step_mask, key):
        mask = frozen_mask(frozen, trainable)
        state_mask = _state_mask(opt, opt_state, mask)

        def step(carry, xs):
            params, state = carry
            batch, real, t = xs
            if on_step is not None:
                jax.debug.callback(on_step, t)
            loss, grads = step_grads(base, params, batch, jax.random.fold_in(key, t))
            grads = jax.tree.map(lambda g, m: jnp.zeros_like(g) if m else g, grads, mask)
            updates, new_state = opt.update(grads, state, params)
            updates = jax.tree.map(lambda u, m: jnp.zeros_like(u) if m else u, updates, mask)
            new_params = optax.apply_updates(params, updates)
            new_state = jax.tree.map(lambda m, n, o: o if m else n, state_mask, new_state, state)
            # A padded step must not move anything, even if its loss or grads are NaN.
            is_real = real > 0
            carry = (_select(is_real, new_params, params), _select(is_real, new_state, state))
            return carry, jnp.where(is_real, loss, 0.0)

        num_steps = step_mask.shape[0]
        xs = (batches, step_mask, jnp.arange(num_steps, dtype=jnp.int32))
        (trainable, opt_state), losses = jax.lax.scan(step, (trainable, opt_state), xs)
        real_steps = jnp.sum(step_mask > 0)
        loss = jnp.sum(losses) / jnp.maximum(real_steps, 1).astype(losses.dtype)
        return trainable, opt_state, {"loss": loss, "steps": real_steps.astype(jnp.int32)}

    return local_update


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
