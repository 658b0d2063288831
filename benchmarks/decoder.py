"""The decoder on SmolLM2-135M against transformers (+ PEFT) on this CPU: training tokens/s
of one client, greedy generation tokens/s, and the compiled memory of client programs.

    python -m benchmarks.decoder [--data=real] [--model FOLDER] [--out bench_out/decoder.json]

``--model`` is SmolLM2-135M-Instruct converted from its GGUF once (README: Decoders).
All in one run (issues 9 and 21; targets: project / peer tokens per second):

- training: one client's ``clients.make_local_update`` (the run's own step: the GSM8K
  task's loss, LoRA r=16 on q_proj and v_proj, dropout 0.05, AdamW), ``--steps`` steps of
  batch 4 x 256 tokens per call, against ``LlamaForCausalLM`` + PEFT doing the same steps
  on the same token ids (:class:`benchmarks.torch_peer.DecoderPeer`). Target: 1.2x.
- with ``--data=real``, training on real GSM8K rows (``--data_dir``, default
  ``$FLORANNA_DATA_DIR``): the project packed, the peer padded per batch, on the same
  ``--real_batch_size`` examples a step (:mod:`benchmarks.decoder_rows`). Target: 2x.
- generation: ``decoder.generate`` (greedy, ``--max_new_tokens`` with no end-of-sequence
  id) at batch 1 and 16 on the same left-padded prompts, against transformers'
  ``generate`` with its key/value cache; prints whether the greedy tokens are equal.
  Target: 2x.
- the training FLOP rate of each side (:func:`training_flops_per_token`) as a share of this
  machine's float32 matmul peak, timed in the same run: how much room either side has left.
- memory: ``compiled.memory_analysis()`` of one client's step, and of ``--clients``
  clients vmapped at once and ``--chunk`` at a time (compiled, not run).

The peer runs in a spawned child process with ``--threads`` torch threads (default: the
cores of this process). Each side's first call (compiling, warming up) is not timed; then
the two take turns ``--rounds`` times, so a change of machine load hits both alike. Each
figure is given per wall second and per process CPU second (all threads), the latter less
sensitive to other work on the machine. Prints a table with the machine and the load
average before and after, writes JSON (``--out``). Asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from benchmarks import clients as bench_clients
from benchmarks import decoder_rows, machine, torch_peer
from benchmarks.real_data import Clock
from floranna_jax import clients, models, runners
from floranna_jax.data import glue
from floranna_jax.models import decoder
from floranna_jax.tasks import generation

DEFAULT_MODEL = pathlib.Path.home() / ".cache/floranna/models/SmolLM2-135M-Instruct-hf"
TARGETS = {"train": 1.2, "real": 2.0, "generate": 2.0}  # issue 21: project / peer tokens/s
PROMPTS = (  # greedy continuations of these are compared token by token
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of",
    "Once upon a time, in a small village by the sea,",
    "Question: What is 17 times 23?\nAnswer:",
    "The three laws of thermodynamics are",
    "import numpy as np\n\ndef softmax(x):",
    "A train leaves the station at 3 pm travelling at 60 miles per hour.",
    "Photosynthesis is the process by which",
    "List three prime numbers greater than 100:",
    "The quick brown fox",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of",
    "In machine learning, overfitting means",
    "Translate to French: I would like a cup of coffee.",
    "The best way to learn a new language is",
)


def figures(count: float, clock: Clock) -> dict:
    return {"tokens": count, "wall_s": clock.wall, "cpu_s": clock.cpu,
            "per_s": count / clock.wall, "per_cpu_s": count / clock.cpu}  # fmt: skip


def ratios(project: dict, peer: dict) -> dict:
    """Project over peer, tokens per wall second and per CPU second."""
    wall, cpu = project["per_s"] / peer["per_s"], project["per_cpu_s"] / peer["per_cpu_s"]
    return {"wall": wall, "cpu": cpu}


def training_flops_per_token(config: dict, seq_len: int) -> float:
    """Matmul FLOPs per token of one training step on a frozen base, counted from the model
    config: the forward pass (every linear layer, the LM head, attention scores and values
    over the full ``seq_len`` as XLA computes them) plus the backward pass, which computes
    gradients of the activations only (as many FLOPs as the forward pass; the base weights
    get none). LoRA's rank-16 factors add under 1% and are left out."""
    d, f, L, V = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                      "vocab_size"))  # fmt: skip
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or d // heads
    linear = 2 * d * heads * hd + 2 * d * kv * hd + 3 * d * f  # q, o; k, v; gate, up, down
    forward = 2 * (L * linear + d * V) + L * 4 * seq_len * heads * hd
    return 2.0 * forward


