r"""Generate text with a run's decoder, or with any decoder model folder; prints completions.

    python -m floranna_jax.generate --workdir=runs/gsm8k_smollm2_fedit \
        --prompt="Question: Tom has 3 apples and buys 4 more. How many has he?"
    python -m floranna_jax.generate --workdir=W --client=2 --prompt_file=prompts.txt
    python -m floranna_jax.generate --model=exported/fedit_merged --prompt=Hi --raw \
        --temperature=0.7 --top_p=0.9 --seed=1

``--workdir``: the run's global model at its newest checkpoint (``--client=N``: client N's
own adapter, where the method keeps one), its tokenizer (the model folder's, or the byte
tokenizer of smoke runs) and its prompt format (``data.prompt``: the chat template, or the
plain text after the tokenizer's bos), as the task builds its prompts. ``--model``: a
Hugging Face decoder folder (an export ``--merged``) or hub id, with its own tokenizer and
the chat template when it has one. ``--raw`` sends the text as it is, no template, no bos.
``--prompt_file`` holds one prompt per line. Decoding is greedy unless ``--temperature``
is above 0 (then nucleus sampling with ``--top_p``, seeded by ``--seed``); a completion
ends at the tokenizer's eos, at one of the run's stop strings (``eval.stop``, e.g. GSM8K's
"Question:"; the text before it is printed) or after ``--max_new_tokens`` (default: the
run's ``eval.max_new_tokens``, else 128). Every bad input is one ``error: ...`` line, exit 2.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import app, flags

from floranna_jax import cli, models, result
from floranna_jax.data import completion, glue
from floranna_jax.errors import ConfigError, first_line
from floranna_jax.models import decoder, loading

DEFAULT_MAX_NEW_TOKENS = 128


class Generator(NamedTuple):
    """What decoding needs: the model (its config and LoRA scale), the frozen ``base``, the
    ``adapters`` (``{}``: none), the tokenizer as a ``completion.Codec``, the prompt format
    (``"chat"`` or ``"plain"``), the default number of new tokens and the stop strings."""

    model: models.Model
    base: Any
    adapters: dict
    codec: completion.Codec
    fmt: str
    max_new_tokens: int
    stops: tuple[str, ...] = ()


def _tokenizer(path: str) -> completion.Codec:
    try:
        return completion.hf_codec(glue.load_tokenizer(os.path.expanduser(path)))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot load its tokenizer: {first_line(e)}") from e


def from_workdir(workdir: str, client: int | None = None) -> Generator:
    """The run in ``workdir`` (newest checkpoint): its global model or ``client``'s."""
    res = result.load(workdir)
    if jax.tree.leaves(res.state.head):  # encoders have a classifier head, decoders none
        raise ConfigError(f"--workdir {workdir}: a {res.config.data.task} run trains an "
                          "encoder classifier, which does not generate text")  # fmt: skip
    c = res.config
    codec = completion.byte_codec() if c.data.tokenizer == "bytes" else _tokenizer(c.model.path)
    fmt = completion.resolve_format(codec, c.data.prompt)
    adapters = result.trainable(res, client)["lora"]
    stops = tuple(c.eval.get("stop", ()))
    return Generator(res.model, result.base(res), adapters, codec, fmt, c.eval.max_new_tokens,
                     stops)  # fmt: skip


def _decoder_folder(path: str):
    """The local folder of ``path`` (a hub id is fetched), which must hold a decoder."""
    try:
        folder = loading.resolve_folder(path)
        model_type = loading.read_config(folder).get("model_type")
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {path}: {first_line(e)}") from e
    if model_type not in decoder.MODEL_TYPES:
        raise ConfigError(f"--model {path}: a {model_type} model does not generate text; "
                          f"decoders: {', '.join(decoder.MODEL_TYPES)}")  # fmt: skip
    return folder


