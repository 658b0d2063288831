r"""Export a run's result for other tools: a PEFT LoRA adapter, or a merged model folder.

    python -m floranna_jax.export --workdir=runs/gsm8k_smollm2_fedit --out=exported/fedit
    python -m floranna_jax.export --workdir=W --out=D --merged        # HF model folder
    python -m floranna_jax.export --workdir=W --out=D --client=3      # FedSA: client 3's B
    python -m floranna_jax.export --workdir=W --out=D --round=2       # an earlier checkpoint

The adapter folder (:mod:`floranna_jax.peft_folder`) loads with
``peft.PeftModel.from_pretrained(base, D)`` on the run's ``model.path``; an encoder's
classifier head is in it (``modules_to_save``). ``--merged`` writes ``config.json``,
``model.safetensors`` (in the dtype of the base checkpoint's tensors) and the base folder's
tokenizer files, with the adapter and the method's merges folded into the weights, for
``AutoModelFor*.from_pretrained(D)`` or ``python -m floranna_jax.generate --model=D``.

FLoRA and FedEx fold their updates into the base weights as they go, which an adapter
cannot carry: they export ``--merged`` only. ``--client`` exists where the method keeps a
personal adapter (FedSA). Every refusal or bad input is one ``error: ...`` line, exit 2.
"""

from __future__ import annotations

import os
import shutil
import sys

from absl import app, flags

from floranna_jax import cli, experiment, models, peft_folder, result
from floranna_jax.errors import ConfigError
from floranna_jax.models import loading

# What a model folder holds beside its weights, for a tokenizer and generation to load.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "generation_config.json",
)  # fmt: skip


def _check_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: is a file, not a folder; choose another path")


def write_adapter(res: result.Result, out: str, client: int | None = None) -> None:
    """The global adapter (or ``client``'s) and head of ``res`` as a PEFT LoRA folder."""
    if result.keeps_merges(res):
        raise ConfigError(
            f"method {res.config.server.name} keeps its merged updates in the base weights, "
            "which a LoRA adapter cannot carry; export with --merged"
        )
    trainable = result.trainable(res, client)
    _check_out(out)
    peft_folder.write(out, res.model, experiment.lora_spec(res.config), res.task.num_labels,
                      trainable, base_model=os.path.expanduser(res.config.model.path))  # fmt: skip


def write_merged(res: result.Result, out: str, client: int | None = None) -> None:
    """A Hugging Face model folder whose plain forward is ``res``'s global model (or
    ``client``'s): weights in the base checkpoint's dtype, and its tokenizer files."""
    head = result.trainable(res, client)["head"]
    weights = result.merged_base(res, client)
    _check_out(out)
    dtype, source = "float32", None
    if res.config.model.source == "pretrained":  # the folder the run loaded its base from
        source = loading.resolve_folder(os.path.expanduser(res.config.model.path))
        dtype = loading.checkpoint_dtype(source)
    model = res.model._replace(base=weights, trainable={"lora": {}, "head": head})
    models.save_pretrained(model, out, dtype)
    for name in TOKENIZER_FILES if source else ():
        if (source / name).is_file():
            shutil.copyfile(source / name, os.path.join(out, name))


def export(workdir: str, out: str, *, client: int | None = None, round_: int | None = None,
           merged: bool = False) -> str:  # fmt: skip
    """Write the export of the run in ``workdir`` to ``out``; returns what was written, in
    one line. Raises ``ConfigError`` (one line) for what cannot be exported."""
    res = result.load(workdir, round_)
    (write_merged if merged else write_adapter)(res, out, client)
    what = "merged model folder" if merged else "PEFT LoRA adapter"
    whose = "global model" if client is None else f"client {client}"
    r = int(res.state.round)
    return f"wrote {what} of the {whose} ({res.config.server.name}, round {r}) to {out}"


def define_flags() -> None:
    """The command's flags (defined when run as a command, so importing defines none)."""
    flags.DEFINE_string("workdir", None, "the run's folder (launch.py --workdir)")
    flags.DEFINE_string("out", None, "folder to write")
    flags.DEFINE_integer("client", None, "this client's personal adapter (FedSA)")
    flags.DEFINE_integer("round", None, "the checkpoint of this round (default: newest)")
    flags.DEFINE_bool("merged", False, "a Hugging Face model folder, adapter merged in")
    flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    cli.begin(argv)
    try:
        f = flags.FLAGS
        print(export(f.workdir, f.out, client=f.client, round_=f["round"].value,
                     merged=f.merged))  # fmt: skip
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
