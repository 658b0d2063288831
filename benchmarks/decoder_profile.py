"""Where one decoder client step spends its time: XLA's own per-op trace, grouped.

    python -m benchmarks.decoder_profile [--model FOLDER] [--out bench_out/decoder_profile]

The step is :mod:`benchmarks.decoder`'s training step (SmolLM2-135M, batch 4 x 256 random
ids, LoRA r=16 on q/v, dropout 0.05, AdamW), compiled once, timed twice, then run once
under ``jax.profiler`` (a Perfetto trace in ``--out``). Each traced op is looked up in
the compiled program by name and put in one group: matrix products (an op whose fused
computation holds a ``dot``), buffer fills (``broadcast``), copies and transposes, scan
writes (``dynamic-update-slice``), and the rest (elementwise work, reductions). Prints
each group's share of the traced op time and the costliest ops with their output shapes;
asserts nothing. The profiler adds overhead, and ops of one thread pool may overlap, so
shares, not absolute times, are the figures to read.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine
from benchmarks.decoder import DEFAULT_MODEL, training_batches
from floranna_jax import clients, models
from floranna_jax.tasks import generation

_RUNTIME = ("ThunkExecutor", "$", "Slinky", "PjitFunction", "while")  # not ops of the program


def step(folder: str):
    """``(jitted step, its arguments)`` of one client step on SmolLM2 shapes."""
    spec = models.LoraSpec(rank=16, alpha=16.0, targets=("q_proj", "v_proj"), dropout=0.05)
    model = models.load_pretrained(folder, lora=spec)
    opt = clients.make_optimizer("adamw", 2e-4)
    run = jax.jit(clients.make_local_update(generation.loss_fn(model), opt))
    ids = np.random.default_rng(0).integers(3, model.config["vocab_size"], (1, 4, 256))
    args = (model.base, model.trainable, clients.init_opt_state(opt, model.trainable),
            training_batches(ids.astype(np.int32)), jnp.ones((1,), jnp.float32),
            jax.random.key(0))  # fmt: skip
    return run, args


def op_groups(hlo: str) -> dict[str, tuple[str, str]]:
    """``instruction name -> (group, output shape)`` of a compiled program's text."""
    bodies = dict(re.findall(r"\n(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S))
    out = {}
    instruction = r"\n\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)"
    for name, shape, op, rest in re.findall(instruction, hlo):
        called = re.search(r"calls=%([\w.\-]+)", rest)
        body = bodies.get(called.group(1), "") if called else ""
        text = f"{op}\n{body}"
        if " dot(" in body or op == "dot":
            group = "matrix products"
        elif "dynamic-update-slice" in text:
            group = "scan writes"
        elif op == "copy" or " copy(" in body or " transpose(" in body:
            group = "copies and transposes"
        elif " broadcast(" in body and body.count("\n") < 3:
            group = "buffer fills"
        else:
            group = "elementwise and reductions"
        out[name] = (group, shape)
    return out


def traced_ops(folder: pathlib.Path) -> tuple[collections.Counter, collections.Counter]:
    """Summed microseconds and call counts per op name of the newest trace in ``folder``."""
    path = sorted(folder.glob("**/*.trace.json.gz"), key=os.path.getmtime)[-1]
    events = json.loads(gzip.open(path).read())["traceEvents"]
    time_us, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(_RUNTIME):
            time_us[e["name"]] += e.get("dur", 0)
            calls[e["name"]] += 1
    return time_us, calls


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--out", default="bench_out/decoder_profile")
    parser.add_argument("--top", type=int, default=12, help="costliest ops listed")
    a = parser.parse_args(argv)
    run, args = step(a.model)
    jax.block_until_ready(run(*args))  # compiles
    walls = []
    for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        walls.append(time.perf_counter() - start)
    out = pathlib.Path(a.out)
    jax.profiler.start_trace(str(out), create_perfetto_trace=True)
    jax.block_until_ready(run(*args))
    jax.profiler.stop_trace()
    groups = op_groups(run.lower(*args).compile().as_text())
    time_us, calls = traced_ops(out)
    total = sum(time_us.values())
    by_group = collections.Counter()
    for name, us in time_us.items():
        by_group[groups.get(name, ("other", ""))[0]] += us
    m = machine.describe()
    print(f"machine: {m['cpu']}, {m['cores']} cores, jax {m['jax']}; load average "
          f"{os.getloadavg()[0]:.2f}; step {min(walls):.2f} s untraced (best of 2), traced op "
          f"time {total / 1e6:.2f} s")  # fmt: skip
    print("| group | s | share |\n|---|---|---|")
    for group, us in by_group.most_common():
        print(f"| {group} | {us / 1e6:.2f} | {us / total:.1%} |")
    print("| op | group | output | calls | s | share |\n|---|---|---|---|---|---|")
    for name, us in time_us.most_common(a.top):
        group, shape = groups.get(name, ("other", ""))
        share = f"{us / 1e6:.3f} | {us / total:.1%}"
        print(f"| {name} | {group} | `{shape}` | {calls[name]} | {share} |")


if __name__ == "__main__":
    main()
