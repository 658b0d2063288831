"""Config validation: every field of a run's config checked before anything is built.

``validate(config)`` raises one ``ConfigError`` whose message names the field, the bad
value and the valid values (launch.py prints it as a single line). Each component checks
its own parameters (``clients.make_optimizer``, ``runners.check_runner``,
``partition.check``, ``models.check_lora``, ``server.make``, ``tasks.get``); this module
only calls those checks and names the config field (the task checks its own ``data.*`` and
``eval.*`` fields: ``Task.check``), plus the rules that belong to the run itself (rounds,
sampling, checkpoints, evaluation, paths). It returns the
hyperparameters the chosen method accepts (``server_hparams``).

``check_overrides(config, overrides)`` checks command-line overrides: a field that does not
exist (with the nearest valid name), and a ``server.*`` hyperparameter the chosen method
does not take. ``config_of_argv(argv)`` loads the ``--config=FILE[:arg]`` a command was given,
for naming a bad override when absl's parsing stopped before handing the config over.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax

from floranna_jax import clients, distributed, models, partition, privacy, runners, server, tasks
from floranna_jax.errors import BadValue, ConfigError
from floranna_jax.models import decoder, quant
from floranna_jax.server.method import no_base_delta

MODEL_SOURCES = ("pretrained", "random")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
SERVER_FIELDS = ("name", "compare")  # server.* fields that are not method hyperparameters


def _fail(field: str, message: str) -> None:
    raise ConfigError(f"config field {field}: {message}")


def _owned(section: str, check: Callable[[], Any], names: Mapping[str, str] = {}) -> Any:  # noqa: B006
    """Run a component's own check; its :class:`BadValue` names the config field
    ``section.<names.get(param, param)>``."""
    try:
        return check()
    except BadValue as e:
        _fail(f"{section}.{names.get(e.param, e.param)}", e.message)


def _choice(config, field: str, valid) -> None:
    value = _get(config, field)
    if value not in valid:
        _fail(field, f"unknown value {value!r}; valid: {', '.join(map(str, valid))}")


def _get(config, field: str) -> Any:
    section, name = field.split(".")
    return config[section][name]


def _int(config, field: str, minimum: int = 1) -> None:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        _fail(field, f"must be {kind}, got {value!r}")


def looks_local(path: str) -> bool:
    """A path (rather than a hub id): exists, absolute, or starts with '.' or '~'."""
    return os.path.exists(path) or os.path.isabs(path) or path.startswith((".", "~"))


def _gguf_in(path: str) -> str | None:
    """The GGUF file ``path`` is, or that its folder holds instead of a config.json."""
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        return os.path.join(path, found[0]) if found else None
    return None


def _paths(config) -> None:
    path = config.model.path
    if config.model.source == "pretrained":
        if not path:
            _fail("model.path", "is empty; give a hub id (FacebookAI/roberta-base) or a folder")
        gguf = _gguf_in(os.path.expanduser(path))
        if gguf is not None:  # llama.cpp's format: only convert_gguf reads it
            dest = os.path.dirname(os.path.abspath(gguf)) + "-hf"
            what = "is" if os.path.isfile(os.path.expanduser(path)) else "holds no config.json but"
            _fail("model.path", f"{path!r} {what} a GGUF file, which runs do not read; convert "
                  f"it first: python -m floranna_jax.convert_gguf {gguf} {dest} and pass "
                  f"--config.model.path={dest}")  # fmt: skip
        if looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
            _fail("model.path", f"no such folder {path!r} (a local HF model folder or a hub id)")


def _model_type(config) -> str | None:
    """The model family, when known without the network: the random model's type, or the
    ``model_type`` of a local folder's config.json."""
    if config.model.source == "random":
        return config.model.model_type
    path = os.path.join(os.path.expanduser(config.model.path), "config.json")
    try:
        with open(path) as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # a hub id, or an unreadable folder that loading will name


def server_hparams(config) -> dict[str, Any]:
    """The ``config.server`` fields that ``make_<server.name>`` accepts."""
    params = inspect.signature(server.ESTIMATORS[config.server.name]).parameters
    return {k: config.server[k] for k in config.server if k not in SERVER_FIELDS and k in params}


