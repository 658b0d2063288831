"""A prepared accelerator check: training, memory, vmap against loop, and decoding speed.

    python -m benchmarks.accelerator [--tiny] [--out bench_out/accelerator.json]

On the first device of this process (a GPU is the point; ``--tiny`` runs small shapes
end to end on a CPU in about a minute, which is how it is tested) it measures, on random
LLaMA-shaped decoders (no files; base and compute in bfloat16, LoRA r=16 on q_proj and
v_proj, remat on, the AdamW local update of :mod:`floranna_jax.clients`):

1. client training: ``--steps`` local steps of ``--batch`` sequences of ``--seq`` tokens
   as micro-batches of ``--micro``; tokens/s, and model FLOPs utilization: the matrix
   FLOPs the plan counts (:mod:`floranna_jax.plan.flops`) per second over the device's
   peak bf16 FLOP/s from the plan's table (:mod:`floranna_jax.plan.devices`);
2. the measured peak memory (``memory_stats()["peak_bytes_in_use"]``, read right after
   that training, which is the first thing the process allocates beyond the base) against
   the plan's figure for the same program (arguments + outputs + temporaries of its ahead
   of time compilation, :mod:`floranna_jax.plan.figures`): the ratio, which should lie
   within 0.8-1.2; a CPU reports no memory statistics;
3. 4 clients of a smaller decoder: one vmapped program against 4 calls of the one-client
   program (best of 3 each);
4. greedy decoding (:func:`floranna_jax.models.decoder.generate`, no end token, so every
   row decodes ``--new_tokens``): new tokens/s over the batch.

Prints the machine (:mod:`benchmarks.machine`) and one line per figure, and writes them as
JSON to ``--out``. The base is drawn one tensor at a time in bfloat16, so no float32 copy
raises the peak before training. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine
from floranna_jax import clients, models
from floranna_jax.models import decoder
from floranna_jax.plan import DEVICES
from floranna_jax.plan.figures import measure
from floranna_jax.tasks import Program, generation

BF16 = jnp.bfloat16
# (hidden, layers, intermediate, heads, vocab): a 1.3B LLaMA for a GPU, and a small one.
SHAPES = {"full": (2048, 16, 5504, 16, 32000), "small": (512, 4, 1376, 8, 32000),
          "tiny": (64, 2, 172, 4, 256)}  # fmt: skip
KINDS = {"H100": "h100-80gb", "H200": "h200-141gb", "A100": "a100-80gb",
         "TPU v5 lite": "tpu-v5e", "TPU v5p": "tpu-v5p"}  # fmt: skip


def llama(shape: str, remat: bool = True):
    """A random bfloat16 LLaMA-shaped model with LoRA r=16 on q_proj and v_proj."""
    hidden, layers, inter, heads, vocab = SHAPES[shape]
    hf = decoder.tiny_config("llama") | {
        "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": inter,
        "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
    }  # fmt: skip
    spec = models.LoraSpec(rank=16, alpha=16.0, targets=("q_proj", "v_proj"))
    model = models.build_abstract(hf, lora=spec, compute_dtype=BF16, base_dtype=BF16, remat=remat)
    leaves, tree = jax.tree.flatten(model.base)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    draw = jax.jit(lambda k, s: 0.02 * jax.random.normal(k, s.shape, BF16), static_argnums=1)
    base = tree.unflatten([draw(k, s) for k, s in zip(keys, leaves, strict=True)])
    return model._replace(base=base)


def batches(vocab: int, lead: tuple[int, ...], seq: int) -> dict[str, np.ndarray]:
    """Random full rows ``[*lead, seq]``: every token real and in the loss."""
    ids = np.random.default_rng(0).integers(3, vocab, (*lead, seq)).astype(np.int32)
    ones = np.ones_like(ids)
    return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones,
            "mask": np.ones(lead, np.float32)}  # fmt: skip


def one_client(model, steps: int, batch: int, micro: int, seq: int):
    """``(jitted local update, its arguments)``: ``steps`` steps of ``batch`` rows."""
    opt = clients.make_optimizer("adamw", 1e-4)
    m = batch // micro
    update = clients.make_local_update(generation.loss_fn(model), opt, micro_batched=m > 1)
    lead = (steps, m, micro) if m > 1 else (steps, batch)
    args = (model.base, model.trainable, clients.init_opt_state(opt, model.trainable),
            batches(model.config["vocab_size"], lead, seq), jnp.ones((steps,), jnp.float32),
            jax.random.key(1))  # fmt: skip
    return jax.jit(update), args


def best_time(fn, repeats: int = 3) -> float:
    """Best wall time of ``fn()`` (its result blocked on) after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((DEVICES[v].peak_flops for k, v in KINDS.items() if k in kind), None)


