"""``run(config, workdir)``: validate, build, resume, then the round loop.

The loop reads top to bottom: one round (``rounds.make_round``: clients, then server),
an evaluation every ``eval.every_rounds`` rounds and after the last (the task's
evaluator; with ``eval.at_start`` also the global model before round 1, on validation and
on every client's holdout), one metrics row (``reporting``), a checkpoint every
``ckpt.every_rounds`` rounds (``checkpoint``). A run restarted on the same workdir resumes
from its newest checkpoint and, on CPU, ends bit-identical to an uninterrupted run: all
randomness is a function of (seed, round, client) (see ``keys``), and the metrics rows
after the checkpoint are rewritten.

The clients are reached through ``transport.Clients``: in this process by default, or over
Flower, whose ServerApp runs this very loop (``run(config, workdir, make_clients)``;
:mod:`floranna_jax.flower.transport`), so both write the same rows, evaluation, summary,
plots and checkpoints. With several processes (``dist``, :mod:`floranna_jax.distributed`)
every process runs this same loop on the same state; only process 0 writes the workdir's
files, all of them save and restore the checkpoints together.

Nothing in the workdir changes until the config, the data, the model and (when resuming)
the checkpoint have all been read: a bad input or a failed resume leaves it as it was.
This module knows no method and no task by name: both are plug-ins (``server``, ``tasks``).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

from floranna_jax import (
    checkpoint,
    clients,
    config_check,
    distributed,
    experiment,
    fsdp,
    keys,
    merged_base,
    partition,
    privacy,
    progress,
    reporting,
    resume,
    rounds,
    runners,
    server,
    tasks,
    transport,
    workdir_lock,
)
from floranna_jax.errors import ConfigError, WriteError

# The base's subtrees whose leading axis is the layer scan's: the decoders' stack (their
# Architecture.stacked); an encoder has none. fsdp never splits that axis.
STACKED = ("layers",)


class Run(NamedTuple):
    """A built run: ``round_fn(state) -> (state, RoundOutput)``, the round-0 ``state``,
    the task's ``evaluator`` (its ``global_eval`` ``None`` without a global split), the
    experiment (task, model, data, partition, packing rows), the ``server_`` (the method,
    built once), ``base_of(state)``, the frozen base a state's global model runs on (valid
    until the base is next asked for another state's merges: :mod:`floranna_jax.merged_base`),
    the clients' ``loss_fn`` and the run's ``clients_`` (``transport.Clients``)."""

    round_fn: Any
    state: rounds.RoundState
    evaluator: tasks.Evaluator
    exp: experiment.Experiment
    server_: server.Server
    base_of: Any
    loss_fn: Any
    clients_: transport.Clients


def make_local_update(config, loss_fn, method: server.Method, on_step=None):
    """``(local_update, opt)``: one client's update (``clients.make_local_update``, calling
    ``on_step`` once per step) with the optimizer of the config's ``client`` section and
    the method's frozen factors."""
    c = config.client
    opt = clients.make_optimizer(c.optimizer, c.learning_rate, c.weight_decay)
    frozen = lambda path, _: method.frozen(path)  # noqa: E731
    update = clients.make_local_update(
        loss_fn, opt, frozen, on_step=on_step, micro_batched=micro_batches(config) > 1
    )
    return update, opt


def make_client_runner(config, local_update, one_client: bool = False):
    """``(runner, mode, chunk)``: the jitted runner of ``local_update`` as the config's
    ``train`` section says (``runners.make_runner``; what a plan compiles), or, with
    ``one_client``, the ``"loop"`` runner."""
    t = config.train
    mode, chunk = ("loop", 0) if one_client else (t.client_mode, t.clients_per_chunk)
    mesh = None if one_client else client_mesh(config)
    runner = runners.make_runner(local_update, mode, mesh, chunk, stacked=STACKED)
    return runner, mode, chunk


def client_mesh(config):
    """The mesh the clients run on (``runners.make_mesh``), None for one device: with
    ``train.model_shards > 1`` its model axis splits the base (:mod:`floranna_jax.fsdp`),
    over the first ``model_shards`` devices alone when clients run in chunks."""
    t = config.train
    # Several processes always shard: each feeds its own clients to the global mesh.
    multi = jax.process_count() > 1
    split = t.get("model_shards", 1) > 1
    if split:
        config_check.check_devices(config)
    if not (multi or ((t.shard_clients or split) and jax.device_count() > 1)):
        return None
    if split and t.clients_per_chunk:  # chunks one after another on one split base
        return runners.make_mesh(t.model_shards, model_shards=t.model_shards)
    return runners.make_mesh(model_shards=t.model_shards if split else 1)


