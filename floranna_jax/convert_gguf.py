r"""Convert a llama.cpp GGUF file into a Hugging Face LLaMA folder, once, so loading needs no torch.

    python -m floranna_jax.convert_gguf SRC.gguf DEST_FOLDER

prints one line per stage and writes, into DEST_FOLDER (created if absent):

    tokenizer.json           a `tokenizers` byte-level BPE built from the GGUF's vocabulary,
                             merges and special tokens, splitting text as llama.cpp does
    tokenizer_config.json    special tokens, add_bos/add_eos, the chat template
    special_tokens_map.json
    model.safetensors        every tensor dequantized to float32, PyTorch Linear layout
                             [d_out, d_in], Q and K rows back in Hugging Face order
    config.json              model_type llama, written last: a folder with a config is whole

Only ``general.architecture == "llama"`` with a ``tokenizer.ggml.model == "gpt2"`` (byte-level
BPE) vocabulary is supported; anything else, a missing file, a file that is not GGUF or a
tensor that does not fit is one ``error: ...`` line on stderr and exit code 2, before
anything is written. Needs the ``gguf`` package (``pip install -e ".[convert]"``).

Two llama.cpp conventions are undone here:
  * its convert script permutes the rows of the Q and K projections for its rotary layout,
    ``w.reshape(n_head, 2, head_dim // 2, d).swapaxes(1, 2)`` (``n_head_kv`` heads for K);
    :func:`unpermute_rows` inverts it.
  * its pre-tokenizer is chosen by ``tokenizer.ggml.pre`` from a table of regexes applied
    one after the other (llama.cpp ``llama-vocab.cpp``); ``gguf_tokenizer.PRE_TOKENIZERS``
    holds the ones supported. SmolLM2's ``smollm`` isolates every digit first, so
    ``"x =    123"`` is ``x, " =", "    ", 1, 2, 3`` (transformers' own GGUF tokenizer gives
    ``..., "   ", " ", 1, 2, 3``).
"""

from __future__ import annotations

import collections
import importlib.metadata
import json
import math
import os
import pathlib
import struct
import sys
import time
from collections.abc import Callable

import numpy as np
from absl import logging

from floranna_jax.errors import ConversionError, first_line
from floranna_jax.gguf_tokenizer import build_tokenizer

USAGE = "usage: python -m floranna_jax.convert_gguf SRC.gguf DEST_FOLDER"

# llama.cpp's tensor names -> Hugging Face LlamaForCausalLM's (without ".weight").
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face row order of a Q or K weight ``[n_head * head_dim, d_in]`` (or bias
    ``[n_head * head_dim]``) that llama.cpp permuted with
    ``reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2)``: the inverse permutation."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ConversionError(
            "the gguf package is needed to convert: pip install 'floranna_jax[convert]'"
        ) from None
    return gguf


