"""What ``model.remat`` costs and saves: one decoder client step with and without it.

    python -m benchmarks.remat [--layers 8] [--hidden 256] [--batch_size 8] [--seq_len 256]

Builds a random LLaMA-shaped decoder (no files), jits one client's local update (one
AdamW step on the GSM8K task's loss, LoRA r=16 on q_proj and v_proj) with ``remat`` off
and on, and prints for each: the compiled program's ``memory_analysis()`` temporary bytes
(the activations kept for the backward pass live there) and the best of ``--repeats``
step times, timed alternately so that a change of machine load hits both alike. This is
the measurement behind the decoder configs' ``model.remat`` default (configs/gsm8k.py).
Asserts nothing.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from floranna_jax import clients, models
from floranna_jax.tasks import generation


def decoder_config(layers: int, hidden: int) -> dict:
    """The tiny decoder config widened to ``hidden`` and deepened to ``layers``."""
    return models.tiny_config("llama") | {
        "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": 4 * hidden,
        "vocab_size": 2048,
    }  # fmt: skip


def step_program(a, remat: bool):
    """``(jitted local update, its arguments)`` of one step of one client."""
    spec = models.LoraSpec(rank=16, alpha=16.0, targets=("q_proj", "v_proj"))
    model = models.build_random(decoder_config(a.layers, a.hidden), lora=spec, remat=remat)
    opt = clients.make_optimizer("adamw", 1e-3)
    update = jax.jit(clients.make_local_update(generation.loss_fn(model), opt))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 2048, (1, a.batch_size, a.seq_len)).astype(np.int32)
    ones = np.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": ones, "loss_mask": ones,
             "mask": np.ones(ids.shape[:2], np.float32)}  # fmt: skip
    args = (model.base, model.trainable, clients.init_opt_state(opt, model.trainable), batch,
            jnp.ones((1,), jnp.float32), jax.random.key(0))  # fmt: skip
    return update, args


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    a = parser.parse_args(argv)
    programs = {remat: step_program(a, remat) for remat in (False, True)}
    report = {}
    for remat, (update, args) in programs.items():
        compiled = update.lower(*args).compile()
        temp = int(compiled.memory_analysis().temp_size_in_bytes)
        jax.block_until_ready(update(*args))  # compiles and warms up
        report[remat] = {"temp_bytes": temp, "step_s": float("inf")}
    for _ in range(a.repeats):
        for remat, (update, args) in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(update(*args))
            report[remat]["step_s"] = min(report[remat]["step_s"], time.perf_counter() - start)
    print(f"decoder {a.layers} layers x {a.hidden} wide, batch {a.batch_size} x {a.seq_len} "
          f"tokens, one step, {jax.devices()[0].platform}")  # fmt: skip
    for remat, r in report.items():
        print(f"remat={remat!s:5}  temp {r['temp_bytes'] / 2**20:8.1f} MiB  "
              f"step {r['step_s'] * 1e3:8.1f} ms (best of {a.repeats})")  # fmt: skip
    off, on = report[False], report[True]
    print(f"remat: temp x{on['temp_bytes'] / off['temp_bytes']:.2f}, "
          f"step time x{on['step_s'] / off['step_s']:.2f}")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
