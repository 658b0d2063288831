"""Round trip through transformers + PEFT on a real checkpoint: the exported adapter (on its
base) and the exported merged folder give the project's logits.

    python -m benchmarks.peft_round_trip --model FOLDER [--out bench_out/peft_round_trip.json]

``--model``: a LLaMA-family Hugging Face folder, e.g. SmolLM2-135M-Instruct converted from
its GGUF once (README: Decoders). LoRA r=16, alpha 32 on every projection, ``B`` drawn
``N(0, 0.02^2)`` so the adapter moves the logits; the adapter is written by
:mod:`floranna_jax.peft_folder`, the merged folder by ``models.save_pretrained`` after
``models.merge_into_base`` (what ``export --merged`` writes). Prints the max |difference|
of the logits (float32, over real tokens of two padded prompts) for the adapter, for the
merged folder, for the bare base (the float32 noise floor of two implementations of the
same model), and how far the adapter moved the logits; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

import jax.numpy as jnp
import numpy as np

from floranna_jax import models, peft_folder
from floranna_jax.data import completion, glue
from floranna_jax.models import decoder

PROMPTS = ["Question: Tom has 3 apples and buys 4 more. How many apples has he?\nAnswer:\n",
           "def fibonacci(n):"]  # fmt: skip


def _batch(folder) -> dict[str, np.ndarray]:
    codec = completion.hf_codec(glue.load_tokenizer(folder))
    ids = [completion.prompt_ids(codec, p, "plain") for p in PROMPTS]
    rows = completion.arrays(ids, [[] for _ in ids], max_length=128)
    return {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]}


def _torch_logits(model, batch) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(**{k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()})
    return out.logits.float().numpy()


def measure(folder: str, work: pathlib.Path) -> dict[str, float]:
    import peft
    import transformers

    spec = models.LoraSpec(rank=16, alpha=32.0, targets=decoder.TARGETS)
    model = models.load_pretrained(folder, num_labels=0, lora=spec)
    rng = np.random.default_rng(0)
    lora = {n: {"A": f["A"], "B": jnp.asarray(rng.normal(0, 0.02, f["B"].shape), jnp.float32)}
            for n, f in model.trainable["lora"].items()}  # fmt: skip
    peft_folder.write(work / "adapter", model, spec, 0, {"lora": lora, "head": {}}, folder)
    merged = models.merge_into_base(model.base, {n: f["B"] @ f["A"] for n, f in lora.items()},
                                    model.lora_scale)  # fmt: skip
    models.save_pretrained(model._replace(base=merged), work / "merged")

    batch = _batch(folder)
    real = batch["attention_mask"] > 0
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = np.asarray(decoder.logits(model.config, model.base, lora, ids, mask,
                                     lora_scale=model.lora_scale))  # fmt: skip
    bare = np.asarray(decoder.logits(model.config, model.base, {}, ids, mask))
    cls = transformers.LlamaForCausalLM
    base = cls.from_pretrained(folder, attn_implementation="eager")
    with_adapter = peft.PeftModel.from_pretrained(base, work / "adapter").eval()
    merged_ref = cls.from_pretrained(work / "merged", attn_implementation="eager").eval()

    def diff(a, b) -> float:
        return float(np.max(np.abs(a - b)[real]))

    with with_adapter.disable_adapter():  # the same torch model, adapter off
        torch_bare = _torch_logits(with_adapter, batch)

    return {
        "adapter_vs_peft": diff(ours, _torch_logits(with_adapter, batch)),
        "merged_vs_transformers": diff(ours, _torch_logits(merged_ref, batch)),
        "bare_vs_transformers": diff(bare, torch_bare),
        "adapter_effect": diff(ours, bare),
        "tokens": int(real.sum()),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a LLaMA-family Hugging Face folder")
    parser.add_argument("--out", default="bench_out/peft_round_trip.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        figures = measure(os.path.expanduser(args.model), pathlib.Path(work))
    for k, v in figures.items():
        print(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(figures | {"model": args.model}, f, indent=2)
    return figures


if __name__ == "__main__":
    main()