def training_batches(ids: np.ndarray) -> dict:
    """The project's batches of ``ids [S, b, L]``: every token after the first is a target,
    as the peer's ``labels=input_ids``."""
    ones = np.ones_like(ids)
    return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones,
            "mask": np.ones(ids.shape[:2], np.float32)}  # fmt: skip


def bench_training(a, model, local_update, peer) -> dict:
    """Turns of ``--steps`` training steps, project then peer, on the same token ids."""
    rng = np.random.default_rng(0)
    shape = (a.rounds + 1, a.steps, a.batch_size, a.seq_len)
    ids = rng.integers(3, model.config["vocab_size"], shape).astype(np.int32)
    opt = clients.make_optimizer("adamw", a.learning_rate)
    state = decoder_rows.donated_state(opt, model.trainable)
    step_mask, key = jnp.ones((a.steps,), jnp.float32), jax.random.key(0)
    run = jax.jit(local_update, donate_argnums=(1, 2))

    def project_turn(r):
        nonlocal state
        batches = training_batches(ids[r])
        *state, metrics = jax.block_until_ready(run(model.base, *state, batches, step_mask, key))
        return metrics["loss"]

    peer_turn = None if peer is None else lambda r: peer.call("train", ids[r])
    clocks, losses, first = decoder_rows.take_turns("fixed rows", a.rounds, project_turn, peer_turn)
    tokens = a.rounds * a.steps * a.batch_size * a.seq_len
    out = {side: figures(tokens, clocks[side]) | {"mean_loss_per_turn": losses[side]}
           for side in clocks if side == "project" or peer is not None}  # fmt: skip
    out["project"]["first_call_s"] = first.wall
    if peer is not None:
        out["ratio"] = ratios(out["project"], out["peer"])
    return out


