"""Benchmark of one federated round of local training: vmap, chunked vmap and loop runners.

    python -m benchmarks.clients [--model PATH] [--out bench_out/clients.json]
    python -m benchmarks.clients --data=real --glue=../shared/data/glue   # real SST-2

The second form is the real-data mode (:mod:`benchmarks.real_data`): packed and padded
runners against the PyTorch + PEFT peer, and evaluation against training. The rest of
this docstring is about the first, synthetic form.

Runs one round of ``U=10`` clients on all-MiniLM-L6-v2 (sequence length 64, batch 16,
5 local AdamW steps, LoRA r=16 on query/value, 2-label head, dropout on, synthetic
random token ids) three ways, the same math each time: ``make_runner(mode="vmap")``
(all clients in one vmapped program), ``mode="vmap", chunk=--chunk`` (the same program,
``--chunk`` clients at a time) and ``mode="loop"`` (the jitted one-client function, one
client after another). Prints and writes to ``--out``:

- examples/s of each mode and their ratio (best of ``--repeats`` timed calls, after a
  compile-and-warm-up call);
- FLOP/s achieved, FLOPs counted by XLA's ``cost_analysis()`` of one vmapped gradient
  step times the number of steps (the compiled round itself is a ``while`` loop whose
  body XLA's cost analysis counts once, so its own figure is printed for reference
  only), against this machine's float32 matmul peak timed in the same run;
- memory at ``U=10`` and ``U=50`` from ``compiled.memory_analysis()`` and the process
  max RSS, with the base bytes against the per-client state bytes, and a scan of the
  compiled HLO for any buffer shaped ``[U, *base_leaf_shape]`` (a per-client model copy).

Asserts nothing about time: the figures are for docs/clients_benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine, real_data
from floranna_jax import clients, keys, models, runners
from floranna_jax.tasks import classification

DEFAULT_MODEL = pathlib.Path.home() / ".cache" / "floranna" / "models" / "all-MiniLM-L6-v2"


def best_seconds(fn, repeats: int) -> float:
    """Best wall time of ``fn()`` (which must block) over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 FLOP/s of a jitted ``[n, n] @ [n, n]``."""
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.standard_normal((n, n)), jnp.float32) for _ in range(2))
    f = jax.jit(jnp.matmul)
    f(x, y).block_until_ready()
    return 2.0 * n**3 / best_seconds(lambda: f(x, y).block_until_ready(), repeats)


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def make_batches(vocab: int, U: int, S: int, b: int, L: int, seed: int = 0) -> dict:
    """Synthetic ``[U, S, b, L]`` token ids (no padding) and binary labels."""
    rng = np.random.default_rng(seed)
    return {
        "input_ids": jnp.asarray(
            rng.integers(min(1000, vocab // 2), vocab, (U, S, b, L)), jnp.int32
        ),
        "attention_mask": jnp.ones((U, S, b, L), jnp.int32),
        "label": jnp.asarray(rng.integers(0, 2, (U, S, b)), jnp.int32),
        "mask": jnp.ones((U, S, b), jnp.float32),
    }


def round_args(model, opt, U: int, S: int, b: int, L: int) -> tuple:
    """``(base, trainable_U, opt_state_U, batches_U, step_mask_U, keys_U)`` for one round."""
    trainable = model.trainable
    return (
        model.base,
        runners.broadcast(trainable, U),
        runners.broadcast(clients.init_opt_state(opt, trainable), U),
        make_batches(model.config["vocab_size"], U, S, b, L),
        jnp.ones((U, S), jnp.float32),
        keys.dropout_keys(keys.round_key(jax.random.key_data(keys.root(0)), 0), np.arange(U)),
    )


def step_flops(loss_fn, args: tuple) -> float:
    """XLA-counted FLOPs of one vmapped gradient step over all clients (no scan)."""
    base, trainable, _, batches, _, keys = args
    first = jax.tree.map(lambda x: x[:, 0], batches)
    grad = jax.vmap(jax.value_and_grad(loss_fn, argnums=1, has_aux=True), in_axes=(None, 0, 0, 0))
    return _flops(jax.jit(grad).lower(base, trainable, first, keys).compile())


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


def memory(compiled, base, U: int) -> dict:
    """``memory_analysis()`` bytes, and how many HLO buffers look like ``[U, *base_leaf]``."""
    m = compiled.memory_analysis()
    hlo = compiled.as_text()
    copies = 0
    for leaf in jax.tree.leaves(base):
        copies += hlo.count(f"f32[{U},{','.join(map(str, leaf.shape))}]")
    return {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "per_client_base_shaped_buffers_in_hlo": copies,
    }


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def timed(runner, args) -> tuple[float, float, object]:
    """Wall and process CPU seconds (all threads) of one blocking call, and its output."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(runner(*args))
    return time.perf_counter() - wall, time.process_time() - cpu, out