def make_runner(config, loss_fn, method: server.Method, one_client: bool = False):
    """``(runner, opt)``: the clients' optimizer and the runner of their ``local_update``
    (:func:`make_client_runner`) as the config's ``client`` and ``train`` sections say, or,
    with ``one_client``, the ``"loop"`` runner (a process that trains one client). While
    it runs, a ``clients`` bar counts the local steps (:mod:`floranna_jax.progress`).
    ``train.step_progress=False`` drops that bar: its host callback is what keeps JAX's
    persistent compilation cache from storing the runner's program, so without it a
    later process can load the program instead of compiling it again."""
    ticker = progress.Ticker() if config.train.get("step_progress", True) else None
    local_update, opt = make_local_update(config, loss_fn, method,
                                          on_step=ticker.tick if ticker else None)  # fmt: skip
    runner, mode, chunk = make_client_runner(config, local_update, one_client)

    def shown(base, trainable, opt_state, batches, step_mask, keys):
        U, S = step_mask.shape
        steps = S * runners.sequential_passes(U, mode, chunk)
        with ticker.show("clients", steps, "step") if ticker else contextlib.nullcontext():
            return jax.block_until_ready(runner(base, trainable, opt_state, batches,
                                                step_mask, keys))  # fmt: skip

    return shown, opt


def initial_state(config, model, method: server.Method, abstract: bool = False):
    """The round-0 state of ``config``'s run of ``model`` (what a checkpoint restores into);
    ``abstract``: its method and optimizer states as shapes (``rounds.init_state``)."""
    c = config.client
    opt = None
    if c.persistent_opt_state:
        opt = clients.make_optimizer(c.optimizer, c.learning_rate, c.weight_decay)
    return rounds.init_state(config.train.seed, model.trainable, method,
                             config.partition.num_clients, opt=opt, abstract=abstract)  # fmt: skip


def check_import_kept(name: str, method: server.Method, state: rounds.RoundState) -> None:
    """``lora.init_from`` needs a method whose clients start from the global adapter (or
    their own copy of it): one that restarts them from fresh adapters would drop
    the imported one after round 0; raise ``ConfigError`` saying so."""
    rkey = keys.round_key(state.key, 0)
    start = method.client_start(state.lora, state.method, np.arange(1), keys.init_key(rkey))
    same = jax.tree.map(lambda s, g: bool(np.array_equal(s[0], g)), start, state.lora)
    if not all(jax.tree.leaves(same)):
        raise ConfigError(
            f"config field lora.init_from: method {name} restarts its clients from fresh "
            "adapters every round, which would drop the imported adapter after round 0; "
            "start from it with another method"
        )


def micro_batches(config) -> int:
    """Micro-batches per local step: ``client.batch_size / client.micro_batch_size``, or 1
    when ``micro_batch_size`` is 0 (the whole batch at once)."""
    c = config.client
    return c.batch_size // c.micro_batch_size if c.micro_batch_size else 1


def build(config, *, loss_wrapper=None, abstract: bool = False, make_clients=None) -> Run:
    """Everything but the loop; touches no file. ``loss_wrapper`` (tests) wraps the loss.
    ``abstract`` (a plan): the frozen base, the method's state and the optimizer states
    are ``jax.ShapeDtypeStruct`` trees; no weight is read (:mod:`floranna_jax.plan`).
    ``make_clients(exp, method, evaluator) -> transport.Clients``: how the clients are
    reached (default: :func:`transport.in_process`; Flower: ``flower.transport.make``)."""
    hparams = config_check.validate(config)
    seed = config.train.seed
    server_ = server.serve(privacy.wrap(config, server.make(config.server.name, **hparams)))
    method = server_.method
    mesh = client_mesh(config)
    split = mesh is not None and fsdp.MODEL_AXIS in mesh.axis_names
    # A split base loads straight into its shards; a random or quantized one is placed.
    exp = experiment.build(config, keys.model_key(seed), abstract,
                           fsdp.sharding_of(mesh, STACKED) if split else None)  # fmt: skip
    if split:
        base = fsdp.place(exp.model.base, mesh, STACKED)  # each device keeps its slices
        exp = exp._replace(model=exp.model._replace(base=base))
    loss_fn = exp.task.make_loss(exp.model)
    if loss_wrapper is not None:
        loss_fn = loss_wrapper(loss_fn)
    evaluator = make_evaluator(config, exp)
    runner, opt = make_runner(config, loss_fn, method)
    base_for = merged_base.make(exp.model)  # the run's one merged base, shared
    if make_clients is None:
        c = config.client
        clients_ = transport.in_process(
            base_for=base_for, runner=runner, evaluator=evaluator, method=method,
            arrays=exp.train, train_index=exp.part.train, local_steps=c.local_steps,
            batch_size=c.batch_size, row_length=exp.rows.train,
            micro_batches=micro_batches(config),
        )  # fmt: skip
    else:
        clients_ = make_clients(exp, method, evaluator)
    compare = tuple(config.server.compare)
    round_fn = rounds.make_round(
        clients_=clients_, opt=opt, server_=server_, num_clients=config.partition.num_clients,
        clients_per_round=config.train.clients_per_round,
        persistent_opt_state=config.client.persistent_opt_state,
        compare=server.make_compare(compare) if compare else None,
    )  # fmt: skip
    state = initial_state(config, exp.model, method, abstract)
    if config.lora.get("init_from"):
        check_import_kept(config.server.name, method, state)

    def base_of(state: rounds.RoundState):
        return base_for(method.base_delta(state.method))

    return Run(round_fn, state, evaluator, exp, server_, base_of, loss_fn, clients_)