def training(a, out: dict) -> None:
    """Figures 1 and 2 (see the module) on the ``full`` or ``tiny`` shape."""
    model = llama("tiny" if a.tiny else "full")
    update, args = one_client(model, a.steps, a.batch, a.micro, a.seq)
    planned = measure(Program("client step", update, args, 1))
    seconds = best_time(lambda: update(*args), repeats=2)
    stats = jax.devices()[0].memory_stats() or {}
    out["train_tokens_per_s"] = a.steps * a.batch * a.seq / seconds
    out["train_step_s"] = seconds / a.steps
    out["plan_peak_bytes"] = planned.peak
    if (peak := peak_flops()) is not None:
        out["train_mfu"] = planned.flops / seconds / peak
    if "peak_bytes_in_use" in stats:
        out["measured_peak_bytes"] = int(stats["peak_bytes_in_use"])
        out["measured_over_plan"] = stats["peak_bytes_in_use"] / planned.peak
    out["generate_new_tokens_per_s"] = decoding(model, a)


def decoding(model, a) -> float:
    """Greedy new tokens per second over a batch of ``--gen_batch`` prompts."""
    prompts = batches(model.config["vocab_size"], (a.gen_batch,), a.prompt)
    ids, mask = jnp.asarray(prompts["input_ids"]), jnp.asarray(prompts["attention_mask"])

    def run():
        lora = model.trainable["lora"]
        return decoder.generate(model, model.base, lora, ids, mask, max_new_tokens=a.new_tokens,
                                eos_ids=(), compute_dtype=BF16)  # fmt: skip

    return a.gen_batch * a.new_tokens / best_time(run)


def vmap_against_loop(a, out: dict, num_clients: int = 4) -> None:
    """Figure 3: ``num_clients`` clients of the ``small`` (or ``tiny``) shape."""
    model = llama("tiny" if a.tiny else "small")
    update, args = one_client(model, a.steps, a.batch, a.micro, a.seq)
    stacked = (args[0], *jax.tree.map(lambda x: jnp.stack([x] * num_clients), args[1:]))
    vmapped = jax.jit(jax.vmap(update, in_axes=(None, 0, 0, 0, 0, 0)))
    out["vmap_s"] = best_time(lambda: vmapped(*stacked))
    out["loop_s"] = best_time(lambda: [update(*args) for _ in range(num_clients)])
    out["vmap_speedup"] = out["loop_s"] / out["vmap_s"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (a CPU test)")
    parser.add_argument("--out", default="bench_out/accelerator.json", help="figures as JSON")
    a = parser.parse_args(argv)
    a.steps, a.batch, a.micro, a.seq = (2, 4, 2, 64) if a.tiny else (4, 32, 8, 1024)
    a.gen_batch, a.prompt, a.new_tokens = (2, 16, 8) if a.tiny else (16, 256, 256)
    out = {"machine": machine.describe(), "shapes": vars(a).copy()}
    training(a, out)
    vmap_against_loop(a, out)
    for key, value in out.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
