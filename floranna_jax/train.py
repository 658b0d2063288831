"""``run(config, workdir)``: validate, build, resume, then the round loop.

The loop reads top to bottom: one round (``rounds.make_round``: clients, then server),
an evaluation every ``eval.every_rounds`` rounds and after the last (the task's
evaluator; with ``eval.at_start`` also the global model before round 1, on validation and
on every client's holdout), one metrics row (``reporting``), a checkpoint every
``ckpt.every_rounds`` rounds (``checkpoint``). A run restarted on the same workdir resumes
from its newest checkpoint and, on CPU, ends bit-identical to an uninterrupted run: all
randomness is a function of (seed, round, client) (see ``keys``), and the metrics rows
after the checkpoint are rewritten.

With several processes (``dist``, :mod:`floranna_jax.distributed`) every process runs this
same loop on the same state; only process 0 writes the workdir's files, all of them save
and restore the checkpoints together.

Nothing in the workdir changes until the config, the data, the model and (when resuming)
the checkpoint have all been read: a bad input or a failed resume leaves it as it was.
This module knows no method and no task by name: both are plug-ins (``server``, ``tasks``).
"""

from __future__ import annotations

import json
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
    keys,
    partition,
    reporting,
    rounds,
    server,
    tasks,
    workdir_lock,
)
from floranna_jax.errors import ConfigError, WriteError

# Fields a resumed run may change (dist: how many processes run it).
RESUMABLE_CHANGES = ("train.num_rounds", "eval", "ckpt", "dist")


class Run(NamedTuple):
    """A built run: ``round_fn(state) -> (state, RoundOutput)``, the round-0 ``state``,
    the task's ``evaluator``, the experiment (task, model, data, partition), the
    ``server_`` (the method, built once) and ``base_of(state)``, the frozen base a state's
    global model runs on."""

    round_fn: Any
    state: rounds.RoundState
    evaluator: tasks.Evaluator
    exp: experiment.Experiment
    server_: server.Server
    base_of: Any


def make_runner(config, loss_fn, method: server.Method, one_client: bool = False):
    """``(runner, opt)``: the clients' optimizer and the runner of their ``local_update``
    (``clients.make_runner``) as the config's ``client`` and ``train`` sections say, or,
    with ``one_client``, the ``"loop"`` runner (a process that trains one client)."""
    c, t = config.client, config.train
    opt = clients.make_optimizer(c.optimizer, c.learning_rate, c.weight_decay)
    # Several processes always shard: each feeds its own clients to the global mesh.
    multi = jax.process_count() > 1
    shard = not one_client and (multi or (t.shard_clients and jax.device_count() > 1))
    runner = clients.make_runner(
        clients.make_local_update(loss_fn, opt, lambda path, _: method.frozen(path)),
        mode="loop" if one_client else t.client_mode,
        mesh=clients.make_mesh() if shard else None,
        chunk=0 if one_client else t.clients_per_chunk,
    )
    return runner, opt


def build(config, *, loss_wrapper=None) -> Run:
    """Everything but the loop; touches no file. ``loss_wrapper`` (tests) wraps the loss."""
    hparams = config_check.validate(config)
    seed = config.train.seed
    server_ = server.build(config.server.name, **hparams)
    method = server_.method
    exp = experiment.build(config, keys.model_key(seed))
    c = config.client
    loss_fn = exp.task.make_loss(exp.model)
    if loss_wrapper is not None:
        loss_fn = loss_wrapper(loss_fn)
    runner, opt = make_runner(config, loss_fn, method)
    compare = tuple(config.server.compare)
    round_fn = rounds.make_round(
        model=exp.model, runner=runner, opt=opt, server_=server_, arrays=exp.train,
        train_index=exp.part.train, local_steps=c.local_steps, batch_size=c.batch_size,
        clients_per_round=config.train.clients_per_round,
        persistent_opt_state=c.persistent_opt_state,
        compare=server.make_compare(compare) if compare else None,
        packed=config.data.packing,
    )  # fmt: skip
    state = rounds.init_state(
        seed, exp.model.trainable, method, config.partition.num_clients,
        opt=opt if c.persistent_opt_state else None,
    )  # fmt: skip
    evaluator = exp.task.make_evaluator(
        exp.model, exp.train, exp.validation, exp.part.holdout, config
    )
    effective_base = rounds.make_effective_base(exp.model)

    def base_of(state: rounds.RoundState):
        return effective_base(exp.model.base, method.base_delta(state.method))

    return Run(round_fn, state, evaluator, exp, server_, base_of)


def _global_eval(run: Run, state) -> dict[str, float]:
    return run.evaluator.global_eval(run.base_of(state), {"lora": state.lora, "head": state.head})


