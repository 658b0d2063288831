"""Evaluation throughput on real data, with and without length buckets, against training.

    python -m benchmarks.evaluation --model=FOLDER --glue=GLUE_FOLDER [--max-local=256]

all-MiniLM-L6-v2 (any BERT/RoBERTa folder) on SST-2 (max length 64), 10 clients with a
Dirichlet(0.5) split, FedIT, 5 local steps of batch 16, all 10 clients per round
(``train.clients_per_chunk=2``). Times, in one process: one training round after a
warm-up round (examples/s), then the global evaluation (SST-2 dev) and the local one (each
client's held-out rows, at most ``--max-local``) with every batch padded to the full length
and with the evaluator's buckets of 16 tokens (rows/s). Prints the ratios of evaluation
to training throughput and writes JSON (``--out``). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import time

from absl import logging

from benchmarks import machine
from floranna_jax import train
from floranna_jax.tasks import classification

REPO = pathlib.Path(__file__).resolve().parents[1]


def bench_config(a):
    spec = importlib.util.spec_from_file_location("glue_config", REPO / "configs" / "glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.path, c.data.dir, c.data.max_length = a.model, a.glue, 64
    c.client.local_steps, c.client.batch_size = 5, 16
    c.server.name, c.train.clients_per_round, c.train.clients_per_chunk = "fedit", 10, 2
    c.eval.max_local_examples = a.max_local
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="BERT/RoBERTa folder (all-MiniLM-L6-v2)")
    ap.add_argument("--glue", required=True, help="GLUE folder (SST-2/train.tsv, dev.tsv)")
    ap.add_argument("--max-local", type=int, default=256, help="held-out rows per client")
    ap.add_argument("--out", default="bench_out/evaluation.json")
    a = ap.parse_args()
    logging.set_verbosity(logging.WARNING)
    c = bench_config(a)
    run = train.build(c)
    state, out = run.round_fn(run.state)  # compiles the client step
    t0 = time.perf_counter()
    state, out = run.round_fn(state)
    train_s = time.perf_counter() - t0
    examples = out.metrics["train/real_steps"] * c.train.clients_per_round * c.client.batch_size
    holdout = run.exp.part.holdout
    local_rows = sum(min(len(holdout[u]), a.max_local or len(holdout[u])) for u in out.client_ids)
    rows = {"global": len(run.exp.validation["label"]), "local": local_rows}
    result = {"machine": machine.describe(), "train_examples_per_s": examples / train_s}
    print(f"training: {examples:.0f} examples in {train_s:.2f} s = {examples / train_s:.1f}/s")
    for label, tokens in (("padded", c.data.max_length), ("buckets", 16)):
        classification.BUCKET_TOKENS = tokens  # the full length: one bucket, as before
        ev = run.exp.task.make_evaluator(
            run.exp.model, run.exp.train, run.exp.validation, holdout, c
        )
        glob = (run.base_of(state), {"lora": state.lora, "head": state.head})
        local = (out.base, out.trainable, out.client_ids)
        ev.global_eval(*glob), ev.local_eval(*local)  # compiles every bucket
        t0 = time.perf_counter()
        acc_g = ev.global_eval(*glob)["accuracy"]
        t1 = time.perf_counter()
        acc_l = ev.local_eval(*local)["accuracy"]
        t2 = time.perf_counter()
        per_s = (rows["global"] + rows["local"]) / (t2 - t0)
        result[label] = {"global_s": t1 - t0, "local_s": t2 - t1, "rows_per_s": per_s,
                         "accuracy": [acc_g, acc_l], "vs_training": per_s / result[
                             "train_examples_per_s"]}  # fmt: skip
        print(f"{label}: global {rows['global']} rows {t1 - t0:.2f} s, local {rows['local']} "
              f"rows {t2 - t1:.2f} s: {per_s:.1f} rows/s = {result[label]['vs_training']:.2f}x "
              f"training; accuracy {acc_g:.4f} / {acc_l:.4f}")  # fmt: skip
    print(
        f"buckets / padded: {result['buckets']['rows_per_s'] / result['padded']['rows_per_s']:.2f}x"
    )
    print(json.dumps(result["machine"]))
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
