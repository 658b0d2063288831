"""Hugging Face model folders <-> parameter trees: ``config.json`` + safetensors, strictly.

Loading never guesses. Every parameter of the frozen base must be in the checkpoint with
the right shape, and every checkpoint tensor must be used, or be one the architecture
declares unused (buffers, pre-training heads); otherwise :func:`load_params` raises
``ValueError`` naming the keys. Only the task head may be missing, and then it is freshly
initialized and that is logged. Checkpoint names are normalized by the architecture
(``bert.``/``roberta.`` prefixes, LayerNorm ``gamma``/``beta``), so prefixed and unprefixed
checkpoints both load. PyTorch ``Linear`` weights ``[d_out, d_in]`` become Flax kernels
``[d_in, d_out]`` (every leaf named ``kernel``). The base comes out in the dtype asked for
(float32 or bfloat16, whatever the checkpoint's), the head in float32 (it trains). A
sharded checkpoint (``model.safetensors.index.json``) reads as one.

Host memory: tensors are read one at a time, each cast on the host and put on its devices
(``jax.device_put`` with the target sharding) before the next is read, so loading holds
about one tensor on the host beyond what the devices hold, never a host copy of the model.
Stacked layers (``Architecture.stacked``): a leaf ``[N, ...]`` under ``"layers"`` is
``N`` checkpoint tensors, those of ``"layers_0"`` ... ``"layers_{N-1}"``; the leaf is made
on the devices first and each layer written into it in place (a donated buffer).
"""

from __future__ import annotations

import collections
import functools
import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from floranna_jax.errors import first_line
from floranna_jax.models.architecture import Architecture, Params

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_LOCAL_HINT = (
    "pass a local model folder instead, e.g. one written by "
    "`bash shared/tools/fetch_models.sh` under ~/.cache/floranna/models/<name>"
)
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]  # config, weights, tokenizer


def resolve_folder(path_or_hub_id: str | os.PathLike, weights: bool = True) -> pathlib.Path:
    """A local model folder, or a Hugging Face hub id fetched with ``snapshot_download``
    (``weights=False``: its config and tokenizer only, what a plan reads).

    Offline (``HF_HUB_OFFLINE=1``) or unreachable hubs raise ``FileNotFoundError`` saying
    to pass a local folder; a hub id already in the local hub cache still resolves.
    """
    text = os.fspath(path_or_hub_id)
    path = pathlib.Path(text).expanduser()
    if path.is_dir():
        return path
    looks_local = path.is_absolute() or text.startswith((".", "~")) or not _HUB_ID.match(text)
    if looks_local or path.exists():
        raise FileNotFoundError(f"no model folder at {path}")
    try:
        import huggingface_hub  # only needed for hub ids

        return pathlib.Path(
            huggingface_hub.snapshot_download(
                repo_id=text,
                allow_patterns=_HUB_FILES if weights else _HUB_FILES[:1] + _HUB_FILES[2:],
            )
        )
    except Exception as e:  # offline mode, no network, unknown repo, auth: one message
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "the hub download failed"
        raise FileNotFoundError(
            f"{text!r} is not a local folder and {why}: {type(e).__name__}: {e}. {_LOCAL_HINT}."
        ) from e


def read_config(folder: pathlib.Path) -> dict:
    """The folder's ``config.json`` as a dict."""
    path = pathlib.Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    return json.loads(path.read_text())


def checkpoint_index(folder: pathlib.Path) -> dict[str, tuple[pathlib.Path, tuple[int, ...]]]:
    """``key -> (file, shape)`` over ``model.safetensors`` or its sharded index."""
    folder = pathlib.Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        absent = [name for name in files if not (folder / name).is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {absent}")
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.h5")
        )
        raise FileNotFoundError(
            f"no model.safetensors (or sharded index) in {folder}; found {others or 'nothing'}. "
            "Only safetensors are read: re-save with transformers' save_pretrained."
        )
    keys = {}
    for name in files:
        with _open_safetensors(folder / name) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key in keys:
                    raise ValueError(f"tensor {key!r} is in both {keys[key][0].name} and {name}")
                keys[key] = (folder / name, tuple(f.get_slice(key).get_shape()))
    return keys