def bench_modes(by_mode: dict, args, repeats: int) -> tuple[dict, dict]:
    """First-call (compile + run) and best-of-``repeats`` wall and CPU times per mode.

    The timed calls alternate between modes so that a change in machine load (this
    CPU may be shared) hits both modes alike; CPU seconds are less sensitive to it.
    """
    stats, outs = {}, {}
    for mode, runner in by_mode.items():
        first, _, outs[mode] = timed(runner, args)
        stats[mode] = {"first_call_s": first, "times_s": [], "cpu_s": []}
    for _ in range(repeats):
        for mode, runner in by_mode.items():
            wall, cpu, _ = timed(runner, args)
            stats[mode]["times_s"].append(wall)
            stats[mode]["cpu_s"].append(cpu)
    for s in stats.values():
        s["best_s"] = min(s["times_s"], default=s["first_call_s"])
        s["best_cpu_s"] = min(s["cpu_s"], default=float("nan"))
    return stats, outs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="Hugging Face folder")
    parser.add_argument("--out", default="bench_out/clients.json")
    parser.add_argument("--clients", type=int, default=10, help="U for the timed round")
    parser.add_argument("--big_clients", type=int, default=50, help="U for the memory check")
    parser.add_argument(
        "--run_big", type=int, default=0, help="1: also execute the big round, chunked mode"
    )
    parser.add_argument("--local_steps", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=2, help="clients at once, chunked mode")
    parser.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
    parser.add_argument("--glue", default="../shared/data/glue", help="real: GLUE folder")
    parser.add_argument("--rounds", type=int, default=2, help="real: timed rounds per runner")
    parser.add_argument("--max-local", type=int, default=256, help="real: held-out rows/client")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="real: torch threads of the peer")  # fmt: skip
    a = parser.parse_args(argv)
    if a.data == "real":
        if a.out == parser.get_default("out"):
            a.out = "bench_out/clients_real.json"
        return real_data.main(a)
    U, S, b, L = a.clients, a.local_steps, a.batch_size, a.seq_len

    report = {"machine": machine.describe(), "setup": vars(a)}
    report["matmul_peak_flops"] = matmul_peak()
    spec = models.LoraSpec(rank=16, alpha=16.0, targets=("query", "value"))
    model = models.load_pretrained(a.model, num_labels=2, lora=spec, key=jax.random.key(0))
    opt = clients.make_optimizer("adamw", learning_rate=2e-2, weight_decay=0.0)
    loss_fn = classification.loss_fn(model, is_regression=False)
    local_update = clients.make_local_update(loss_fn, opt)
    args = round_args(model, opt, U, S, b, L)
    examples = U * S * b

    by_mode = {
        "vmap": runners.make_runner(local_update, mode="vmap"),
        "chunked": runners.make_runner(local_update, mode="vmap", chunk=a.chunk),
        "loop": runners.make_runner(local_update, mode="loop"),
    }
    compiled = {m: by_mode[m].lower(*args).compile() for m in ("vmap", "chunked")}
    flops = step_flops(loss_fn, args) * S
    stats, results = bench_modes(by_mode, args, a.repeats)
    report["load_avg_1m_after_timing"] = os.getloadavg()[0]
    for mode, r in stats.items():
        r["examples_per_s"] = examples / r["best_s"]
        r["examples_per_cpu_s"] = examples / r["best_cpu_s"]
        r["flops_per_s"] = flops / r["best_s"]
        r["fraction_of_matmul_peak"] = r["flops_per_s"] / report["matmul_peak_flops"]
        report[mode] = r
    for mode in ("vmap", "chunked"):
        loop = report["loop"]
        report[f"{mode}_over_loop"] = report[mode]["examples_per_s"] / loop["examples_per_s"]
        report[f"{mode}_over_loop_cpu"] = loop["best_cpu_s"] / report[mode]["best_cpu_s"]
        diff = jax.tree.map(
            lambda x, y: float(jnp.max(jnp.abs(x - y))), results[mode], results["loop"]
        )
        report[f"{mode}_vs_loop_max_abs_diff"] = max(jax.tree.leaves(diff))
        report[f"{mode}_vs_loop_max_abs_diff_loss"] = diff[2]["loss"]
    report["flops_per_round"] = flops
    report["flops_per_round_xla_while_body_once"] = _flops(compiled["vmap"])
    report["max_rss_bytes_after_U"] = max_rss_bytes()

    one = jax.tree.map(lambda x: x[0], args[1:])
    report["loop_one_client_memory"] = memory(
        jax.jit(local_update).lower(args[0], *one).compile(), args[0], 1
    )
    big = round_args(model, opt, a.big_clients, S, b, L)
    report["memory"] = {}
    for mode in ("vmap", "chunked"):
        big_compiled = by_mode[mode].lower(*big).compile()
        report["memory"][mode] = {
            U: memory(compiled[mode], args[0], U),
            a.big_clients: memory(big_compiled, big[0], a.big_clients),
        }
    if a.run_big:  # the chunked round: its activations are those of ``chunk`` clients
        report["big_round_chunked_s"] = timed(big_compiled, big)[0]  # compiled: no compile
        report["max_rss_bytes_after_big_U"] = max_rss_bytes()
    report["base_bytes"] = tree_bytes(model.base)
    report["per_client_state_bytes"] = tree_bytes(args[1:3]) // U
    report["per_client_batch_bytes"] = tree_bytes(args[3]) // U
    print_report(report, U, a.big_clients)
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    return report


