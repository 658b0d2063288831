"""Per-device memory of a client step with the base split over devices, three ways.

    python -m benchmarks.fsdp [--layers 4 8] [--hidden 128] [--rows 4] [--tokens 16] \
        [--eval-tokens 64] [--new-tokens 16] [--out bench_out/fsdp.json]

On 8 CPU devices (``jax_num_cpu_devices``; a 2 x 4 ``("clients", "model")`` mesh) it
compiles ahead of time the vmapped local update of 4 clients (2 SGD steps each, a random
LLaMA-shaped decoder, LoRA r=4 on q_proj and v_proj, remat on) and prints, per device,
the ``memory_analysis()`` arguments, temporaries and peak (arguments + outputs - aliased +
temporaries) of:

- ``replicated``: the clients over 2 devices, the whole base on each;
- ``partitioner``: the base split over the model axis (:func:`floranna_jax.fsdp.leaf_spec`)
  and XLA's partitioner left to choose: it splits each matmul with its kernel and gathers
  activations (what ``train.model_shards`` did before the per-layer gather);
- ``layer gather``: the runner of ``train.model_shards`` (:mod:`floranna_jax.fsdp`): each
  layer gathered whole inside the layer scan, the rows of a client split over the model
  axis.

One layer's kernels, in bytes, are printed beside them. Then the evaluation's programs on
the same model (what ``tasks.generation`` compiles: the forward of the answer loss on
``--rows x --eval-tokens`` and greedy generation of ``--new-tokens`` after prompts of half
that length), each ``replicated``, ``partitioner`` (how a run evaluates a split base) and
``layer gather`` (traced under ``fsdp.tracing``, so the layer scan of the forward and of the
prefill gathers one layer at a time; decoding's unrolled layers stay the partitioner's).
All of it, with the machine, is written as JSON to ``--out``. Asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import machine
from benchmarks.remat import decoder_config
from floranna_jax import clients, fsdp, keys, models, runners
from floranna_jax.models import decoder
from floranna_jax.tasks import generation

MESH = (2, 4)  # clients x model
U, S = 4, 2  # clients, local steps


def problem(a, layers: int):
    """``(local update, base, the runner's other arguments)`` of a random decoder."""
    config = decoder_config(layers, a.hidden)
    spec = models.LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    model = models.build_random(config, lora=spec, remat=True)
    ids = np.random.default_rng(0).integers(3, config["vocab_size"], (U, S, a.rows, a.tokens))
    ones = np.ones_like(ids, dtype=np.int32)
    batches = {"input_ids": ids.astype(np.int32), "attention_mask": ones, "loss_mask": ones,
               "mask": np.ones((U, S, a.rows), np.float32)}  # fmt: skip
    opt = clients.make_optimizer("sgd", learning_rate=0.1, weight_decay=0.0)
    update = clients.make_local_update(generation.loss_fn(model), opt)
    trainable = model.trainable
    args = (runners.broadcast(trainable, U), runners.broadcast(opt.init(trainable), U),
            batches, jnp.ones((U, S), jnp.float32), keys.dropout_keys(jax.random.key(0),
            np.arange(U)))  # fmt: skip
    return update, model.base, args


def partitioner_only(update, mesh):
    """The vmapped update with the base constrained to its split and nothing else."""
    mapped = jax.vmap(update, in_axes=(None, 0, 0, 0, 0, 0))
    data = NamedSharding(mesh, P(runners.CLIENTS_AXIS))

    def run(base, *rows):
        base = jax.lax.with_sharding_constraint(base, fsdp.base_shardings(base, mesh, ("layers",)))
        return mapped(base, *jax.lax.with_sharding_constraint(rows, data))

    return jax.jit(run)


def figures(runner, base, args) -> dict:
    m = runner.lower(base, *args).compile().memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)  # fmt: skip
    return {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "peak": peak}  # fmt: skip


