"""One federated round on real SST-2: the project's runners, packed and padded, against the
PyTorch peer; and evaluation against training, all in one process.

    python -m benchmarks.clients --data=real --glue=../shared/data/glue [--model=FOLDER]

Settings (issue 8): all-MiniLM-L6-v2, SST-2 training sentences (max length 64), 10 IID
clients all sampled, LoRA r=16 on query and value, 5 local AdamW steps of batch 16, FedIT.
Each project variant is a real ``train.build`` run (``launch.py``'s code path: host
batching, the runner, the checks, the server). Each timed round is called twice on the
same state: the first call compiles whatever that round needs (a new packed row count),
the second, timed, gives steady-state speed; the figure is the sum over ``--rounds``
rounds. The peer (:mod:`benchmarks.torch_peer`, when torch and peft import) trains the
same clients on the same examples and token ids, each batch padded to its own longest.

Evaluation: the run's evaluator, global (SST-2 dev) plus local (each client's held-out
rows, at most ``--max-local``), packed and padded, after a warm-up call; rows/s against
the packed default runner's training examples/s. Prints the figures and the ratios and
writes JSON (``--out``). Asserts nothing.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import time

import numpy as np
from absl import logging

from benchmarks import machine, torch_peer
from floranna_jax import keys, packing, rounds, train

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = "packed, chunked vmap (default)"
VARIANTS = {  # label: config overrides
    DEFAULT: {"data.packing": True},
    "packed, vmap": {"data.packing": True, "train.clients_per_chunk": 0},
    "packed, loop": {"data.packing": True, "train.client_mode": "loop",
                     "train.clients_per_chunk": 0},
    "padded, chunked vmap": {"data.packing": False},
}  # fmt: skip


def bench_config(a, overrides: dict):
    spec = importlib.util.spec_from_file_location("glue_config", REPO / "configs" / "glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.path, c.data.dir, c.data.max_length = a.model, a.glue, 64
    c.partition.scheme, c.partition.num_clients = "iid", 10
    c.client.local_steps, c.client.batch_size = 5, 16
    c.server.name, c.train.clients_per_round, c.train.clients_per_chunk = "fedit", 10, 2
    c.eval.max_local_examples = a.max_local
    for field, value in overrides.items():
        section, name = field.split(".")
        c[section][name] = value
    return c


def timed_rounds(run, num_rounds: int):
    """Steady-state seconds and real examples over ``num_rounds`` rounds (each round called
    once to compile, once timed), the final state and the last round's output."""
    state, seconds, examples = run.state, 0.0, 0.0
    for _ in range(num_rounds):
        run.round_fn(state)  # compiles what this round's shapes need
        t0 = time.perf_counter()
        new_state, out = run.round_fn(state)
        seconds += time.perf_counter() - t0
        examples += out.metrics["train/examples"]
        state = new_state
    return seconds, examples, state, out


def peer_rounds(a, config, run, num_rounds: int) -> tuple[float, float]:
    """The peer on the rounds ``run`` trains: same clients, same examples; (seconds, examples)."""
    c = config
    peer = torch_peer.Peer(
        a.model, rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout,
        targets=tuple(c.lora.targets), learning_rate=c.client.learning_rate, threads=a.threads,
    )  # fmt: skip
    arrays, part = run.exp.train, run.exp.part
    lengths = packing.token_lengths(arrays)
    seconds = examples = 0.0
    for r in range(num_rounds):
        rkey = keys.round_key(run.state.key, r)
        ids = rounds.sample_clients(rkey, c.partition.num_clients, c.train.clients_per_round)
        work = []
        for u in ids:
            take, real = rounds.client_order(
                part.train[u], keys.data_key(keys.client_key(rkey, u)), c.client.local_steps,
                c.client.batch_size,
            )
            work.append(torch_peer.dynamic_batches(arrays, lengths, take, real))
            examples += real.sum()
        sizes = np.asarray([len(part.train[u]) for u in ids], np.float64)
        if r == 0:
            peer.round(work, sizes / sizes.sum())  # warm-up, as the project's first call
        seconds += peer.round(work, sizes / sizes.sum())
    return seconds, examples


def eval_rows_per_s(run, state, out, rows: int) -> tuple[float, dict]:
    glob = (run.base_of(state), {"lora": state.lora, "head": state.head})
    local = (out.base, out.trainable, out.client_ids)
    run.evaluator.global_eval(*glob), run.evaluator.local_eval(*local)  # compiles
    t0 = time.perf_counter()
    scores = {"global": run.evaluator.global_eval(*glob), "local": run.evaluator.local_eval(*local)}
    return rows / (time.perf_counter() - t0), scores


def main(a) -> dict:
    logging.set_verbosity(logging.WARNING)
    report = {"machine": machine.describe(), "setup": {k: str(v) for k, v in vars(a).items()}}
    runs = {}
    for label, overrides in VARIANTS.items():
        config = bench_config(a, overrides)
        run = train.build(config)
        seconds, examples, state, out = timed_rounds(run, a.rounds)
        runs[label] = (config, run, state, out)
        report[label] = {"seconds": seconds, "examples": examples, "per_s": examples / seconds}
        print(f"{label}: {examples:.0f} examples in {seconds:.2f} s = "
              f"{examples / seconds:.1f} examples/s", flush=True)  # fmt: skip
    if torch_peer.available():
        config, run = runs[DEFAULT][:2]
        seconds, examples = peer_rounds(a, config, run, a.rounds)
        report["peer"] = {"seconds": seconds, "examples": float(examples),
                          "per_s": examples / seconds}  # fmt: skip
        print(f"PyTorch + PEFT peer, dynamic padding: {examples:.0f} examples in {seconds:.2f} s "
              f"= {examples / seconds:.1f} examples/s", flush=True)  # fmt: skip
        for label in VARIANTS:
            ratio = report[label]["per_s"] / report["peer"]["per_s"]
            report[label]["over_peer"] = ratio
            print(f"  {label} / peer: {ratio:.2f}x")
    else:
        print("PyTorch peer skipped: torch, peft or transformers does not import")
    base = report["padded, chunked vmap"]["per_s"]
    for label in VARIANTS:
        print(f"  {label} / padded: {report[label]['per_s'] / base:.2f}x")

    training = report[DEFAULT]["per_s"]
    for label in (DEFAULT, "padded, chunked vmap"):
        config, run, state, out = runs[label]
        part = run.exp.part
        rows = len(run.exp.validation["label"]) + sum(
            min(len(part.holdout[u]), a.max_local or len(part.holdout[u])) for u in out.client_ids
        )
        per_s, scores = eval_rows_per_s(run, state, out, rows)
        layout = "packed" if config.data.packing else "padded"
        report[f"eval_{layout}"] = {"rows": rows, "rows_per_s": per_s,
                                    "over_training": per_s / training, "scores": scores}
        print(f"evaluation, {layout}: {rows} rows at {per_s:.1f} rows/s = "
              f"{per_s / training:.2f}x training ({DEFAULT}); accuracy global "
              f"{scores['global']['accuracy']:.4f}, local {scores['local']['accuracy']:.4f}")
    print(json.dumps(report["machine"]))
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report