def print_report(r: dict, U: int, big_U: int) -> None:
    mib = lambda x: f"{x / 2**20:.1f} MiB"  # noqa: E731
    m = r["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['backend']}, jax {m['jax']}")
    print(f"matmul peak (f32 2048^3): {r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s")
    print(f"FLOPs per round (XLA cost_analysis of one step x steps): {r['flops_per_round']:.3e}")
    for mode in ("vmap", "chunked", "loop"):
        x = r[mode]
        print(
            f"{mode}: best {x['best_s']:.2f} s (first call {x['first_call_s']:.1f} s), "
            f"{x['examples_per_s']:.1f} examples/s ({x['examples_per_cpu_s']:.1f} per CPU-s), "
            f"{x['flops_per_s'] / 1e9:.1f} GFLOP/s "
            f"= {100 * x['fraction_of_matmul_peak']:.1f}% of matmul peak"
        )
    for mode in ("vmap", "chunked"):
        print(
            f"{mode} / loop: {r[f'{mode}_over_loop']:.2f}x wall, "
            f"{r[f'{mode}_over_loop_cpu']:.2f}x CPU time (max |diff|: loss "
            f"{r[f'{mode}_vs_loop_max_abs_diff_loss']:.1e}, "
            f"params+state {r[f'{mode}_vs_loop_max_abs_diff']:.1e})"
        )
    print(
        f"base {mib(r['base_bytes'])}; per client: state {mib(r['per_client_state_bytes'])}, "
        f"batch {mib(r['per_client_batch_bytes'])}"
    )
    for mode, per_U in r["memory"].items():
        for n in (U, big_U):
            x = per_U[n]
            print(
                f"{mode} U={n}: args {mib(x['argument_bytes'])}, temp {mib(x['temp_bytes'])}, "
                f"out {mib(x['output_bytes'])}, "
                f"[U,*base] buffers {x['per_client_base_shaped_buffers_in_hlo']}"
            )
    x = r["loop_one_client_memory"]
    print(f"one client (loop): args {mib(x['argument_bytes'])}, temp {mib(x['temp_bytes'])}")
    print(f"max RSS after U={U}: {mib(r['max_rss_bytes_after_U'])}", end="")
    if "max_rss_bytes_after_big_U" in r:
        print(
            f"; after U={big_U}: {mib(r['max_rss_bytes_after_big_U'])} "
            f"(chunked round {r['big_round_chunked_s']:.1f} s)"
        )
    print()


if __name__ == "__main__":
    main()
