"""Benchmark: round time of U clients through Flower on localhost against in-process.

    python -m benchmarks.flower [--model PATH] [--glue FOLDER] [--rounds 2] [--clients 10]
                                [--cold]

One invocation, the same config and data both ways: ``configs/glue.py`` with U clients
(``--clients``, default 10) all sampled every round (SST-2 from ``--glue`` and
all-MiniLM-L6-v2 from ``--model`` when both exist, else the smoke config's tiny random
encoder on synthetic tokens), first ``--rounds`` rounds in this process
(``train.build(...).round_fn``, clients as the config runs them), then the same rounds
through a SuperLink and U SuperNodes started as separate processes
(``floranna_jax.flower.local``, insecure on localhost; each node ``flower.node``, Flower's
SuperNode without its fixed waits, ``flower/waits.py``), each with its warm ClientApp process
(``warm_node.py``; ``--cold``: Flower's new process per message, which imports JAX and
builds the model every round). Prints, per round, the seconds of each (Flower: the server's
own clock from sending the round's messages to the aggregate, ``time/clients_s +
time/server_s``), their ratio (the transport overhead), the Flower round less the seconds its
slowest client spent on its message (``flower/client_train_s_max``: what the transport and
the server cost, which load inflates less than it does the ratio) and the bytes per client
measured on the messages beside the ``comm_bytes`` formula; writes them and the load
average to ``--out``.

Asserts nothing about time. Round 1 includes compilation on both sides; with packing, a
client compiles again the first time its batches take another of ``packing.MAX_SHAPES``
row counts.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

from benchmarks import machine
from configs import glue
from floranna_jax import train
from floranna_jax.flower import local, shards

DEFAULT_MODEL = pathlib.Path.home() / ".cache" / "floranna" / "models" / "all-MiniLM-L6-v2"


def make_config(model: pathlib.Path, glue_dir: pathlib.Path, rounds: int, clients: int = 10):
    """``clients`` clients, all sampled; real SST-2 and MiniLM when present, else smoke."""
    real = (model / "config.json").is_file() and (glue_dir / "SST-2" / "train.tsv").is_file()
    config = glue.get_config() if real else glue.get_config("smoke")
    if real:
        config.model.path, config.data.dir = str(model), str(glue_dir)
        config.data.max_length = 64
        config.client.local_steps, config.client.batch_size = 5, 16
    config.partition.num_clients = config.train.clients_per_round = clients
    config.train.num_rounds = rounds
    config.ckpt.every_rounds = 0
    return config, "MiniLM on SST-2" if real else "smoke (tiny random encoder, synthetic)"


def in_process(config) -> list[float]:
    run = train.build(config)
    state, seconds = run.state, []
    for _ in range(config.train.num_rounds):
        t0 = time.perf_counter()
        state, _ = run.round_fn(state)
        seconds.append(time.perf_counter() - t0)
    return seconds


def through_flower(config, workdir: pathlib.Path, warm: bool) -> list[dict]:
    paths = shards.write(config, str(workdir / "data"))
    with local.federation(workdir, paths, None, None, warm=warm) as fed:
        run_config = local.run_config(config, workdir / "run", **{"round-timeout-s": 3600.0})
        run = local.submit(fed, run_config, fed.logs / "run.log")
        if run.wait() != 0:
            raise RuntimeError((fed.logs / "run.log").read_text()[-3000:])
    with open(workdir / "run" / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, default=DEFAULT_MODEL)
    parser.add_argument("--glue", type=pathlib.Path, default=pathlib.Path("../shared/data/glue"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=10, help="clients = SuperNodes")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="Flower's new ClientApp process per message (not warm_node.py)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_out/flower.json"))
    args = parser.parse_args()
    config, setting = make_config(args.model, args.glue, args.rounds, args.clients)
    nodes = "cold nodes (a process per message)" if args.cold else "warm nodes (warm_node.py)"
    print(f"{setting}: U={args.clients}, {nodes}, {config.client.local_steps} steps of "
          f"{config.client.batch_size}, "
          f"server {config.server.name}; machine {machine.describe()}")  # fmt: skip
    local_s = in_process(config)
    with tempfile.TemporaryDirectory() as tmp:
        rows = through_flower(config, pathlib.Path(tmp), warm=not args.cold)
    results = []
    for r, row in enumerate(rows):
        flower_s = row["time/clients_s"] + row["time/server_s"]
        client_s = row["flower/client_train_s_max"]
        results.append({"round": r + 1, "in_process_s": local_s[r], "flower_s": flower_s,
                        "overhead_ratio": flower_s / local_s[r], "client_s_max": client_s,
                        **{k: row[k] for k in row if "bytes" in k}})  # fmt: skip
        print(f"round {r + 1}: in-process {local_s[r]:.1f} s, Flower {flower_s:.1f} s, "
              f"transport overhead x{flower_s / local_s[r]:.2f} (Flower less its slowest "
              f"client's own {client_s:.1f} s: {flower_s - client_s:.1f} s); bytes per client up "
              f"{row['flower/bytes_up_per_client']:.0f} (formula {row['server/bytes_up']:.0f}),"
              f" down {row['flower/bytes_down_per_client']:.0f} "
              f"(formula {row['server/bytes_down']:.0f})")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setting": setting, "warm": not args.cold,
                                    "load_average": os.getloadavg(), "machine": machine.describe(),
                                    "rounds": results}, indent=2))  # fmt: skip
    print(f"wrote {args.out}; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
