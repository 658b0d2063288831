"""Does a study's committed cell re-run to the same numbers? One cell, chosen at random.

    git worktree add /tmp/pinned <the study's commit> && cd /tmp/pinned
    PYTHONPATH=. python <this repository>/benchmarks/study_rerun.py \
        --config=configs/studies/drift.py --grid=drift [--seed=20]

Run it where the study's own code is checked out (the commit its cells ran at), so that
``floranna_jax`` is that code: it picks a cell of ``--grid`` with ``random.Random(--seed)``,
trains it from scratch into ``--work`` and compares every row of its ``metrics.jsonl`` with
the committed one under ``--out``, wall-clock times left out. Prints, per field, in how many
rows the two differ and the largest relative difference, names the machine, and writes JSON
(``--json``). Asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random

from benchmarks import machine
from floranna_jax import reporting, train
from floranna_jax.study import grid as grid_lib


def _timeless(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def compare(rerun: list[dict], committed: list[dict]) -> dict:
    """Per field: rows compared, rows that differ, the largest ``|a - b| / |b|``."""
    if [r["round"] for r in rerun] != [r["round"] for r in committed]:
        raise ValueError("the re-run's rounds are not the committed ones")
    fields: dict[str, dict] = {}
    for a, b in zip(rerun, committed, strict=True):
        for key, want in _timeless(b).items():
            f = fields.setdefault(key, {"rows": 0, "differ": 0, "max_rel_diff": 0.0})
            got = a.get(key)
            f["rows"] += 1
            if got != want:
                f["differ"] += 1
                numbers = all(isinstance(x, int | float) for x in (got, want)) and want
                rel = abs(got - want) / abs(want) if numbers else float("inf")
                f["max_rel_diff"] = max(f["max_rel_diff"], rel)
    return fields


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the study config file")
    parser.add_argument("--grid", required=True)
    parser.add_argument("--seed", type=int, default=20, help="picks the cell")
    parser.add_argument("--out", default="docs/study", help="the committed rows' root")
    parser.add_argument("--work", default="/tmp/study_rerun", help="the re-run's folder")
    parser.add_argument("--json", default="bench_out/study_rerun.json")
    a = parser.parse_args(argv)
    # Loaded by hand, not with config_check.load_file: older study commits do not have it.
    spec = importlib.util.spec_from_file_location("study_config", a.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    study = module.get_config()
    cells = grid_lib.expand(study, a.grid)
    cell = random.Random(a.seed).choice(cells)
    print(f"{len(cells)} cells in grid {a.grid}; random.Random({a.seed}) picks {cell.name}")
    work = os.path.join(a.work, cell.name)
    train.run(cell.config, work)
    committed = os.path.join(a.out, study.name, cell.name, reporting.METRICS_FILE)
    rerun = reporting.read_rows(os.path.join(work, reporting.METRICS_FILE))
    fields = compare(rerun, reporting.read_rows(committed))
    report = {"machine": machine.describe(), "cell": cell.name, "fields": fields}
    print("| field | rows | rows that differ | max relative difference |\n|---|---|---|---|")
    for key, f in fields.items():
        print(f"| {key} | {f['rows']} | {f['differ']} | {f['max_rel_diff']:.3g} |")
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores")
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