def _open_safetensors(file: pathlib.Path):
    """``safe_open(file)``; a file shorter than its header says (a download or copy cut
    short) or not safetensors at all raises ``ValueError`` naming it."""
    try:
        return safe_open(file, framework="numpy")
    except SafetensorError as e:
        raise ValueError(
            f"{file} is not a whole safetensors file ({first_line(e)}): it is truncated or "
            "corrupt; download or save it again"
        ) from None


def read_tensor(file: pathlib.Path, key: str) -> np.ndarray:
    """One tensor as numpy in its checkpoint dtype (bfloat16 as ``ml_dtypes.bfloat16``;
    through jax where this safetensors' numpy reader does not know the dtype)."""
    try:
        with safe_open(file, framework="numpy") as f:
            return f.get_tensor(key)
    except TypeError:
        with safe_open(file, framework="flax") as f:
            return np.asarray(f.get_tensor(key))


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stacked: jax.Array, layer: jax.Array, i: jax.Array) -> jax.Array:
    """``stacked`` with ``stacked[i] = layer``, in place (the input buffer is donated)."""
    return stacked.at[i].set(layer)


def _one_layer(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer of a stacked leaf placed on ``sharding``."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
            *sharding.spec[1:]))  # fmt: skip
    return sharding


def read_leaves(index: dict, canon: dict, names: dict, dtype, sharding) -> Params:
    """The leaves ``names`` (:func:`_expected`) as a tree of ``dtype`` arrays on
    ``sharding`` (one for every leaf, or ``(path, shape) -> Sharding`` per leaf), one
    checkpoint tensor at a time: read, transposed if a kernel, cast on the host, put on the
    devices (each its shards), then dropped; a stacked leaf is filled layer by layer."""
    layers = collections.Counter(path for path, i, _ in names.values() if i is not None)
    where = sharding if callable(sharding) else lambda path, shape: sharding
    flat = {}
    for name, (path, i, _) in names.items():
        value = read_tensor(index[canon[name]][0], canon[name])
        value = np.asarray(value.T if path[-1] == "kernel" else value, dtype)
        shape = value.shape if i is None else (layers[path], *value.shape)
        leaf = where(path, shape)
        if i is None:
            flat[path] = jax.device_put(value, leaf)
            continue
        if path not in flat:
            flat[path] = jnp.zeros(shape, dtype, device=leaf)
        flat[path] = _write_layer(flat[path], jax.device_put(value, _one_layer(leaf)), i)
    return traverse_util.unflatten_dict(flat)