def measure(a, layers: int) -> dict:
    """The three programs' figures (see the module) at ``layers`` layers."""
    update, base, args = problem(a, layers)
    split = runners.make_mesh(model_shards=MESH[1])
    split_base = fsdp.place(base, split, ("layers",))
    programs = {
        "replicated": (runners.make_runner(update, mesh=runners.make_mesh(MESH[0])), base),
        "partitioner": (partitioner_only(update, split), split_base),
        "layer gather": (runners.make_runner(update, mesh=split, stacked=("layers",)), split_base),
    }
    out = {name: figures(run, b, args) for name, (run, b) in programs.items()}
    out["layer_bytes"] = sum(x[0].nbytes for x in jax.tree.leaves(base["layers"]) if x.ndim == 3)
    return out


def evaluation(a, layers: int) -> dict:
    """The evaluation's forward and generation, three ways (see the module)."""
    config = decoder_config(layers, a.hidden)
    spec = models.LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    model = models.build_random(config, lora=spec)
    ids = np.random.default_rng(0).integers(3, config["vocab_size"], (a.rows, a.eval_tokens))
    ones = np.ones_like(ids, dtype=np.int32)
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": ones, "loss_mask": ones}
    prompt = (ids[:, : a.eval_tokens // 2].astype(np.int32), ones[:, : a.eval_tokens // 2])
    forward = jax.jit(lambda base, t, batch: model.apply(base, t, batch))
    generate = jax.jit(lambda base, adapters, ids, mask: decoder.generate(
        model, base, adapters, ids, mask, max_new_tokens=a.new_tokens))  # fmt: skip
    split = runners.make_mesh(model_shards=MESH[1])
    split_base = fsdp.place(model.base, split, ("layers",))
    ways = {"replicated": (model.base, None), "partitioner": (split_base, None),
            "layer gather": (split_base, split)}  # fmt: skip
    out = {}
    for name, (base, mesh) in ways.items():
        with fsdp.tracing(mesh) if mesh is not None else contextlib.nullcontext():
            out[name] = {
                "forward": figures(forward, base, (model.trainable, batch)),
                "generate": figures(generate, base, (model.trainable["lora"], *prompt)),
            }
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--rows", type=int, default=4, help="rows per client step")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per row")
    parser.add_argument("--eval-tokens", type=int, default=64, help="tokens per eval row")
    parser.add_argument("--new-tokens", type=int, default=16, help="generated tokens")
    parser.add_argument("--out", default="bench_out/fsdp.json")
    a = parser.parse_args(argv)
    jax.config.update("jax_num_cpu_devices", MESH[0] * MESH[1])
    report = {"machine": machine.describe(), "args": vars(a)}
    print(report["machine"])
    for layers in a.layers:
        report[layers] = r = measure(a, layers)
        layer = r["layer_bytes"] / 1e6
        print(f"{layers} layers x {a.hidden} wide, {U} clients x {S} steps x {a.rows} rows x "
              f"{a.tokens} tokens; one layer's kernels {layer:.2f} MB")  # fmt: skip
        for name in ("replicated", "partitioner", "layer gather"):
            f = r[name]
            print(f"  {name:12}  arguments {f['arguments'] / 1e6:6.2f} MB  temporaries "
                  f"{f['temporaries'] / 1e6:6.2f} MB  peak {f['peak'] / 1e6:6.2f} MB")  # fmt: skip
        r["evaluation"] = ev = evaluation(a, layers)
        print(f"  evaluation: forward of {a.rows} x {a.eval_tokens} tokens; generation of "
              f"{a.new_tokens} tokens after {a.eval_tokens // 2}")  # fmt: skip
        for name, programs in ev.items():
            for program, f in programs.items():
                print(f"  {name:12}  {program:8}  arguments {f['arguments'] / 1e6:6.2f} MB  "
                      f"temporaries {f['temporaries'] / 1e6:6.2f} MB")  # fmt: skip
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