def _family(config, task) -> None:
    """A generating task (no head: ``num_labels == 0``) needs a decoder; a classifying one
    an encoder. Checked before the LoRA targets, which would only name a symptom."""
    model_type = _model_type(config)
    if model_type not in models.FAMILIES:
        return
    is_decoder = model_type in decoder.MODEL_TYPES
    if is_decoder == (task.num_labels == 0):
        return
    need = "an encoder" if is_decoder else "a decoder"
    fits = [t for t in models.FAMILIES if (t in decoder.MODEL_TYPES) != is_decoder]
    kind = "a decoder" if is_decoder else "an encoder"
    if config.model.source == "random":
        _fail("model.model_type", f"{model_type!r} is {kind} and task {task.name} needs "
              f"{need}: choose one of {', '.join(fits)}")  # fmt: skip
    _fail("model.path", f"{config.model.path!r} holds a {model_type} model, {kind}, and task "
          f"{task.name} needs {need}: give the folder of a {' or '.join(fits)} model")  # fmt: skip


def _lora(config) -> None:
    model_type = _model_type(config)
    if model_type in models.FAMILIES:
        spec = models.LoraSpec(**{k: config.lora[k] for k in models.LoraSpec._fields})
        _owned("lora", lambda: models.check_lora(spec, model_type))


def _quantize(config, method) -> None:
    """``model.quantize``: a known method, on a decoder, and not under a method that merges
    its updates into the frozen base (FLoRA, FedEx), which a quantized base cannot take."""
    _choice(config, "model.quantize", quant.METHODS)
    if not config.model.quantize:
        return
    model_type = _model_type(config)
    if model_type is not None and model_type not in models.decoder.MODEL_TYPES:
        _fail("model.quantize", f'{config.model.quantize!r} is for decoder models only; use ""')
    if method.base_delta is not no_base_delta:
        _fail(
            "model.quantize",
            f"server.name={config.server.name} merges its updates into "
            'the frozen base, which a quantized base cannot hold; use "" or another method',
        )


def validate(config) -> dict[str, Any]:
    """Raise ``ConfigError`` naming the first bad field; return the method's hparams."""
    _choice(config, "model.source", MODEL_SOURCES)
    _choice(config, "model.model_type", tuple(models.FAMILIES))
    _choice(config, "model.compute_dtype", COMPUTE_DTYPES)
    _choice(config, "model.base_dtype", models.BASE_DTYPES)
    if "remat" in config.model:  # decoder configs only
        _choice(config, "model.remat", (True, False))
    try:
        task = tasks.get(config.data.task)
    except ValueError as e:
        _fail("data.task", str(e))
    _paths(config)  # model.path first: a GGUF file or a missing folder explains the rest
    _family(config, task)
    _lora(config)
    try:  # the task's own fields: its data sources, data.* and eval.* fields
        task.check(config)
    except BadValue as e:
        _fail(e.param, e.message)
    p = config.partition
    extra = {"classes_per_client": p.classes_per_client} if p.scheme == "k_classes" else {}
    _owned(
        "partition",
        lambda: partition.check(
            p.scheme, p.num_clients, alpha=p.alpha, holdout_fraction=p.holdout_fraction, **extra
        ),
    )
    c = config.client
    _owned("client", lambda: clients.make_optimizer(c.optimizer, c.learning_rate, c.weight_decay))
    _int(config, "client.local_steps")
    _int(config, "client.batch_size")
    _int(config, "client.micro_batch_size", 0)
    if c.micro_batch_size and c.batch_size % c.micro_batch_size:
        _fail(
            "client.micro_batch_size",
            f"{c.micro_batch_size} does not divide client.batch_size={c.batch_size}; "
            "use a divisor, or 0 for the whole batch",
        )
    _choice(config, "server.name", tuple(server.ESTIMATORS))
    hparams = server_hparams(config)
    _owned("server", lambda: server.make(config.server.name, **hparams))
    if "quantize" in config.model:  # decoder configs only
        _quantize(config, server.make(config.server.name, **hparams))
    try:
        server.check_comparisons(tuple(config.server.compare))
    except ValueError as e:
        _fail("server.compare", str(e))
    _int(config, "train.seed", 0)
    _int(config, "train.num_rounds")
    _int(config, "train.clients_per_round")
    t = config.train
    if t.clients_per_round > p.num_clients:
        _fail("train.clients_per_round", f"{t.clients_per_round} exceeds "
              f"partition.num_clients={p.num_clients}")  # fmt: skip
    _owned("dist", lambda: distributed.check(**config.dist))
    _owned("privacy", lambda: privacy.check(config))
    several = config.dist.mode != "off"  # several processes always shard the clients
    if "model_shards" in t:  # the base split over devices (floranna_jax.fsdp)
        _int(config, "train.model_shards")
    split = t.get("model_shards", 1) > 1
    _owned("train", lambda: runners.check_runner(t.client_mode, t.clients_per_chunk,
                                                 t.shard_clients or several, split),
           {"mode": "client_mode", "chunk": "clients_per_chunk"})  # fmt: skip
    if "step_progress" in t:
        _choice(config, "train.step_progress", (True, False))
    _int(config, "ckpt.every_rounds", 0)
    _int(config, "ckpt.keep")
    _int(config, "eval.every_rounds")
    _int(config, "eval.batch_size")
    _int(config, "eval.max_local_examples", 0)
    return hparams


