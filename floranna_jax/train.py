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
    fsdp,
    keys,
    models,
    partition,
    privacy,
    progress,
    reporting,
    rounds,
    server,
    tasks,
    workdir_lock,
)
from floranna_jax.errors import ConfigError, WriteError

# Fields a resumed run may change (dist: how many processes run it).
# The base's subtrees whose leading axis is the layer scan's: the decoders' stack (their
# Architecture.stacked); an encoder has none. fsdp never splits that axis.
STACKED = ("layers",)
RESUMABLE_CHANGES = ("train.num_rounds", "eval", "ckpt", "dist")


class Run(NamedTuple):
    """A built run: ``round_fn(state) -> (state, RoundOutput)``, the round-0 ``state``,
    the task's ``evaluator``, the experiment (task, model, data, partition), the
    ``server_`` (the method, built once), ``base_of(state)``, the frozen base a state's
    global model runs on, and the clients' ``loss_fn``."""

    round_fn: Any
    state: rounds.RoundState
    evaluator: tasks.Evaluator
    exp: experiment.Experiment
    server_: server.Server
    base_of: Any
    loss_fn: Any


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
    ``train`` section says (``clients.make_runner``; what a plan compiles), or, with
    ``one_client``, the ``"loop"`` runner."""
    t = config.train
    mode, chunk = ("loop", 0) if one_client else (t.client_mode, t.clients_per_chunk)
    mesh = None if one_client else client_mesh(config)
    runner = clients.make_runner(local_update, mode, mesh, chunk, stacked=STACKED)
    return runner, mode, chunk


def client_mesh(config):
    """The mesh the clients run on (``clients.make_mesh``), None for one device: with
    ``train.model_shards > 1`` its model axis splits the base (:mod:`floranna_jax.fsdp`)."""
    t = config.train
    # Several processes always shard: each feeds its own clients to the global mesh.
    multi = jax.process_count() > 1
    split = t.get("model_shards", 1) > 1
    if split:
        config_check.check_devices(config)
    if not (multi or ((t.shard_clients or split) and jax.device_count() > 1)):
        return None
    return clients.make_mesh(model_shards=t.model_shards if split else 1)


def make_runner(config, loss_fn, method: server.Method, one_client: bool = False):
    """``(runner, opt)``: the clients' optimizer and the runner of their ``local_update``
    (:func:`make_client_runner`) as the config's ``client`` and ``train`` sections say, or,
    with ``one_client``, the ``"loop"`` runner (a process that trains one client). While
    it runs, a ``clients`` bar counts the local steps (:mod:`floranna_jax.progress`)."""
    ticker = progress.Ticker()
    local_update, opt = make_local_update(config, loss_fn, method, on_step=ticker.tick)
    runner, mode, chunk = make_client_runner(config, local_update, one_client)

    def shown(base, trainable, opt_state, batches, step_mask, keys):
        U, S = step_mask.shape
        with ticker.show("clients", S * clients.sequential_passes(U, mode, chunk), "step"):
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


def build(config, *, loss_wrapper=None, abstract: bool = False) -> Run:
    """Everything but the loop; touches no file. ``loss_wrapper`` (tests) wraps the loss.
    ``abstract`` (a plan): the frozen base, the method's state and the optimizer states
    are ``jax.ShapeDtypeStruct`` trees; no weight is read (:mod:`floranna_jax.plan`)."""
    hparams = config_check.validate(config)
    seed = config.train.seed
    server_ = server.serve(privacy.wrap(config, server.make(config.server.name, **hparams)))
    method = server_.method
    exp = experiment.build(config, keys.model_key(seed), abstract)
    mesh = client_mesh(config)
    if not abstract and mesh is not None and fsdp.MODEL_AXIS in mesh.axis_names:
        base = fsdp.place(exp.model.base, mesh, STACKED)  # each device keeps its slices
        exp = exp._replace(model=exp.model._replace(base=base))
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
        packed=config.data.packing, dense_rows=config.data.dense_rows,
        micro_batches=micro_batches(config),
    )  # fmt: skip
    state = initial_state(config, exp.model, method, abstract)
    if config.lora.get("init_from"):
        check_import_kept(config.server.name, method, state)
    evaluator = exp.task.make_evaluator(
        exp.model, exp.train, exp.validation, exp.part.holdout, config
    )
    effective_base = rounds.make_effective_base(exp.model)

    def base_of(state: rounds.RoundState):
        return effective_base(exp.model.base, method.base_delta(state.method))

    return Run(round_fn, state, evaluator, exp, server_, base_of, loss_fn)


def _eval_row(run: Run, config, state, out, record) -> dict[str, float]:
    """Global model on validation, sampled clients on their holdout, and their gap;
    ``record``: receives the global evaluation's generations (``global_eval``)."""
    return _scores(run, config, state, out.base, out.trainable, out.client_ids, record)


def _start_row(run: Run, config, state, record) -> dict[str, float]:
    """``eval.at_start``: the global model before round 1 on validation and, as every
    client's model then, on every client's holdout."""
    ids = np.arange(config.partition.num_clients)
    trainable = clients.broadcast({"lora": state.lora, "head": state.head}, len(ids))
    return _scores(run, config, state, run.base_of(state), trainable, ids, record)


def _scores(run: Run, config, state, base, trainable, client_ids, record) -> dict[str, float]:
    glob = run.evaluator.global_eval(
        run.base_of(state), {"lora": state.lora, "head": state.head}, record=record
    )
    row = {f"eval/global/{k}": v for k, v in glob.items()}
    if config.eval.local:
        local = run.evaluator.local_eval(base, trainable, client_ids)
        row |= {f"eval/local/{k}": v for k, v in local.items()}
        row |= {f"eval/gap/{k}": local[k] - glob[k] for k in local if k in glob}
    return row


# Fields added after runs were saved, each with a test of a new value that runs as the
# saved runs did (their config.json lacks the field): such a run resumes, and a committed
# study cell still counts, under the new defaults.
ADDED_FIELDS = {
    "model.base_dtype": lambda v: models.resolve_base_dtype(v) == np.float32,
    "model.remat": lambda v: True,  # memory against time only: the numbers are the same
    "client.micro_batch_size": lambda v: v == 0,
    "lora.init_from": lambda v: not v,
    "privacy.clip_norm": lambda v: v == 0,
    "privacy.noise_multiplier": lambda v: v == 0,
    "privacy.delta": lambda v: True,  # only names the reported epsilon; none without noise
    "model.quantize": lambda v: not v,
    "train.model_shards": lambda v: v == 1,
}


def _comparable(config_dict: dict) -> dict:
    out = {k: dict(v) for k, v in config_dict.items() if k not in ("eval", "ckpt", "dist")}
    out.get("train", {}).pop("num_rounds", None)
    return out


def _fill_added(old: dict, new: dict) -> None:
    """Gives ``old`` each :data:`ADDED_FIELDS` field it lacks, as ``new`` has it, where
    ``new``'s value runs as the old run did."""
    for path, same_as_before in ADDED_FIELDS.items():
        section, field = path.split(".")
        value = new.get(section, {}).get(field)
        if field not in old.get(section, {}) and field in new.get(section, {}):
            if same_as_before(value):
                old.setdefault(section, {})[field] = value


def changed_fields(old: dict, new: dict) -> list[str]:
    """The ``section.field`` paths, sorted, where two configs (as config.json holds them)
    differ beyond :data:`RESUMABLE_CHANGES`: empty when ``new`` may resume a run of ``old``."""
    old, new = _comparable(old), _comparable(new)
    _fill_added(old, new)
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
        loss_metric=run_.exp.task.loss_metric,
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