def _open(gguf, src: pathlib.Path):
    """A GGUFReader over ``src``, or why not."""
    if not src.is_file():
        raise ConversionError(f"{src}: no such file")
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConversionError(f"{src}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        return gguf.GGUFReader(src)
    except Exception as e:  # the reader ran past the end, or met a value it cannot read
        size = src.stat().st_size
        raise ConversionError(
            f"{src}: unreadable GGUF, truncated or corrupt ({size} bytes; the reader says: "
            f"{first_line(e)}); download or export it again"
        ) from None


class _Meta:
    """The GGUF key-value metadata, read on demand; a missing required key is an error."""

    def __init__(self, reader):
        self._fields = reader.fields

    def __call__(self, key: str, default=...):
        if key not in self._fields:
            if default is ...:
                raise ConversionError(f"metadata key {key!r} is missing")
            return default
        return self._fields[key].contents()

    def scalar(self, key: str, default=...) -> int | float:
        value = self(key, default)
        if isinstance(value, list):
            raise ConversionError(f"{key} varies per layer ({value[:4]}...); not supported")
        return value


def hf_config(meta: _Meta, tensor_names: set[str]) -> dict:
    """``config.json`` for LlamaForCausalLM from llama.cpp's ``llama.*`` keys."""
    arch = meta("general.architecture")
    if arch != "llama":
        raise ConversionError(f"architecture {arch!r} is not supported; only 'llama'")
    if meta.scalar("llama.expert_count", 0):
        raise ConversionError("a mixture-of-experts llama is not supported")
    scaling = meta("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise ConversionError(f"rope scaling ({scaling!r} or rope_freqs) is not supported")
    hidden, heads = meta.scalar("llama.embedding_length"), meta.scalar("llama.attention.head_count")
    head_dim = meta.scalar("llama.attention.key_length", hidden // heads)
    if meta.scalar("llama.attention.value_length", head_dim) != head_dim:
        raise ConversionError("attention.value_length differs from key_length; not supported")
    if meta.scalar("llama.rope.dimension_count", head_dim) != head_dim:
        raise ConversionError("rope.dimension_count is not the head size (partial rotary)")
    theta = float(meta.scalar("llama.rope.freq_base", 10000.0))  # llama.cpp's default
    vocab = meta.scalar("llama.vocab_size", None) or len(meta("tokenizer.ggml.tokens"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": meta.scalar("llama.feed_forward_length"),
        "num_hidden_layers": meta.scalar("llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.scalar("llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": float(meta.scalar("llama.attention.layer_norm_rms_epsilon")),
        # both spellings: transformers 4 reads rope_theta, transformers 5 rope_parameters
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "max_position_embeddings": meta.scalar("llama.context_length"),
        "vocab_size": vocab,
        # llama.cpp writes no output matrix when it is the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    for name in ("bos", "eos", "padding"):
        token_id = meta.scalar(f"tokenizer.ggml.{name}_token_id", None)
        if token_id is not None:
            config[f"{name.replace('padding', 'pad')}_token_id"] = token_id
    return config


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """GGUF name -> numpy shape (PyTorch layout) of every tensor the config implies."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"token_embd": (v, d), "output_norm": (d,)}
    if not config["tie_word_embeddings"]:
        shapes["output"] = (v, d)
    layer = {
        "attn_norm": (d,),
        "attn_q": (q, d),
        "attn_k": (kv, d),
        "attn_v": (kv, d),
        "attn_output": (d, q),
        "ffn_norm": (d,),
        "ffn_gate": (f, d),
        "ffn_up": (f, d),
        "ffn_down": (d, f),
    }
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{k}": s for k, s in layer.items()})
    return {f"{name}.weight": shape for name, shape in shapes.items()}


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (names that
    :func:`_expected_shapes` lists)."""
    stem = gguf_name.removesuffix(".weight")
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.weight"
    _, layer, kind = stem.split(".")
    return f"model.layers.{layer}.{LAYER_NAMES[kind]}.weight"


def plan_weights(tensors, config: dict) -> list[tuple[str, tuple[int, ...], object, int | None]]:
    """``(hf_name, shape, reader tensor, heads to un-permute by or None)`` for every tensor,
    sorted by name. Unexpected, misshapen or missing tensors are one error naming them."""
    expected = _expected_shapes(config)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    plan, unknown, misshapen = [], [], []
    for t in tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        if t.name not in expected:
            unknown.append(t.name)
        elif shape != expected[t.name]:
            misshapen.append(f"{t.name} {shape} (expected {expected[t.name]})")
        else:
            kind = t.name.removesuffix(".weight").rpartition(".")[2]
            plan.append((hf_name(t.name), shape, t, heads.get(kind)))
    missing = sorted(set(expected) - {t.name for t in tensors})
    for what, names in (("unexpected", unknown), ("misshapen", misshapen), ("missing", missing)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise ConversionError(f"{what} tensors: {', '.join(names[:3])}{more}")
    return sorted(plan, key=lambda p: p[0])


def _dequantize(gguf, tensor, heads: int | None) -> np.ndarray:
    """One tensor as float32 ``[d_out, d_in]``, Q/K rows in Hugging Face order."""
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    w = np.asarray(w, np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape)))
    return unpermute_rows(w, heads) if heads else w


def check_dequantizable(gguf, tensors) -> None:
    """Dequantize the smallest tensor of each storage type, so that a type the installed
    ``gguf`` cannot read fails before anything is written."""
    smallest = {}
    for t in tensors:
        if t.tensor_type not in smallest or t.n_elements < smallest[t.tensor_type].n_elements:
            smallest[t.tensor_type] = t
    for t in smallest.values():
        try:
            _dequantize(gguf, t, None)
        except Exception as e:  # NotImplementedError for types this gguf version lacks
            raise ConversionError(
                f"{t.name}: cannot dequantize type {t.tensor_type.name} with gguf "
                f"{_version('gguf')}: {first_line(e) or type(e).__name__}"
            ) from None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def write_safetensors(path: pathlib.Path, items: list[tuple[str, tuple[int, ...]]], load) -> None:
    """A float32 safetensors file written one tensor at a time (``load(i) -> array`` of
    ``items[i]``'s shape), so memory holds one dequantized tensor, not the model."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in items:
        size = 4 * math.prod(shape)
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for i, (_, shape) in enumerate(items):
                array = np.ascontiguousarray(load(i), dtype="<f4")
                assert array.shape == shape, (items[i][0], array.shape, shape)
                f.write(array.tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def convert(src, dest, log: Callable[[str], None] = logging.info) -> dict:
    """Write the Hugging Face folder ``dest`` from the GGUF file ``src``; returns config.json's
    dict. Raises ConversionError, naming the file, before writing anything."""
    src, dest = pathlib.Path(src).expanduser(), pathlib.Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise ConversionError(f"{dest}: exists and is not a folder")
    gguf = _import_gguf()
    start = time.perf_counter()
    reader = _open(gguf, src)
    try:
        meta = _Meta(reader)
        config = hf_config(meta, {t.name for t in reader.tensors})
        plan = plan_weights(reader.tensors, config)
        tokenizer, tokenizer_config, special_map = build_tokenizer(meta, config)
        check_dequantizable(gguf, reader.tensors)
    except ConversionError as e:
        raise ConversionError(f"{src}: {e}") from None
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    log(
        f"read {src}: llama, {config['num_hidden_layers']} layers, hidden {config['hidden_size']},"
        f" {len(plan)} tensors ({', '.join(f'{k} x{n}' for k, n in types.most_common())}),"
        f" tokenizer {meta('tokenizer.ggml.model')}/{meta('tokenizer.ggml.pre')}"
        f" in {time.perf_counter() - start:.1f} s"
    )
    try:
        _write_folder(dest, gguf, plan, config, (tokenizer, tokenizer_config, special_map), log)
    except OSError as e:  # no space, no permission: one line naming the folder
        raise ConversionError(f"{dest}: cannot write: {first_line(e)}") from None
    log(f"done: {dest} in {time.perf_counter() - start:.1f} s")
    return config


def _write_folder(dest: pathlib.Path, gguf, plan, config: dict, tokenizer_files, log) -> None:
    """The tokenizer files, then the weights, then config.json (last: a folder with a
    config is whole)."""
    tokenizer, tokenizer_config, special_map = tokenizer_files
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(dest / "tokenizer.json"))
    _write_json(dest / "tokenizer_config.json", tokenizer_config)
    _write_json(dest / "special_tokens_map.json", special_map)
    log(f"tokenizer: {tokenizer.get_vocab_size()} tokens -> {dest / 'tokenizer.json'}")
    t0 = time.perf_counter()
    write_safetensors(
        dest / "model.safetensors",
        [(name, shape) for name, shape, _, _ in plan],
        lambda i: _dequantize(gguf, plan[i][2], plan[i][3]),
    )
    mib = sum(4 * math.prod(shape) for _, shape, _, _ in plan) / 2**20
    log(
        f"weights: {len(plan)} tensors dequantized to float32 ({mib:.0f} MiB) -> "
        f"{dest / 'model.safetensors'} in {time.perf_counter() - t0:.1f} s"
    )
    _write_json(dest / "config.json", config)


def _write_json(path: pathlib.Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """The command line: exit 0 when converted, 2 with one ``error:`` line otherwise."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if len(args) != 2:
        sys.stderr.write(f"error: expected SRC.gguf and DEST_FOLDER; {USAGE}\n")
        return 2
    try:
        convert(args[0], args[1], log=lambda line: print(line, flush=True))
    except ConversionError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
