"""The reviewers' open questions (METHOD.md), measured on real federated training.

    python -m benchmarks.reviewers --model=FOLDER --glue=GLUE_FOLDER

trains all-MiniLM-L6-v2 (any BERT/RoBERTa folder) with LoRA on SST-2 (any GLUE folder) over
10 clients, once per (method, Dirichlet alpha) of ``--runs``, through ``train.run`` with the
reference config plus the overrides below, and every round also aggregates the same client
uploads with FedIT, FLoRA-NA (per-layer and shared weights) and SVD (``server.compare``).
Prints and writes (``--out``) one markdown table and ``reviewers.png``:

- Q1 per-layer against shared weights, and Q2 the distance to the SVD lower bound: mean
  ``rho_rel`` of each estimator on identical uploads, every round of every run;
- Q3 the oracle: FedEx-LoRA (exact ``dW_ideal``) beside the rank-r methods;
- Q4 and Q5: global and local accuracy against Dirichlet alpha and ``rho_rel``.

A CPU-sized study (short runs, small model): it shows direction and size on real client
updates, not the paper's final accuracies. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib

import numpy as np

from benchmarks import machine
from floranna_jax import reporting, train

REPO = pathlib.Path(__file__).resolve().parents[2]
COMPARE = ("fedit", "floranna_layer", "floranna_model", "svd")
DEFAULT_RUNS = "fedit:0.5,floranna:0.5,svd:0.5,fedex:0.5,fedit:0.1,floranna:0.1"


def reference_config():
    spec = importlib.util.spec_from_file_location("glue_config", REPO / "configs" / "glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def study_config(a, method: str, alpha: float):
    """The reference config, sized for a 2-core CPU, for one (method, alpha)."""
    c = reference_config()
    c.model.path, c.data.dir, c.data.task, c.data.max_length = a.model, a.glue, "sst2", 64
    c.partition.alpha = alpha
    c.client.learning_rate, c.client.local_steps, c.client.batch_size = a.lr, a.local_steps, 16
    c.server.name, c.server.scope, c.server.compare = method, "layer", COMPARE
    c.train.num_rounds, c.train.clients_per_round = a.rounds, a.clients_per_round
    c.train.clients_per_chunk = 2  # fastest on a 2-core CPU (docs/clients_benchmark.md)
    c.ckpt.every_rounds, c.eval.every_rounds = 0, a.eval_every
    c.eval.max_local_examples = 256
    return c


def summarize(rows: list[dict], method: str, alpha: float) -> dict:
    evals = [r for r in rows if "eval/global/accuracy" in r]
    out = {"method": method, "alpha": alpha, "rounds": rows[-1]["round"]}
    out["global_acc"] = evals[-1]["eval/global/accuracy"]
    out["local_acc"] = evals[-1]["eval/local/accuracy"]
    out["best_global_acc"] = max(r["eval/global/accuracy"] for r in evals)
    out["rho_rel"] = float(np.mean([r["server/rho_rel"] for r in rows]))
    for label in COMPARE:
        out[f"cmp_{label}"] = float(np.mean([r[f"compare/{label}/rho_rel"] for r in rows]))
    out["bytes_total"] = rows[-1]["comm/bytes_up_total"] + rows[-1]["comm/bytes_down_total"]
    out["curve"] = [(r["round"], r["eval/global/accuracy"]) for r in evals]
    return out


def table(results: list[dict]) -> str:
    head = (
        "| method | alpha | global acc (last / best) | local acc | gap | rho_rel (own) "
        "| same uploads: FedIT | FLoRA-NA layer | FLoRA-NA model | SVD bound | bytes |"
    )
    lines = [head, "|" + "---|" * 11]
    for x in results:
        lines.append(
            f"| {x['method']} | {x['alpha']} | {x['global_acc']:.4f} / {x['best_global_acc']:.4f}"
            f" | {x['local_acc']:.4f} | {x['local_acc'] - x['global_acc']:+.4f}"
            f" | {x['rho_rel']:.4f} | {x['cmp_fedit']:.4f} | {x['cmp_floranna_layer']:.4f}"
            f" | {x['cmp_floranna_model']:.4f} | {x['cmp_svd']:.4f}"
            f" | {reporting.format_value(x['bytes_total'], 'bytes')} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: pathlib.Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for x in results:
        rounds, acc = zip(*x["curve"], strict=True)
        ax.plot(rounds, acc, marker="o", label=f"{x['method']} a={x['alpha']}")
        bx.scatter(x["rho_rel"], x["global_acc"], label=f"{x['method']} a={x['alpha']}")
    ax.set_xlabel("round")
    ax.set_ylabel("global accuracy (SST-2 dev)")
    bx.set_xlabel("mean rho_rel of the run")
    bx.set_ylabel("final global accuracy")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="BERT/RoBERTa folder or hub id")
    ap.add_argument("--glue", required=True, help="GLUE folder (SST-2/train.tsv, dev.tsv)")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="method:alpha,... ")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients_per_round", type=int, default=5)
    ap.add_argument("--local_steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--eval_every", type=int, default=2)
    ap.add_argument("--out", default="bench_out/reviewers")
    a = ap.parse_args(argv)
    out = pathlib.Path(a.out)
    results = []
    for item in a.runs.split(","):
        method, alpha = item.split(":")
        workdir = out / f"{method}_alpha{alpha}"
        train.run(study_config(a, method, float(alpha)), str(workdir))
        rows = reporting.read_rows(workdir / reporting.METRICS_FILE)
        results.append(summarize(rows, method, float(alpha)))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    text = table(results)
    print(f"machine: {machine.describe()}\n\n{text}")
    (out / "reviewers.md").write_text(text + "\n")
    (out / "reviewers.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "reviewers.png")


if __name__ == "__main__":
    main()
