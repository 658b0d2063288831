"""``run(config, workdir)``: validate, build, resume, then the round loop.

The loop reads top to bottom: one round (``rounds.make_round``: clients, then server),
an evaluation every ``eval.every_rounds`` rounds and after the last, one metrics row
(``reporting``), a checkpoint every ``ckpt.every_rounds`` rounds (``checkpoint``). A run
restarted on the same workdir resumes from its newest checkpoint and, on CPU, ends
bit-identical to an uninterrupted run: all randomness is a function of (seed, round,
client) (see ``rounds``), and the metrics rows after the checkpoint are rewritten.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from typing import Any, NamedTuple

import jax
from absl import logging

from floranna_jax import (
    checkpoint,
    clients,
    config_check,
    evaluation,
    experiment,
    partition,
    reporting,
    rounds,
    server,
)

MODEL_KEY_TAG = 2**31 - 3  # fold_in(root, tag) inits the model; rounds use tags 0..num_rounds
RESUMABLE_CHANGES = ("train.num_rounds", "eval", "ckpt")  # fields a resumed run may change


class Run(NamedTuple):
    """A built run: ``round_fn(state) -> (state, RoundOutput)``, the round-0 ``state``,
    the ``evaluator``, the experiment (model, data, partition) and the checkpointer."""

    round_fn: Any
    state: rounds.RoundState
    evaluator: evaluation.Evaluator
    exp: experiment.Experiment
    ckpt: checkpoint.Checkpointer


def _frozen(method: str):
    """FFA-LoRA trains ``B`` only: every adapter ``A`` is frozen at its shared init."""
    if method == "ffa":
        return lambda path, _: path[0] == "lora" and path[-1] == "A"
    return None


def _previous_lora_hparam(method: str, hparams: dict[str, Any]) -> str | None:
    """FLoRA-NA with ``combine="deltas"`` combines deltas from the previous global adapter,
    which the estimator takes as its ``previous`` argument."""
    params = inspect.signature(server.ESTIMATORS[method]).parameters
    return "previous" if hparams.get("combine") == "deltas" and "previous" in params else None


def build(config, workdir: str, *, loss_wrapper=None) -> Run:
    """Everything but the loop. ``loss_wrapper`` (tests) wraps the client loss function."""
    hparams = config_check.validate(config)
    method, seed = config.server.name, config.train.seed
    exp = experiment.build(config, jax.random.fold_in(jax.random.key(seed), MODEL_KEY_TAG))
    c = config.client
    opt = clients.make_optimizer(c.optimizer, c.learning_rate, c.weight_decay)
    loss_fn = rounds.make_loss_fn(exp.model, exp.task.is_regression)
    if loss_wrapper is not None:
        loss_fn = loss_wrapper(loss_fn)
    shard = config.train.shard_clients and jax.device_count() > 1
    runner = clients.make_runner(
        clients.make_local_update(loss_fn, opt, _frozen(method)),
        mode=config.train.client_mode,
        mesh=clients.make_mesh() if shard else None,
        chunk=config.train.clients_per_chunk,
    )
    round_fn = rounds.make_round(
        model=exp.model, runner=runner, opt=opt, method=method, hparams=hparams,
        arrays=exp.train, train_index=exp.part.train, local_steps=c.local_steps,
        batch_size=c.batch_size, clients_per_round=config.train.clients_per_round,
        persistent_opt_state=c.persistent_opt_state,
        previous_lora_hparam=_previous_lora_hparam(method, hparams),
        compare=tuple(config.server.compare),
    )  # fmt: skip
    state = rounds.init_state(
        seed, exp.model.trainable, method=method, num_clients=config.partition.num_clients,
        opt=opt if c.persistent_opt_state else None,
    )  # fmt: skip
    evaluator = evaluation.make_evaluator(
        exp.model, exp.task.name, exp.task.is_regression, exp.validation, exp.train,
        exp.part.holdout, batch_size=config.eval.batch_size,
        clients_per_round=config.train.clients_per_round,
        max_local_examples=config.eval.max_local_examples,
    )  # fmt: skip
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), config.ckpt.every_rounds, config.ckpt.keep
    )
    return Run(round_fn, state, evaluator, exp, ckpt)


def _eval_row(run: Run, config, state, out, base_of) -> dict[str, float]:
    """Global model on validation, sampled clients on their holdout, and their gap."""
    glob = run.evaluator.global_eval(
        base_of(run.exp.model.base, state.base_delta), {"lora": state.lora, "head": state.head}
    )
    row = {f"eval/global/{k}": v for k, v in glob.items()}
    if config.eval.local:
        local = run.evaluator.local_eval(out.base, out.trainable, out.client_ids)
        row |= {f"eval/local/{k}": v for k, v in local.items()}
        row |= {f"eval/gap/{k}": local[k] - glob[k] for k in local if k in glob}
    return row


def _comparable(config_dict: dict) -> dict:
    out = {k: dict(v) for k, v in config_dict.items() if k not in ("eval", "ckpt")}
    out.get("train", {}).pop("num_rounds", None)
    return out


def _check_same_run(config, workdir: str) -> None:
    """A workdir with a checkpoint resumes only the same experiment (up to num_rounds)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = _comparable(json.load(f))
    new = _comparable(json.loads(config.to_json()))
    diff = sorted(
        f"{s}.{k}" for s in set(old) | set(new)
        for k in set(old.get(s, {})) | set(new.get(s, {}))
        if old.get(s, {}).get(k) != new.get(s, {}).get(k)
    )  # fmt: skip
    if diff:
        raise config_check.ConfigError(
            f"config field {diff[0]}: {workdir} holds a checkpoint of a run with other values "
            f"of {', '.join(diff)}; use another --workdir (only {', '.join(RESUMABLE_CHANGES)} "
            "may change on resume)"
        )


def _write_inputs(config, workdir: str, exp: experiment.Experiment) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2) + "\n")
    labels = exp.train["label"]
    logging.info("partition\n%s", partition.summary(labels, exp.part))
    partition.plot(labels, exp.part, os.path.join(workdir, "partition.png"))


def run(config, workdir: str) -> str:
    """Train ``config`` in ``workdir`` (resuming if it holds a checkpoint).

    Returns the summary table (also in ``workdir/summary.md``).
    """
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):  # checked before building anything
        _check_same_run(config, workdir)
    run_ = build(config, workdir)
    _write_inputs(config, workdir, run_.exp)
    state = run_.ckpt.restore(run_.state) or run_.state
    start, num_rounds = int(state.round), config.train.num_rounds
    if start:
        logging.info("resuming %s from round %d", workdir, start)
    reporter = reporting.Reporter(
        workdir, start_round=start, num_rounds=num_rounds, main_metric=run_.exp.task.main_metric
    )
    base_of = rounds.make_effective_base(run_.exp.model)
    while int(state.round) < num_rounds:
        state, out = run_.round_fn(state)
        r = int(state.round)
        row = {"round": r, **out.metrics}
        if r % config.eval.every_rounds == 0 or r == num_rounds:
            t0 = time.perf_counter()
            row |= _eval_row(run_, config, state, out, base_of)
            row["time/eval_s"] = time.perf_counter() - t0
        reporter.write(row)
        run_.ckpt.save(state)
    if config.ckpt.every_rounds > 0:
        run_.ckpt.save(state, force=True)
    run_.ckpt.close()
    title = f"{config.server.name} on {run_.exp.task.name} ({config.data.source})"
    return reporter.finish(title)
