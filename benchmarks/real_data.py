"""One federated round on real SST-2: the project's runners, packed and padded, against the
PyTorch peer; and evaluation against training, all in one process.

    python -m benchmarks.clients --data=real --glue=../shared/data/glue [--model=FOLDER]

Settings (issue 8): all-MiniLM-L6-v2, SST-2 training sentences (max length 64), 10 IID
clients all sampled, LoRA r=16 on query and value, 5 local AdamW steps of batch 16, FedIT.
Each project variant is a real ``train.build`` run (``launch.py``'s code path: host
batching, the runner, the checks, the server). Each timed round is called twice on the
same state: the first call compiles whatever that round needs (a new packed row count),
the second, timed, gives steady-state speed; figures sum ``--rounds`` rounds. The peer
(:mod:`benchmarks.torch_peer`, when torch and peft import) trains the same clients on
the same examples and token ids, each batch padded to its own longest, in a child process
of its own (torch's threads beside JAX's in one process ran it several times slower).

Evaluation, after the last round: the run's evaluator, global (SST-2 dev) plus local (each
client's held-out rows, at most ``--max-local``), packed and padded, after a warm-up call.

Runners take turns round by round, so a change of machine load hits all alike; each
figure is given per wall second and per process CPU second (all threads), the latter
less sensitive to other work on the machine. Prints a table and the ratios (against the
peer; evaluation against the default runner's training) and writes JSON (``--out``).
Asserts nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import pathlib
import time

import jax
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


_COMPILES = [0]  # XLA compilations in this process so far


def _count_compile(event: str, seconds: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


class Clock:
    """Wall and process CPU seconds (all threads) of what runs inside ``with clock:``, and
    the XLA compilations that happened there (``compiles``: a timed call should have none)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.compiles = 0

    def __enter__(self):
        self._t = (time.perf_counter(), time.process_time(), _COMPILES[0])

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._t[0]
        self.cpu += time.process_time() - self._t[1]
        self.compiles += _COMPILES[0] - self._t[2]


def project_round(run, state, clock: Clock):
    """One round of ``run`` from ``state``: called once to compile what its shapes need,
    then again, timed. Returns the new state, the output and its real examples."""
    run.round_fn(state)
    with clock:
        state, out = run.round_fn(state)
    return state, out, out.metrics["train/examples"]


def peer_work(config, run, r: int) -> tuple[list, np.ndarray, int]:
    """Round ``r`` of ``run`` for the peer: each sampled client's dynamically padded batches
    of the very examples the project trains on, the FedIT weights, the real examples."""
    c, arrays, part = config, run.exp.train, run.exp.part
    rkey = keys.round_key(run.state.key, r)
    ids = rounds.sample_clients(rkey, c.partition.num_clients, c.train.clients_per_round)
    lengths = packing.token_lengths(arrays)
    work, examples = [], 0
    for u in ids:
        take, real = rounds.client_order(part.train[u], keys.data_key(keys.client_key(rkey, u)),
                                         c.client.local_steps, c.client.batch_size)  # fmt: skip
        work.append(torch_peer.dynamic_batches(arrays, lengths, take, real))
        examples += int(real.sum())
    sizes = np.asarray([len(part.train[u]) for u in ids], np.float64)
    return work, sizes / sizes.sum(), examples


def evaluate(run, state, out, clock: Clock) -> dict:
    """Global and local evaluation of ``run`` at ``state`` (compiled by a first call).
    Each asks for its base when it runs: a merging method's base is rebuilt in place
    (``floranna_jax.merged_base``), so none is kept across the other's."""

    def both() -> dict:
        local = run.clients_.evaluate(out.client_ids, out.trainable, out.delta)
        glob = {"lora": state.lora, "head": state.head}
        return {"global": run.evaluator.global_eval(run.base_of(state), glob), "local": local}

    both()
    with clock:
        return both()


def main(a) -> dict:
    """Every runner and the peer, interleaved round by round, then both evaluations."""
    logging.set_verbosity(logging.WARNING)
    report = {"machine": machine.describe(), "setup": {k: str(v) for k, v in vars(a).items()}}
    configs = {label: bench_config(a, o) for label, o in VARIANTS.items()}
    runs = {label: train.build(c) for label, c in configs.items()}
    states = {label: run.state for label, run in runs.items()}
    outs = {}
    clocks = {label: Clock() for label in [*VARIANTS, "peer", "eval packed", "eval padded"]}
    examples = dict.fromkeys(clocks, 0.0)
    with contextlib.ExitStack() as stack:
        peer = None
        if torch_peer.available():
            c = configs[DEFAULT]
            peer = stack.enter_context(torch_peer.Process(
                torch_peer.Peer, model_path=a.model, rank=c.lora.rank, alpha=c.lora.alpha,
                dropout=c.lora.dropout, targets=tuple(c.lora.targets),
                learning_rate=c.client.learning_rate, threads=a.threads,
            ))  # fmt: skip
        for r in range(a.rounds):
            for label, run in runs.items():
                states[label], outs[label], n = project_round(run, states[label], clocks[label])
                examples[label] += n
                print(f"round {r + 1}, {label}: {n:.0f} examples", flush=True)
            if peer is not None:
                work, weights, n = peer_work(configs[DEFAULT], runs[DEFAULT], r)
                if r == 0:
                    peer.call("round", work, weights)  # warm-up, as the project's compiling call
                _, wall, cpu = peer.call("round", work, weights)
                clocks["peer"].wall += wall
                clocks["peer"].cpu += cpu
                examples["peer"] += n
                print(f"round {r + 1}, peer: {n:.0f} examples", flush=True)
    for label, layout in ((DEFAULT, "packed"), ("padded, chunked vmap", "padded")):
        run, part = runs[label], runs[label].exp.part
        scores = evaluate(run, states[label], outs[label], clocks[f"eval {layout}"])
        examples[f"eval {layout}"] += len(run.exp.validation["label"]) + sum(
            min(len(part.holdout[u]), a.max_local or len(part.holdout[u]))
            for u in outs[label].client_ids
        )
        report[f"eval {layout} scores"] = scores
    if peer is None:
        print("PyTorch peer skipped: torch, peft or transformers does not import")
        del clocks["peer"]
    for label, clock in clocks.items():
        report[label] = {"examples": examples[label], "wall_s": clock.wall, "cpu_s": clock.cpu,
                         "per_s": examples[label] / clock.wall,
                         "per_cpu_s": examples[label] / clock.cpu}  # fmt: skip
    print_report(report, list(clocks))
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report


def print_report(report: dict, labels: list[str]) -> None:
    m = report["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['backend']}, jax {m['jax']}, "
          f"load {m['load_avg_1m_at_start']:.1f} at start")  # fmt: skip
    print("| runner | examples (rows) | wall s | per s | per CPU-s |")
    print("|---|---|---|---|---|")
    for label in labels:
        x = report[label]
        print(f"| {label} | {x['examples']:.0f} | {x['wall_s']:.2f} | {x['per_s']:.1f} | "
              f"{x['per_cpu_s']:.2f} |")  # fmt: skip
    train_ = report[DEFAULT]

    def ratio(x, y):
        return f"{x['per_s'] / y['per_s']:.2f}x wall, {x['per_cpu_s'] / y['per_cpu_s']:.2f}x CPU"

    for label in labels:
        if label.startswith("eval"):
            print(f"{label} / training ({DEFAULT}): {ratio(report[label], train_)}")
        elif "peer" in report and label != "peer":
            print(f"{label} / peer: {ratio(report[label], report['peer'])}")
    print(f"packed / padded, chunked vmap: {ratio(train_, report['padded, chunked vmap'])}")
