"""Which run a workdir holds, and whether a config may resume it.

A workdir with a checkpoint resumes only the same experiment: its ``config.json`` says
which, and only :data:`RESUMABLE_CHANGES` may differ (``train.num_rounds``,
``train.step_progress``, ``eval``, ``ckpt``, ``dist``). Fields added after runs were saved
(:data:`ADDED_FIELDS`) count as unchanged where the new value runs as the old run did.
``train.run`` checks this before building anything, whichever transport reaches the
clients.
"""

from __future__ import annotations

import json
import os

import numpy as np

from floranna_jax import models
from floranna_jax.errors import ConfigError

# Fields a resumed run may change (dist: how many processes run it; step_progress: a bar).
RESUMABLE_CHANGES = ("train.num_rounds", "train.step_progress", "eval", "ckpt", "dist")

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
    "data.dense_rows": lambda v: not v,
    "eval.global_split": lambda v: bool(v),
}


def _comparable(config_dict: dict) -> dict:
    out = {k: dict(v) for k, v in config_dict.items() if k not in RESUMABLE_CHANGES}
    for path in RESUMABLE_CHANGES:
        section, _, field = path.partition(".")
        if field:
            out.get(section, {}).pop(field, None)
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