def check_devices(config) -> None:
    """The check that needs the devices (call after :func:`start_processes`): the base's
    ``train.model_shards`` divides the device count and, with several processes, each
    process's devices, so that a process holds whole copies of the base, split over its
    own devices (its programs take host inputs and give host outputs as with one)."""
    n, m = jax.device_count(), config.train.model_shards
    if n % m:
        _fail("train.model_shards", f"{m} does not divide the {n} devices; use a divisor of {n}")
    local = jax.local_device_count()
    if jax.process_count() > 1 and local % m:
        _fail("train.model_shards", f"{m} does not divide the {local} devices of each "
                                    f"process; use a divisor of {local}")  # fmt: skip


def start_processes(config) -> None:
    """Check the ``dist`` section and start ``jax.distributed`` as it asks (nothing for one
    process); call before anything touches a device."""
    _owned("dist", lambda: distributed.initialize(**config.dist))


def _fields(config) -> list[str]:
    return [f"{s}.{k}" for s in config for k in config[s]]


def check_overrides(config, overrides: list[str]) -> None:
    """``overrides``: the ``section.field`` paths set on the command line. A path that is
    not a field names the nearest one; a ``server.*`` field the chosen method does not
    take says which methods do."""
    fields = _fields(config)
    for path in overrides:
        if path not in fields:
            near = difflib.get_close_matches(path, fields, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else f"; sections: {', '.join(config)}"
            _fail(path, f"no such field{hint}")
        section, name = path.split(".", 1)
        if section == "server" and name not in SERVER_FIELDS:
            method = config.server.name
            if method in server.ESTIMATORS and name not in server_hparams(config):
                users = [m for m, f in server.ESTIMATORS.items()
                         if name in inspect.signature(f).parameters]  # fmt: skip
                _fail(path, f"method {method!r} takes no hyperparameter {name!r} "
                      f"(it is one of {', '.join(users) or 'no method'})")  # fmt: skip


def load_file(path, arg: str | None = None):
    """``get_config(arg)`` of the config file ``path`` (``get_config()`` without ``arg``),
    loaded the way config_flags loads it: what a config built on another one calls."""
    spec = importlib.util.spec_from_file_location(f"config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def config_of_argv(argv: list[str]):
    """The config of the ``--config=FILE[:arg]`` in ``argv``, loaded the way config_flags
    loads it; None when there is none or it does not load (absl's own message says why)."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return None
    path, _, arg = spec.partition(":")
    try:
        return load_file(path, arg)
    except Exception:  # a missing file or a bad arg: absl's own message says which
        return None
