"""PEFT LoRA folders <-> adapter trees: what PEFT's ``save_pretrained`` writes and its
``PeftModel.from_pretrained`` reads.

    write(folder, model, spec, num_labels, trainable, base_model="org/name")
    trainable = read(folder, model, spec, num_labels)     # raises BadValue naming the field

A folder holds ``adapter_config.json`` (``peft_type`` LORA, ``r``, ``lora_alpha``,
``use_rslora``, ``lora_dropout``, ``target_modules``, ``task_type``,
``base_model_name_or_path``, ``modules_to_save``) and ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A.weight`` ``[r, d_in]`` and ``...lora_B.weight``
``[d_out, r]``: this project's ``A`` and ``B``, same orientation, same scale (``alpha / r``,
or ``alpha / sqrt(r)`` with rsLoRA). An encoder's classifier head is saved whole, as PEFT
saves ``modules_to_save`` (``base_model.model.classifier.weight``), and the task type is
then ``SEQ_CLS``; decoders are ``CAUSAL_LM``.

``target_modules`` names each adapted projection by the shortest module-name suffix that,
by PEFT's rule (a module matches a name it equals or ends with after a dot), picks out
exactly its modules (``q_proj``, ``query``); where no suffix does (BERT's ``output.dense``
also ends ``attention.output.dense``), the module names themselves.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from floranna_jax import models
from floranna_jax.errors import BadValue
from floranna_jax.models import loading

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PEFT's wrapper puts before the base model's names


def _arch(model: models.Model, spec: models.LoraSpec, num_labels: int):
    return models.architecture(model.config, num_labels, spec)


def module_names(arch) -> dict[str, str]:
    """LoRA layer name -> the Hugging Face module it adapts
    (``"layers_3/attn/q_proj"`` -> ``"model.layers.3.self_attn.q_proj"``)."""
    name = arch.checkpoint_name
    return {n: arch.checkpoint_prefix + name((*n.split("/"), "kernel")).removesuffix(".weight")
            for n in arch.lora_shapes}  # fmt: skip


def matches(target_modules: str | list[str], module: str) -> bool:
    """PEFT's rule: a regex fully matches the module name, or a listed name equals it or
    ends it after a dot."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in target_modules)


def _suffix(mine: set[str], every: set[str]) -> str | None:
    """The shortest dotted suffix of ``mine``'s names (short of the layer index) that
    matches exactly ``mine`` among ``every``; None when there is none."""
    parts = next(iter(mine)).split(".")
    for k in range(1, len(parts)):
        if parts[-k].isdigit():
            return None
        suffix = ".".join(parts[-k:])
        if {m for m in every if matches([suffix], m)} == mine:
            return suffix
    return None


def target_modules(arch) -> list[str]:
    """``target_modules`` for the adapted projections of ``arch`` (module docstring)."""
    names = module_names(arch)
    every = {n.rsplit(".", 1)[0] for n in loading.parameter_names(arch)}
    out = []
    for target in sorted({n.rsplit("/", 1)[-1] for n in names}):
        mine = {m for n, m in names.items() if n.rsplit("/", 1)[-1] == target}
        suffix = _suffix(mine, every)
        out += [suffix] if suffix else sorted(mine)
    return out


def _head_tensors(arch, head) -> dict[str, np.ndarray]:
    """The head's tensors under their checkpoint names (kernels as ``[d_out, d_in]``)."""
    out = {}
    for path, value in traverse_util.flatten_dict(head).items():
        value = np.asarray(value, np.float32)
        value = value.T if path[-1] == "kernel" else value
        # safetensors writes the buffer as it lies in memory: copy a transposed view.
        out[arch.checkpoint_name(("head", *path))] = np.ascontiguousarray(value)
    return out


def write(folder, model: models.Model, spec: models.LoraSpec, num_labels: int,
          trainable: dict[str, Any], base_model: str) -> None:  # fmt: skip
    """Write ``trainable`` (``{"lora": ..., "head": ...}``) of ``model`` built with ``spec``
    as a PEFT LoRA folder; ``base_model``: ``base_model_name_or_path``."""
    arch = _arch(model, spec, num_labels)
    names = module_names(arch)
    tensors = {}
    for n, f in trainable["lora"].items():
        for k in ("A", "B"):
            tensors[f"{PREFIX}{names[n]}.lora_{k}.weight"] = np.asarray(f[k], np.float32)
    head = _head_tensors(arch, trainable["head"])
    tensors |= {PREFIX + k: v for k, v in head.items()}
    config = {
        "peft_type": "LORA", "r": spec.rank, "lora_alpha": spec.alpha,
        "use_rslora": spec.rslora, "lora_dropout": spec.dropout,
        "target_modules": target_modules(arch), "bias": "none", "fan_in_fan_out": False,
        "task_type": "SEQ_CLS" if head else "CAUSAL_LM", "inference_mode": True,
        "modules_to_save": sorted({k.split(".")[0] for k in head}) or None,
        "base_model_name_or_path": base_model,
    }  # fmt: skip
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_config(folder: pathlib.Path, config: dict, spec: models.LoraSpec) -> None:
    """The adapter's settings against the run's; :class:`BadValue` names the first that
    differs (``rank``, ``alpha``, ``rslora``; ``init_from`` for a kind not supported)."""
    where = folder / CONFIG_FILE
    kind = f"{config.get('peft_type')!r}{' with DoRA' if config.get('use_dora') else ''}"
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise BadValue("init_from", f"{where}: peft_type {kind}; only plain LoRA loads")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise BadValue("init_from", f"{where}: per-layer rank_pattern/alpha_pattern; one "
                       "rank and alpha for every layer is supported")  # fmt: skip
    for field, key, want in (("rank", "r", spec.rank), ("alpha", "lora_alpha", spec.alpha),
                             ("rslora", "use_rslora", spec.rslora)):  # fmt: skip
        have = config.get(key, False if key == "use_rslora" else None)
        if have != want:
            raise BadValue(field, f"is {want!r} but the adapter {where} has {key}={have!r}; "
                           f"set --config.lora.{field}={have}")  # fmt: skip