def _listing(names, limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _expected(arch: Architecture, shapes: Params, prefix: tuple[str, ...]) -> dict:
    """Canonical name -> (path, layer, checkpoint shape) for every leaf of ``shapes``;
    ``layer`` is the index into a stacked leaf's axis 0, None for an unstacked one."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        shape = tuple(leaf.shape)
        layers = [(None, path, shape)]
        if not prefix and path[0] in arch.stacked:
            layers = [(i, (f"{path[0]}_{i}", *path[1:]), shape[1:]) for i in range(shape[0])]
        for i, name_path, s in layers:
            s = s[::-1] if path[-1] == "kernel" else s
            out[arch.checkpoint_name(prefix + name_path)] = (path, i, s)
    return out


def _canonical(arch: Architecture, index: dict) -> dict[str, str]:
    """Canonical name -> raw key; logs the keys the architecture declares unused."""
    canon, unused = {}, []
    for raw in index:
        name = arch.canonical_key(raw)
        if name is None:
            unused.append(raw)
        elif name in canon:
            raise ValueError(f"checkpoint keys {canon[name]!r} and {raw!r} both mean {name!r}")
        else:
            canon[name] = raw
    if unused:
        logging.info("checkpoint keys not used by the model: %s", _listing(unused))
    return canon


def load_params(
    arch: Architecture,
    folder: pathlib.Path,
    *,
    head_key: jax.Array,
    load_head: bool = True,
    base_dtype=jnp.float32,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[Params, Params]:
    """``(base, head)`` from the folder's safetensors; raises ``ValueError`` on mismatch.

    The head is read from the checkpoint when all its tensors are there (a fine-tuned
    ``*ForSequenceClassification``) and ``load_head``; when none is there, or with
    ``load_head=False``, it is initialized from ``head_key`` and that is logged.
    ``base_dtype``: the base's dtype; the head is float32. ``sharding``: where every leaf
    goes (default: the first device), or ``(path, shape) -> Sharding`` for each leaf of
    the base (``fsdp.sharding_of``: each device gets its shards as a tensor is read; the
    head then goes to the first device).
    """
    index = checkpoint_index(folder)
    canon = _canonical(arch, index)
    base_want = _expected(arch, arch.base_shapes, ())
    head_want = _expected(arch, arch.head_shapes, ("head",))
    head_found = set(head_want) & set(canon)
    if not load_head:
        for name in head_found:
            del canon[name]
        head_found = set()
    want = base_want | (head_want if head_found else {})
    missing = set(want) - set(canon)
    unexpected = set(canon) - set(want)
    wrong = {
        n: f"{canon[n]} {index[canon[n]][1]} (model expects {shape})"
        for n, (_, _, shape) in want.items()
        if n in canon and index[canon[n]][1] != shape
    }
    if missing or unexpected or wrong:
        family = arch.name or arch.checkpoint_prefix[:-1]
        parts = [f"checkpoint in {folder} does not match the {family} model"]
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(canon[n] for n in unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {_listing(wrong.values())}")
        if (missing | set(wrong)) & set(head_want):
            parts.append("the checkpoint's task head differs: load_head=False starts a fresh one")
        raise ValueError("\n  ".join(parts))

    # This process's first device: jax.devices()[0] is process 0's, unreachable from others.
    first = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    sharding = sharding or first
    base = read_leaves(index, canon, base_want, base_dtype, sharding)
    if head_found:
        head_on = first if callable(sharding) else sharding
        return base, read_leaves(index, canon, head_want, jnp.float32, head_on)
    if not head_want:  # a family without a task head (decoders)
        return base, arch.init_head(head_key)
    logging.warning("task head %s is not in %s: initialized fresh", _listing(head_want), folder)
    return base, arch.init_head(head_key)


def parameter_names(arch: Architecture) -> list[str]:
    """Every parameter's full name in a Hugging Face checkpoint of ``arch``: the base's
    (with ``arch.checkpoint_prefix``, one per layer of a stack), then the head's."""
    base = [arch.checkpoint_prefix + n for n in _expected(arch, arch.base_shapes, ())]
    return base + list(_expected(arch, arch.head_shapes, ("head",)))


def checkpoint_dtype(folder: pathlib.Path) -> str:
    """The dtype name (``"float32"``, ``"bfloat16"``, ...) of the folder's first floating
    tensor in the checkpoint, what a model written back should keep."""
    dtypes = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
    for file, key in sorted((f, k) for k, (f, _) in checkpoint_index(folder).items()):
        with safe_open(file, framework="numpy") as f:
            name = dtypes.get(f.get_slice(key).get_dtype())
        if name is not None:
            return name
    return "float32"


def save_folder(
    folder: pathlib.Path, hf_config: dict, arch: Architecture, base: Params, head: Params,
    dtype: str = "float32",
) -> None:  # fmt: skip
    """Write ``config.json`` + ``model.safetensors`` laid out as Hugging Face does, the
    tensors in ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``).

    Base names get ``arch.checkpoint_prefix``; head names are bare (``classifier.*``),
    as in ``*ForSequenceClassification``, so transformers and :func:`load_params` read it.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for tree, prefix, key_prefix in ((base, (), arch.checkpoint_prefix), (head, ("head",), "")):
        for path, value in traverse_util.flatten_dict(tree).items():
            value = np.asarray(jnp.asarray(value).astype(dtype))  # numpy holds bf16 (ml_dtypes)
            layers = [(path, value)]
            if not prefix and path[0] in arch.stacked:
                layers = [((f"{path[0]}_{i}", *path[1:]), v) for i, v in enumerate(value)]
            for name_path, v in layers:
                v = v.T if path[-1] == "kernel" else v
                name = key_prefix + arch.checkpoint_name(prefix + name_path)
                tensors[name] = np.ascontiguousarray(v)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