def prompts(folder, batch: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``batch`` :data:`PROMPTS`, tokenized and left-padded: ``(ids, mask)``."""
    tokenizer = glue.load_tokenizer(folder)
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:batch]]
    width = max(map(len, rows))
    ids, mask = np.full((batch, width), pad, np.int32), np.zeros((batch, width), np.int32)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    return ids, mask


def bench_generation(a, model, batch: int, peer) -> dict:
    """Greedy generation of ``--max_new_tokens`` at ``batch``, project and peer in turn."""
    pad = model.config["pad_token_id"]
    ids, mask = prompts(a.model, batch, pad)

    def ours():
        return decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=a.max_new_tokens,
                                eos_ids=(), pad_id=pad, compute_dtype=a.compute_dtype)  # fmt: skip

    clocks, tokens, first = {"project": Clock(), "peer": Clock()}, {}, Clock()
    for r in range(a.gen_rounds + 1):  # round 0 compiles and warms up
        with clocks["project"] if r else first:
            tokens["project"] = np.asarray(jax.block_until_ready(ours()))
        if peer is not None:
            tokens["peer"], wall, cpu = peer.call("generate", ids, mask, a.max_new_tokens, pad)
            if r:
                clocks["peer"].wall += wall
                clocks["peer"].cpu += cpu
    decoder_rows.check_no_compiles(clocks["project"], f"generation at batch {batch}")
    count = a.gen_rounds * batch * a.max_new_tokens
    out = {"prompt_tokens": int(mask.sum()), "prompt_width": ids.shape[1]}
    out["project"] = figures(count, clocks["project"]) | {"first_call_s": first.wall}
    if peer is not None:
        out["peer"] = figures(count, clocks["peer"])
        out["ratio"] = ratios(out["project"], out["peer"])
        same = tokens["project"] == tokens["peer"]
        out["tokens_equal"] = bool(same.all())
        out["rows_equal"] = int(same.all(axis=1).sum())
        out["tokens_equal_count"] = int(same.sum())
    return out


def compiled_memory(a, model, local_update) -> dict:
    """``memory_analysis()`` of one client's step, and of ``--clients`` clients (one step
    each) vmapped at once and ``--chunk`` at a time; compiled, never run."""
    opt = clients.make_optimizer("adamw", a.learning_rate)
    one = (model.trainable, clients.init_opt_state(opt, model.trainable),
           training_batches(np.ones((1, a.batch_size, a.seq_len), np.int32)),
           jnp.ones((1,), jnp.float32), jax.random.key(0))  # fmt: skip
    U = a.clients
    many = (*runners.broadcast(one[:4], U), jax.random.split(jax.random.key(0), U))
    programs = {
        "one client, one step": (jax.jit(local_update), one, 1),
        f"{U} clients, vmap": (runners.make_runner(local_update, mode="vmap"), many, U),
        f"{U} clients, {a.chunk} at a time": (
            runners.make_runner(local_update, mode="vmap", chunk=a.chunk), many, U),
    }  # fmt: skip
    out = {}
    for label, (fn, args, n) in programs.items():
        start = time.perf_counter()
        compiled = fn.lower(model.base, *args).compile()
        out[label] = bench_clients.memory(compiled, model.base, n)
        if n == 1:  # the count looks for [U, *leaf] buffers: nothing to find without U
            del out[label]["per_client_base_shaped_buffers_in_hlo"]
        out[label]["compile_s"] = time.perf_counter() - start
        print(f"compiled {label} in {out[label]['compile_s']:.0f} s", flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="converted SmolLM2 folder")
    parser.add_argument("--out", default="bench_out/decoder.json")
    parser.add_argument("--compute_dtype", default="float32", help="the project's matmul dtype")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="training steps per turn")
    parser.add_argument("--rounds", type=int, default=3, help="timed training turns per side")
    parser.add_argument(
        "--data",
        default="fixed",
        choices=("fixed", "real"),
        help="real: one more training row, real GSM8K rows (packed vs padded)",
    )
    parser.add_argument(
        "--data_dir",
        default=os.environ.get("FLORANNA_DATA_DIR", "data"),
        help="folder holding gsm8k/ (default: $FLORANNA_DATA_DIR)",
    )
    parser.add_argument("--real_batch_size", type=int, default=8, help="GSM8K examples a step")
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--gen_batches", default="1,16", help="generation batch sizes")
    parser.add_argument("--gen_rounds", type=int, default=2, help="timed generate turns per side")
    parser.add_argument(
        "--clients",
        type=int,
        default=10,
        help="U of the memory programs (0: compile no memory programs)",
    )
    parser.add_argument("--chunk", type=int, default=2, help="clients at once, chunked program")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads of the peer")  # fmt: skip
    a = parser.parse_args(argv)
    logging.set_verbosity(logging.WARNING)
    report = {"machine": machine.describe(), "setup": vars(a),
              "load_avg_before": os.getloadavg()}  # fmt: skip
    spec = models.LoraSpec(rank=16, alpha=16.0, targets=("q_proj", "v_proj"), dropout=0.05)
    model = models.load_pretrained(a.model, lora=spec, compute_dtype=a.compute_dtype)
    opt = clients.make_optimizer("adamw", a.learning_rate)
    local_update = clients.make_local_update(generation.loss_fn(model), opt)
    with contextlib.ExitStack() as stack:
        peer = None
        if torch_peer.available():
            peer = stack.enter_context(torch_peer.Process(
                torch_peer.DecoderPeer, model_path=a.model, rank=spec.rank, alpha=spec.alpha,
                dropout=spec.dropout, targets=spec.targets, learning_rate=a.learning_rate,
                threads=a.threads,
            ))  # fmt: skip
        else:
            print("PyTorch peer skipped: torch, peft or transformers does not import")
        report["matmul_peak_flops"] = bench_clients.matmul_peak()
        report["train"] = bench_training(a, model, local_update, peer)
        if a.data == "real":
            report["train_real"] = decoder_rows.bench_real_training(a, model, local_update, peer)
        per_token = training_flops_per_token(model.config, a.seq_len)
        for side in ("project", "peer"):
            if side in report["train"]:
                x = report["train"][side]
                x["flops_per_s"] = per_token * x["per_s"]
                x["fraction_of_matmul_peak"] = x["flops_per_s"] / report["matmul_peak_flops"]
        report["generate"] = {
            int(b): bench_generation(a, model, int(b), peer) for b in a.gen_batches.split(",")
        }
    report["load_avg_after_timing"] = os.getloadavg()
    report["memory"] = compiled_memory(a, model, local_update) if a.clients else {}
    print_report(report)
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def print_report(r: dict) -> None:
    m, a = r["machine"], r["setup"]
    load = lambda x: " ".join(f"{v:.2f}" for v in x)  # noqa: E731
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['backend']}, jax {m['jax']}; "
          f"load average (1, 5, 15 min) {load(r['load_avg_before'])} before, "
          f"{load(r['load_avg_after_timing'])} after timing")  # fmt: skip
    print("| tokens / s | project | per CPU-s | peer | per CPU-s | x peer, wall | x peer, CPU "
          "| target |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    rows = {f"training, batch {a['batch_size']} x {a['seq_len']}": (r["train"], "train")}
    if "train_real" in r:
        x = r["train_real"]
        label = (f"training, GSM8K, {a['real_batch_size']} examples a step (packed: "
                 f"{x['rows_per_step']} x {x['row_length']}; peer: padded per batch)")  # fmt: skip
        rows[label] = (x, "real")
    for b, g in r["generate"].items():
        rows[f"greedy generation, batch {b}, {a['max_new_tokens']} new"] = (g, "generate")
    for label, (x, target) in rows.items():
        sides = [x[side] for side in ("project", "peer") if side in x]
        cells = [f"{fig[k]:.1f}" for fig in sides for k in ("per_s", "per_cpu_s")]
        cells += [f"{x['ratio'][k]:.2f}x" for k in ("wall", "cpu")] if "ratio" in x else []
        print(f"| {label} | {' | '.join(cells + [''] * (6 - len(cells)))} | "
              f"{TARGETS[target]}x |")  # fmt: skip
    shares = ", ".join(
        f"{side} {x['flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * x['fraction_of_matmul_peak']:.0f}%"
        for side, x in r["train"].items() if side in ("project", "peer")
    )  # fmt: skip
    print(
        f"training against the f32 matmul peak ({r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s, "
        f"2048^3 timed in this run; FLOPs counted from the config): {shares}"
    )
    for b, g in r["generate"].items():
        if "tokens_equal" in g:
            print(f"greedy tokens at batch {b} equal to transformers: {g['tokens_equal']} "
                  f"({g['rows_equal']} of {b} rows, {g['tokens_equal_count']} of "
                  f"{b * a['max_new_tokens']} tokens)")  # fmt: skip
    mib = lambda x: f"{x / 2**20:.1f} MiB"  # noqa: E731
    print("| compiled program | arguments | temporaries | output | [U, *base] buffers |")
    print("|---|---|---|---|---|")
    for label, x in r["memory"].items():
        cells = [mib(x[k]) for k in ("argument_bytes", "temp_bytes", "output_bytes")]
        copies = x.get("per_client_base_shaped_buffers_in_hlo", "")
        print(f"| {label} | {' | '.join(cells)} | {copies} |")


if __name__ == "__main__":
    main()
