"""The compiled steps of one round of a config, at the shapes they run with.

``programs(config, run) -> Programs``: from a run built with ``train.build(config,
abstract=True)`` (frozen base, method state and optimizer states as
``jax.ShapeDtypeStruct``; the data real), the client step as the config runs it (the
runner of ``train.make_runner``: vmapped, chunked or sharded, all clients in one call; in
``"loop"`` mode one client per call), the server's aggregate and apply, the merge into
the base of the merging methods, and the task's evaluation programs. The client step's
arguments are those of round 1 itself (:mod:`floranna_jax.rounds`): its sampled clients,
their batches packed as the round packs them, their optimizer states and dropout keys,
so every shape (rows per packed batch included) is the run's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from floranna_jax import fsdp, keys, merged_base, models, packing, progress, rounds, server, train
from floranna_jax.tasks import Program

MERGE = "merge into base"


class Programs(NamedTuple):
    """round: the programs of a round (client step first); evaluation: those of one
    evaluation; held: ``program name -> bytes`` the run keeps on the device beside that
    program's own arguments and outputs (:func:`held`); shapes: what the round's batches
    look like, for the report (``clients, steps, examples``, ``micro`` micro-batches per step
    and, packed, the ``rows, tokens`` of one micro-batch)."""

    round: list[Program]
    evaluation: list[Program]
    held: dict[str, int]
    shapes: dict[str, int]


def nbytes(tree) -> int:
    """Bytes of ``tree`` on one device (a split base counts its shards)."""
    return sum(fsdp.device_bytes(x) for x in jax.tree.leaves(tree))


def merged_kernels(run) -> dict:
    """``{path: kernel struct}``: the kernels of the base that the run's method merges
    into (the round state's ``base_delta`` names them; ``{}`` for most methods)."""
    delta = jax.eval_shape(run.server_.method.base_delta, run.state.method)
    flat = traverse_util.flatten_dict(run.exp.model.base, sep="/")
    return {path: flat[path] for path in models.merged_kernel_paths(flat, delta)}


def held(run, round_: list[Program], evaluation: list[Program]) -> dict[str, int]:
    """What stays on the device while each program runs, beyond its own arguments: the
    loaded base, for a merging method one set of merged kernels beside the pretrained ones
    they replace (:mod:`floranna_jax.merged_base`), the method's state and the round
    state's factors and optimizer states. The client step and the evaluation take one base
    (the merged kernels in place of the pretrained ones, if any), the server the method's
    state, and the merge of one layer a pretrained kernel stack, one layer's sum and the
    merged stack it writes into (donated: its output is that stack)."""
    state = run.state
    kernels = nbytes(merged_kernels(run))
    merge = next((p for p in round_ if p.name == MERGE), None)
    resident = {"untouched": nbytes(run.exp.model.base) - kernels, "pretrained": kernels,
                "merged": kernels if merge else 0, "method": nbytes(state.method),
                "rest": nbytes((state.lora, state.head, state.opt_state))}  # fmt: skip
    total = sum(resident.values())
    base = resident["untouched"] + resident["merged" if merge else "pretrained"]
    out = {p.name: total - base for p in (round_[0], *evaluation)}
    out |= {p.name: total - resident["method"] for p in round_[1:]}
    if merge is not None:  # its arguments are resident: the stack twice and one layer's sum
        kernel, _, dW, into = merge.args
        out[MERGE] = total - nbytes((kernel, dW, into))
    return out


def abstract(tree):
    """``jax.ShapeDtypeStruct`` leaves for the arrays (or structs) of ``tree``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _client_args(config, run, opt):
    """``(ids, args)``: round 1's clients and the client runner's abstract arguments
    ``(base, trainable_U, opt_state_U, batches_U, step_mask_U, keys_U)``."""
    exp, method, c = run.exp, run.server_.method, config.client
    rkey, ids = rounds.plan(run.state, config.partition.num_clients,
                            config.train.clients_per_round)  # fmt: skip
    persistent = c.persistent_opt_state
    start = jax.eval_shape(lambda s: rounds._start(s, method, rkey, ids, opt, persistent),
                           run.state)  # fmt: skip
    layout = packing.layout(exp.train, exp.rows.train) if exp.rows.train else None
    batches, step_mask = rounds.client_batches(rkey, ids, exp.train, exp.part.train,
                                               c.local_steps, c.batch_size, layout,
                                               train.micro_batches(config))  # fmt: skip
    dropout = keys.dropout_keys(rkey, ids)
    return ids, (exp.model.base, *start, abstract(batches), abstract(step_mask), abstract(dropout))


def _client_program(config, run, args) -> Program:
    """The runner as configured; in ``"loop"`` mode the one-client program, ``U`` calls.
    Its local update reports each step to a progress ticker, as a run's does."""
    local_update, _ = train.make_local_update(config, run.loss_fn, run.server_.method,
                                              on_step=progress.Ticker().tick)  # fmt: skip
    if config.train.client_mode == "loop":
        one = (args[0], *jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                      args[1:]))  # fmt: skip
        return Program("client step (1 client)", jax.jit(local_update), one, len(args[4]))
    runner, _, chunk = train.make_client_runner(config, local_update)
    what = f"{chunk} at a time" if chunk else "all at once"
    return Program(f"client step ({len(args[4])} clients, {what})", runner, args, 1)


def _server_programs(run, ids, uploads) -> list[Program]:
    """Aggregate and apply (jitted here; the round runs apply eagerly, the same ops) and,
    for a method that merges into the base, the merge of round 2 on."""
    method, model = run.server_.method, run.exp.model
    p = jax.ShapeDtypeStruct((len(ids),), jnp.float32)
    aggregate = jax.jit(method.aggregate)
    agg = server.Aggregate(*jax.eval_shape(aggregate, uploads, p, run.state.method))

    def apply(state, agg, uploads):
        return method.apply(state, agg, ids, uploads)

    state = run.state.method
    out = [Program("server aggregate", aggregate, (uploads, p, state), 1),
           Program("server apply", jax.jit(apply), (state, agg, uploads), 1)]  # fmt: skip
    _, after = jax.eval_shape(apply, run.state.method, agg, uploads)
    delta = jax.eval_shape(method.base_delta, after)
    kernels = merged_kernels(run)
    if delta and kernels:  # one layer a call, the largest stack (merged_base.make)
        path = max(kernels, key=lambda p: nbytes(kernels[p]))
        named = models.merged_kernel_paths(kernels, delta)[path]
        index = jax.ShapeDtypeStruct((), jnp.int32)
        args = (kernels[path], index, delta[named[0][0]], kernels[path])
        calls = sum(len(n) for n in models.merged_kernel_paths(kernels, delta).values())
        out.append(Program(MERGE, merged_base.make_merge(model), args, calls))
    return out


def programs(config, run) -> Programs:
    """Every program of a round and of an evaluation of ``run`` (see the module)."""
    _, opt = train.make_local_update(config, run.loss_fn, run.server_.method)
    ids, args = _client_args(config, run, opt)
    round_ = [_client_program(config, run, args), *_server_programs(run, ids, args[1]["lora"])]
    evaluation = run.evaluator.programs(run.exp.model.base, args[1])
    batches = args[3]
    shapes = {"clients": len(ids), "steps": config.client.local_steps,
              "examples": config.client.batch_size,
              "micro": train.micro_batches(config)}  # fmt: skip
    if "segment_ids" in batches:  # [U, S, (M,) rows, tokens]
        shapes |= dict(zip(("rows", "tokens"), batches["segment_ids"].shape[-2:], strict=True))
    return Programs(round_, evaluation, held(run, round_, evaluation), shapes)