def make_evaluator(config, exp: experiment.Experiment) -> tasks.Evaluator:
    """The task's evaluator, packing as the run does; without a global split
    (``eval.global_split=False``: a server that holds no data) its ``global_eval`` is
    ``None``."""
    split = config.eval.get("global_split", True)
    evaluator = exp.task.make_evaluator(exp.model, exp.train, exp.validation if split else None,
                                        exp.part.holdout, config, exp.rows)  # fmt: skip
    return evaluator if split else evaluator._replace(global_eval=None)


def _eval_row(run: Run, config, state, out, record) -> dict[str, float]:
    """Global model on validation, the round's clients on their holdout (each its own
    model), and their gap; ``record``: receives the global evaluation's generations."""
    return _scores(run, config, state, out.client_ids, (out.trainable, out.delta), record)


def _start_row(run: Run, config, state, record) -> dict[str, float]:
    """``eval.at_start``: the global model before round 1 on validation and, as every
    client's model then, on every client's holdout."""
    ids = np.arange(config.partition.num_clients)
    trainable = runners.broadcast({"lora": state.lora, "head": state.head}, len(ids))
    delta = run.server_.method.base_delta(state.method)
    return _scores(run, config, state, ids, (trainable, delta), record)


def _scores(run: Run, config, state, client_ids, scored, record) -> dict[str, float]:
    """``scored``: what the clients evaluate, ``(trainable, delta)``
    (``transport.Clients.evaluate``). The clients go first: a round's clients trained on
    the base of the round's start, which the run still holds, and the global model's base
    (the round's merges) is then built in its buffers (:mod:`floranna_jax.merged_base`)."""
    local = run.clients_.evaluate(client_ids, *scored) if config.eval.local else {}
    glob = {}
    if run.evaluator.global_eval is not None:
        glob = run.evaluator.global_eval(
            run.base_of(state), {"lora": state.lora, "head": state.head}, record=record
        )
    row = {f"eval/global/{k}": v for k, v in glob.items()}
    row |= {f"eval/local/{k}": v for k, v in local.items()}
    return row | {f"eval/gap/{k}": local[k] - glob[k] for k in local if k in glob}


def _check_workdir(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir}: is a file, not a folder; choose another path")


def _restore(ckpt: checkpoint.Checkpointer, state: rounds.RoundState, workdir: str):
    """The newest checkpoint's state, or ``state`` when there is none."""
    try:
        restored = ckpt.restore(state)
    except Exception as e:  # orbax raises many types; all mean "this checkpoint is unusable"
        raise ConfigError(
            f"{workdir}/checkpoints: cannot resume from round {ckpt.latest_round()}: "
            f"{type(e).__name__}: {checkpoint.reason(e)}; the checkpoint is damaged: remove "
            f"checkpoints/{ckpt.latest_round()} to resume from an earlier one, or choose another "
            "--workdir"
        ) from e
    return state if restored is None else restored


def _write_inputs(config, workdir: str, exp: experiment.Experiment) -> None:
    # Written aside and renamed: a full disk must not leave a torn config.json beside the
    # checkpoints, or the next resume could not tell which run they hold.
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json(indent=2) + "\n")
    os.replace(path + ".tmp", path)
    labels = experiment.split_labels(exp.train)
    logging.info("partition\n%s", partition.summary(labels, exp.part))
    partition.plot(labels, exp.part, os.path.join(workdir, "partition.png"))


