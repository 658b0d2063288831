"""A run's result as its workdir holds it, and the models that result defines.

    res = result.load(workdir, round_=None)     # config.json rebuilt, a checkpoint restored
    result.trainable(res, client=None)          # {"lora", "head"}: global, or client N's own
    result.base(res)                            # the frozen base with the method's merges
    result.merged_base(res, client=None)        # base + merges + adapter: plain weights

What export and generate read instead of the run's internals. The frozen base is rebuilt
from the run's ``config.json`` exactly as :func:`train.build` builds it (same model key),
and the checkpoint restores into the run's round-0 state (:func:`train.initial_state`).
A method keeps personal adapters when some LoRA factor is ``private`` (FedSA's ``B``);
a client's adapter is then what the method would start that client from
(``Method.client_start``). A method keeps merges when its ``base_delta`` is not empty
(FLoRA, FedEx): those live in the base, so only a merged model carries them.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from floranna_jax import (
    checkpoint,
    config_check,
    experiment,
    keys,
    models,
    rounds,
    server,
    tasks,
    train,
)
from floranna_jax.errors import ConfigError, first_line
from floranna_jax.merged_base import make as make_merged_base
from floranna_jax.models import quant


class Result(NamedTuple):
    """config: the run's ConfigDict (from ``config.json``); task: ``tasks.Task``; model:
    ``models.Model`` (fresh adapters: the state's are the trained ones); method:
    ``server.Method``; state: ``rounds.RoundState`` of the restored round."""

    config: ml_collections.ConfigDict
    task: tasks.Task
    model: models.Model
    method: server.Method
    state: rounds.RoundState


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The run config ``workdir/config.json`` holds; ``ConfigError`` when there is none."""
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except FileNotFoundError as e:
        raise ConfigError(f"--workdir {workdir}: no config.json; not a run folder "
                          "(launch.py writes one)") from e  # fmt: skip
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable: {first_line(e)}") from e


def _restore(ckpt: checkpoint.Checkpointer, target, workdir: str, round_: int | None):
    saved = ckpt.all_rounds()
    if not saved:
        raise ConfigError(f"{workdir}/checkpoints: no checkpoint; the run saved none "
                          "(ckpt.every_rounds=0)")  # fmt: skip
    if round_ is not None and round_ not in saved:
        raise ConfigError(f"--round={round_}: {workdir} holds checkpoints of rounds "
                          f"{', '.join(map(str, saved))}; choose one of them")  # fmt: skip
    try:
        return ckpt.restore(target, round_)
    except Exception as e:  # orbax raises many types; all mean "this checkpoint is unusable"
        raise ConfigError(
            f"{workdir}/checkpoints: cannot restore round "
            f"{round_ or saved[-1]}: {type(e).__name__}: {first_line(e)}"
        ) from e


def load(workdir: str, round_: int | None = None) -> Result:
    """The run in ``workdir`` at the checkpoint of ``round_`` (default: the newest).

    Raises ``ConfigError`` (one line) for a folder that holds no run or no such round.
    """
    config = read_config(workdir)
    hparams = config_check.validate(config)
    method = server.build(config.server.name, **hparams).method
    task = tasks.get(config.data.task)
    model = experiment.build_model(config, task.num_labels, keys.model_key(config.train.seed))
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise ConfigError(f"--workdir {workdir}: no checkpoints/ folder; the run saved none")
    ckpt = checkpoint.Checkpointer(directory, 0, config.ckpt.keep)
    try:
        state = _restore(ckpt, train.initial_state(config, model, method), workdir, round_)
    finally:
        ckpt.close()
    return Result(config, task, model, method, state)


def keeps_merges(res: Result) -> bool:
    """Whether the method folds updates into the base (FLoRA, FedEx)."""
    return bool(res.method.base_delta(res.state.method))


def has_personal(res: Result) -> bool:
    """Whether the method keeps an adapter per client (a private LoRA factor: FedSA)."""
    return any(res.method.private(("lora", n, k)) for n, f in res.state.lora.items() for k in f)


def trainable(res: Result, client: int | None = None) -> dict[str, Any]:
    """``{"lora": {layer: {"A": [r, d_in], "B": [d_out, r]}}, "head": ...}``: the global
    model's, or client ``client``'s own (``ConfigError`` for a method without personal
    adapters or an id out of range)."""
    head = res.state.head
    if client is None:
        return {"lora": res.state.lora, "head": head}
    name, n = res.config.server.name, res.config.partition.num_clients
    if not has_personal(res):
        raise ConfigError(f"--client={client}: method {name} keeps no personal adapter, "
                          "every client uses the global one; leave --client out")  # fmt: skip
    if not 0 <= client < n:
        raise ConfigError(f"--client={client}: the run has clients 0 to {n - 1}")
    ids = np.asarray([client])
    start = res.method.client_start(res.state.lora, res.state.method, ids, jax.random.key(0))
    return {"lora": jax.tree.map(lambda x: x[0], start), "head": head}


def base(res: Result) -> dict[str, Any]:
    """The frozen base the run's models use: pretrained weights plus the method's merges."""
    return make_merged_base(res.model)(res.method.base_delta(res.state.method))


def merged_base(res: Result, client: int | None = None) -> dict[str, Any]:
    """:func:`base` with the adapter of :func:`trainable` folded in (``W0 + s B A``): the
    weights of a plain model that computes what the run's model computes (a quantized
    base, ``model.quantize``, is dequantized first, as QLoRA merges)."""
    adapters = trainable(res, client)["lora"]
    deltas = {n: f["B"] @ f["A"] for n, f in adapters.items()}
    plain = quant.dequantize_base(base(res))
    return models.merge_into_base(plain, deltas, res.model.lora_scale)