def _check_targets(folder, config: dict, model, spec, num_labels) -> None:
    """The modules the adapter's ``target_modules`` pick out must be the run's."""
    arch = _arch(model, spec, num_labels)
    every = _arch(model, spec._replace(targets=models.TARGETS[model.config["model_type"]]),
                  num_labels)  # fmt: skip
    family = module_names(every)
    picked = {n for n, m in family.items() if matches(config.get("target_modules") or [], m)}
    if picked != set(arch.lora_shapes):
        theirs = sorted({n.rsplit("/", 1)[-1] for n in picked})
        raise BadValue("targets", f"is {','.join(spec.targets)} but the adapter "
                       f"{folder / CONFIG_FILE} adapts {','.join(theirs) or 'none of them'} "
                       f"(target_modules {config.get('target_modules')!r}); set "
                       f"--config.lora.targets={','.join(theirs)}")  # fmt: skip


def _read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    with safe_open(path, framework="numpy") as f:
        return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}  # noqa: SIM118


def read(folder, model: models.Model, spec: models.LoraSpec,
         num_labels: int) -> dict[str, Any]:  # fmt: skip
    """``{"lora", "head"}`` from a PEFT LoRA folder for ``model`` built with ``spec``: the
    adapter's factors, and its saved head (``modules_to_save``) or else the model's fresh
    one. Raises :class:`BadValue` naming the ``lora`` field that differs, or ``init_from``
    for a folder that is not a matching LoRA adapter."""
    folder = pathlib.Path(folder).expanduser()
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        tensors = _read_tensors(folder / WEIGHTS_FILE)
    except (OSError, ValueError) as e:
        raise BadValue("init_from", f"{folder}: not a PEFT LoRA folder ({e})") from e
    _check_config(folder, config, spec)
    _check_targets(folder, config, model, spec, num_labels)
    arch = _arch(model, spec, num_labels)
    lora = {}
    for n, m in module_names(arch).items():
        lora[n] = {}
        for k, fresh in model.trainable["lora"][n].items():
            value = tensors.pop(f"{PREFIX}{m}.lora_{k}.weight", None)
            if value is None or value.shape != fresh.shape:
                got = "missing" if value is None else f"shape {value.shape}"
                raise BadValue("init_from", f"{folder / WEIGHTS_FILE}: {PREFIX}{m}.lora_{k}."
                               f"weight is {got}, the run needs {fresh.shape}")  # fmt: skip
            lora[n][k] = jnp.asarray(value)
    head = _read_head(folder, arch, model.trainable["head"], tensors)
    if tensors:
        raise BadValue("init_from", f"{folder / WEIGHTS_FILE}: tensors the run has no place "
                       f"for: {', '.join(sorted(tensors)[:5])}")  # fmt: skip
    return {"lora": lora, "head": head}


def _read_head(folder: pathlib.Path, arch, fresh: dict, tensors: dict) -> dict:
    """The saved head (popped from ``tensors``), or ``fresh`` when none was saved."""
    want = {PREFIX + k: v.shape for k, v in _head_tensors(arch, fresh).items()}
    found = {k: tensors.pop(k) for k in want if k in tensors}
    if not found:
        return fresh
    wrong = [k for k in want if k not in found or found[k].shape != want[k]]
    if wrong:
        raise BadValue("init_from", f"{folder / WEIGHTS_FILE}: the saved head does not fit "
                       f"the run's: {wrong[0]} (the run needs {want[wrong[0]]})")  # fmt: skip
    flat = {}
    for path in traverse_util.flatten_dict(fresh):
        value = found[PREFIX + arch.checkpoint_name(("head", *path))]
        flat[path] = jnp.asarray(value.T if path[-1] == "kernel" else value)
    return traverse_util.unflatten_dict(flat)
