"""A study's committed results: one folder per cell, read without a model or data.

    <out>/<study>/<cell>/metrics.jsonl   one row per round (``reporting``)
                        config.json     the cell's experiment, locations made portable
                        summary.md      the run's summary table; present = the cell finished
                        error.txt       only for a cell whose round failed (one line)

``read_cell`` loads a folder; ``stats`` reduces its rows to the figures the study tables
and the evidence report show. A cell is finished when its summary exists and its last row
is its config's final round.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import numpy as np

from floranna_jax import reporting, resume, tasks

CONFIG_FILE = "config.json"
ERROR_FILE = "error.txt"
COMPARED = ("fedit", "floranna_layer", "floranna_model", "svd")  # server.COMPARISONS labels


class CellRows(NamedTuple):
    """What a cell folder holds: ``rows`` (round rows), ``config`` (dict, or None when the
    folder is absent), ``finished`` and ``error`` (the failed round's line, or "")."""

    rows: list[dict[str, Any]]
    config: dict[str, Any] | None
    finished: bool
    error: str


def portable_path(path: str) -> str:
    """An absolute path as one that reads the same on another machine: relative to the
    working directory (the repository root) when under it, else ``~/...`` when under home."""
    if not path or not os.path.isabs(path):
        return path
    home, here = os.path.expanduser("~"), os.getcwd()
    if os.path.commonpath([path, here]) == here:
        return os.path.relpath(path, here)
    if home != "/" and os.path.commonpath([path, home]) == home:
        return os.path.join("~", os.path.relpath(path, home))
    return path


def portable(config: dict[str, Any]) -> dict[str, Any]:
    """A config.json dict with ``model.path`` and ``data.dir`` made portable."""
    out = {k: dict(v) for k, v in config.items()}
    out["model"]["path"] = portable_path(out["model"]["path"])
    out["data"]["dir"] = portable_path(out["data"]["dir"])
    return out


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``resume.changed_fields`` up to where the files live: ``data.dir`` is not compared and
    ``model.path`` only by its last name, the model's (another machine keeps them elsewhere)."""

    def what(config):
        out = {k: dict(v) for k, v in config.items()}
        out["model"]["path"] = os.path.basename(os.path.normpath(out["model"]["path"] or "."))
        out["data"].pop("dir", None)
        return out

    return resume.changed_fields(what(old), what(new))


def read_cell(folder: str) -> CellRows:
    """The rows, config and state of one cell folder (empty when it does not exist)."""
    rows = reporting.read_rows(os.path.join(folder, reporting.METRICS_FILE))
    config = None
    if os.path.exists(os.path.join(folder, CONFIG_FILE)):
        with open(os.path.join(folder, CONFIG_FILE)) as f:
            config = json.load(f)
    error = ""
    if os.path.exists(os.path.join(folder, ERROR_FILE)):
        with open(os.path.join(folder, ERROR_FILE)) as f:
            error = f.read().strip()
    finished = (
        config is not None
        and os.path.exists(os.path.join(folder, reporting.SUMMARY_FILE))
        and bool(rows)
        and rows[-1]["round"] == config["train"]["num_rounds"]
    )
    return CellRows(rows, config, finished, error)


def main_metric(config: dict[str, Any]) -> str:
    return tasks.get(config["data"]["task"]).main_metric


def _mean(rows, key) -> float:
    values = [r[key] for r in rows if key in r]
    return float(np.mean(values)) if values else float("nan")


def stats(rows: list[dict[str, Any]], metric: str) -> dict[str, float]:
    """One run's figures: ``global``, ``local``, ``gap`` (local - global) at the last
    evaluation (``*_final``) and the best evaluation (``global_best``, ``local_best``),
    ``rho_rel`` (mean over rounds), ``bytes`` (up + down, all rounds and clients),
    ``server_s``, ``compute_s`` (clients + server + eval seconds, all rounds), ``rounds``,
    ``compare/<label>`` (mean ``rho_rel`` of that estimator on the run's uploads), and
    ``global_start``, the untrained model's (the ``eval.at_start`` row, round 0)."""
    key = f"eval/global/{metric}"
    evals = [r for r in rows if r["round"] > 0 and key in r]
    nan = float("nan")
    out = {"rounds": float(rows[-1]["round"]) if rows else nan}
    out["global_start"] = next((r[key] for r in rows if r["round"] == 0 and key in r), nan)
    for side in ("global", "local", "gap"):
        key = f"eval/{side}/{metric}"
        values = [r[key] for r in evals if key in r]
        out[f"{side}_final"] = values[-1] if values else nan
        if side != "gap":
            out[f"{side}_best"] = max(values) if values else nan
    out["rho_rel"] = _mean(rows, "server/rho_rel")
    last = rows[-1] if rows else {}
    out["bytes"] = last.get("comm/bytes_up_total", nan) + last.get("comm/bytes_down_total", nan)
    out["server_s"] = sum(r.get("time/server_s", 0.0) for r in rows)
    out["compute_s"] = sum(
        r.get(f"time/{p}_s", 0.0) for r in rows for p in ("clients", "server", "eval")
    )
    for label in COMPARED:
        out[f"compare/{label}"] = _mean(rows, f"compare/{label}/rho_rel")
    return out