def _eval_row(run: Run, config, state, out) -> dict[str, float]:
    """Global model on validation, sampled clients on their holdout, and their gap."""
    return _scores(run, config, state, out.base, out.trainable, out.client_ids)


def _start_row(run: Run, config, state) -> dict[str, float]:
    """``eval.at_start``: the global model before round 1 on validation and, as every
    client's model then, on every client's holdout."""
    ids = np.arange(config.partition.num_clients)
    trainable = clients.broadcast({"lora": state.lora, "head": state.head}, len(ids))
    return _scores(run, config, state, run.base_of(state), trainable, ids)


def _scores(run: Run, config, state, base, trainable, client_ids) -> dict[str, float]:
    glob = _global_eval(run, state)
    row = {f"eval/global/{k}": v for k, v in glob.items()}
    if config.eval.local:
        local = run.evaluator.local_eval(base, trainable, client_ids)
        row |= {f"eval/local/{k}": v for k, v in local.items()}
        row |= {f"eval/gap/{k}": local[k] - glob[k] for k in local if k in glob}
    return row


def _comparable(config_dict: dict) -> dict:
    out = {k: dict(v) for k, v in config_dict.items() if k not in ("eval", "ckpt", "dist")}
    out.get("train", {}).pop("num_rounds", None)
    return out


def changed_fields(old: dict, new: dict) -> list[str]:
    """The ``section.field`` paths, sorted, where two configs (as config.json holds them)
    differ beyond :data:`RESUMABLE_CHANGES`: empty when ``new`` may resume a run of ``old``."""
    old, new = _comparable(old), _comparable(new)
    return sorted(
        f"{s}.{k}" for s in set(old) | set(new)
        for k in set(old.get(s, {})) | set(new.get(s, {}))
        if old.get(s, {}).get(k) != new.get(s, {}).get(k)
    )  # fmt: skip


def _check_workdir(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir}: is a file, not a folder; choose another path")


def check_same_run(config, workdir: str) -> None:
    """A workdir with a checkpoint resumes only the same experiment (up to num_rounds),
    which its config.json names: without it, nothing says what the checkpoint holds."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(
            f"{path}: missing, so nothing says which run {workdir}/checkpoints holds; put "
            "config.json back, or choose another --workdir"
        )
    try:
        with open(path) as f:
            diff = changed_fields(json.load(f), json.loads(config.to_json()))
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); it says which run the workdir holds") from e
    if diff:
        raise ConfigError(
            f"config field {diff[0]}: {workdir} holds a checkpoint of a run with other values "
            f"of {', '.join(diff)}; use another --workdir (only {', '.join(RESUMABLE_CHANGES)} "
            "may change on resume)"
        )


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


def run(config, workdir: str) -> str:
    """Train ``config`` in ``workdir`` (resuming if it holds a checkpoint).

    Returns the summary table (also in ``workdir/summary.md``). Raises ``ConfigError`` for
    a bad input and ``RoundError`` for a non-finite round, both one line.
    """
    _check_workdir(workdir)
    config_check.start_processes(config)  # before anything touches a device
    # One process locks its workdir. With several, process 0 holding the lock made the
    # two-process run of tests/test_multihost.py fail at jax.distributed's shutdown barrier
    # (cause not found yet), so a multi-process run takes no lock.
    with workdir_lock.hold(workdir, jax.process_count() == 1):
        return _run(config, workdir)


def _run(config, workdir: str) -> str:
    """:func:`run` in a workdir this process holds."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):  # checked before building anything
        check_same_run(config, workdir)
    try:  # a corrupt metrics.jsonl is named before anything changes (a torn last row is fine)
        reporting.read_rows(os.path.join(workdir, reporting.METRICS_FILE))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    run_ = build(config)
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
    ) as reporter:  # fmt: skip
        if config.eval.at_start and start == 0 and not reporter.kept:
            t0 = time.perf_counter()
            row = {"round": 0, **_start_row(run_, config, state)}
            reporter.write(row | {"time/eval_s": time.perf_counter() - t0})
        while int(state.round) < num_rounds:
            state, out = run_.round_fn(state)
            r = int(state.round)
            row = {"round": r, **out.metrics}
            if r % config.eval.every_rounds == 0 or r == num_rounds:
                t0 = time.perf_counter()
                row |= _eval_row(run_, config, state, out)
                row["time/eval_s"] = time.perf_counter() - t0
            reporter.write(row)
            if ckpt is not None:
                ckpt.save(state)
        if ckpt is not None and c.every_rounds > 0:
            ckpt.save(state, force=True)
        title = f"{config.server.name} on {run_.exp.task.name} ({config.data.source})"
        return reporter.finish(title)