def run(config, workdir: str, make_clients=None) -> str:
    """Train ``config`` in ``workdir`` (resuming if it holds a checkpoint); ``make_clients``:
    how the clients are reached (:func:`build`; default: in this process).

    Returns the summary table (also in ``workdir/summary.md``). Raises ``ConfigError`` for
    a bad input and ``RoundError`` for a non-finite round, both one line.
    """
    _check_workdir(workdir)
    config_check.start_processes(config)  # before anything touches a device
    # One process locks its workdir. With several, process 0 holding the lock made the
    # two-process run of tests/test_multihost.py fail at jax.distributed's shutdown barrier
    # (cause not found yet), so a multi-process run takes no lock.
    with workdir_lock.hold(workdir, jax.process_count() == 1):
        return _run(config, workdir, make_clients)


def _run(config, workdir: str, make_clients) -> str:
    """:func:`run` in a workdir this process holds."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):  # checked before building anything
        resume.check_same_run(config, workdir)
    try:  # a corrupt metrics.jsonl is named before anything changes (a torn last row is fine)
        reporting.read_rows(os.path.join(workdir, reporting.METRICS_FILE))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    run_ = build(config, make_clients=make_clients)
    c, ckpt = config.ckpt, None
    try:
        if os.path.isdir(ckpt_dir) or c.every_rounds > 0:  # something to restore or save
            ckpt = checkpoint.Checkpointer(ckpt_dir, c.every_rounds, c.keep)
        state = run_.state if ckpt is None else _restore(ckpt, run_.state, workdir)
        return _train(config, workdir, run_, state, ckpt)
    except (OSError, WriteError) as e:  # a full disk, say: the checkpoints so far stand
        raise _write_failed(e, workdir, ckpt) from e
    finally:
        if ckpt is not None:  # Orbax's threads and event loop end here, not at exit
            ckpt.close()


def _write_failed(e: OSError | WriteError, workdir: str, ckpt) -> WriteError:
    """One line: what could not be written, why, and where the same command resumes."""
    what = str(e) if isinstance(e, WriteError) else f"{e.filename or workdir}: {e.strerror or e}"
    resume = ckpt.latest_round() if ckpt is not None else None
    return WriteError(
        f"cannot write {what}; free space (or fix the folder) and run the same command again: "
        f"it resumes from {f'round {resume}' if resume else 'the start'}"
    )


def _train(config, workdir: str, run_: Run, state, ckpt) -> str:
    """The round loop from ``state``, writing the workdir; returns the summary table."""
    c = config.ckpt
    os.makedirs(workdir, exist_ok=True)
    primary = distributed.is_primary()  # of several processes, only process 0 writes files
    if primary:
        _write_inputs(config, workdir, run_.exp)
    start, num_rounds = int(state.round), config.train.num_rounds
    if start:
        logging.info("resuming %s from round %d", workdir, start)
    with reporting.Reporter(
        workdir, start_round=start, num_rounds=num_rounds,
        main_metric=run_.exp.task.main_metric, primary=primary,
        loss_metric=run_.exp.task.loss_metric,
        global_split=run_.evaluator.global_eval is not None,
    ) as reporter:  # fmt: skip
        if config.eval.at_start and start == 0 and not reporter.kept:
            t0, samples = time.perf_counter(), []
            row = {"round": 0, **_start_row(run_, config, state, samples.extend)}
            reporter.write(row | {"time/eval_s": time.perf_counter() - t0})
            if samples:
                reporter.write_generations(0, samples)
        while int(state.round) < num_rounds:
            state, out = run_.round_fn(state)
            r = int(state.round)
            row = {"round": r, **out.metrics, **privacy.row(config, r)}
            samples = []  # the generations of this round's global evaluation, if any
            if r % config.eval.every_rounds == 0 or r == num_rounds:
                t0 = time.perf_counter()
                row |= _eval_row(run_, config, state, out, samples.extend)
                row["time/eval_s"] = time.perf_counter() - t0
            reporter.write(row)
            if samples:
                reporter.write_generations(r, samples)
            if ckpt is not None:
                ckpt.save(state)
        if ckpt is not None and c.every_rounds > 0:
            ckpt.save(state, force=True)
        title = f"{config.server.name} on {run_.exp.task.name} ({config.data.source})"
        return reporter.finish(title)