def from_model(path: str) -> Generator:
    """A Hugging Face decoder folder or hub id, no adapters, its tokenizer's format."""
    folder = _decoder_folder(path)
    try:
        model = models.load_pretrained(folder, num_labels=0, lora=models.LoraSpec(targets=()))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {path}: {first_line(e)}") from e
    codec = _tokenizer(str(folder))
    return Generator(model, model.base, {}, codec, completion.resolve_format(codec, "auto"),
                     DEFAULT_MAX_NEW_TOKENS)  # fmt: skip


def complete(gen: Generator, prompts: list[str], *, raw: bool = False,
             max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0) -> list[str]:  # fmt: skip
    """One completion per prompt (decoded, up to the eos or before a stop string), all
    prompts in one batch."""
    codec = gen.codec
    ids = [codec.encode(p) if raw else completion.prompt_ids(codec, p, gen.fmt) for p in prompts]
    prompt_ids, mask = completion.left_pad(ids, max(len(i) for i in ids), codec.pad_id)
    try:
        new = decoder.generate(
            gen.model, gen.base, gen.adapters, prompt_ids, mask,
            max_new_tokens=max_new_tokens or gen.max_new_tokens, eos_ids=(codec.eos_id,),
            stop_ids=completion.stop_sequences(codec, gen.stops), pad_id=codec.pad_id,
            temperature=temperature, top_p=top_p, key=jax.random.key(seed),
        )  # fmt: skip
    except ValueError as e:  # too long for the model's positions, a bad top_p
        raise ConfigError(first_line(e)) from e
    texts = [codec.decode(completion.until_eos(row, codec.eos_id)) for row in np.asarray(new)]
    return [completion.cut_at(text, gen.stops) for text in texts]


def _prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    prompts = [] if prompt is None else [prompt]
    if prompt_file:
        try:
            with open(prompt_file) as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise ConfigError(f"--prompt_file {prompt_file}: {first_line(e)}") from e
    if not prompts:
        raise ConfigError("no prompt: give --prompt=TEXT or --prompt_file=FILE")
    return prompts


def _check(f) -> None:
    if (f.workdir is None) == (f.model is None):
        raise ConfigError("give exactly one of --workdir=RUN_FOLDER and --model=FOLDER_OR_HUB_ID")
    if f.client is not None and f.workdir is None:
        raise ConfigError("--client needs --workdir (a model folder has no clients)")
    if f.temperature < 0:
        raise ConfigError(f"--temperature={f.temperature}: must be >= 0 (0: greedy)")
    if f.max_new_tokens is not None and f.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens={f.max_new_tokens}: must be >= 1")


def define_flags() -> None:
    """The command's flags (defined when run as a command, so importing defines none)."""
    flags.DEFINE_string("workdir", None, "a run's folder: its global model")
    flags.DEFINE_integer("client", None, "with --workdir: this client's own adapter (FedSA)")
    flags.DEFINE_string("model", None, "a Hugging Face decoder folder or hub id")
    flags.DEFINE_string("prompt", None, "the prompt text")
    flags.DEFINE_string("prompt_file", None, "a file of prompts, one per line")
    flags.DEFINE_bool("raw", False, "send the text as it is: no chat template, no bos")
    flags.DEFINE_integer("max_new_tokens", None, "tokens to generate at most")
    flags.DEFINE_float("temperature", 0.0, "0: greedy; above 0: sample at this temperature")
    flags.DEFINE_float("top_p", 1.0, "sampling: keep the most likely tokens up to this mass")
    flags.DEFINE_integer("seed", 0, "sampling: the random seed")


def main(argv):
    cli.begin(argv)
    f = flags.FLAGS
    try:
        _check(f)
        prompts = _prompts(f.prompt, f.prompt_file)
        gen = from_workdir(f.workdir, f.client) if f.workdir else from_model(f.model)
        outs = complete(gen, prompts, raw=f.raw, max_new_tokens=f.max_new_tokens,
                        temperature=f.temperature, top_p=f.top_p, seed=f.seed)  # fmt: skip
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        if len(prompts) > 1:
            print(f"--- {i + 1}: {prompt[:60]}")
        print(out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
