"""Run reporting: one row of metrics per round, written everywhere a reader looks.

``Reporter(workdir, ...)`` appends each round's row to ``metrics.jsonl`` (one JSON object
per line, ``"round"`` = rounds completed), writes it as TensorBoard scalars (tensorboardX,
``workdir/tensorboard``) and advances a tqdm bar. ``finish()`` writes ``summary.md`` (a
small table, also returned and logged) and PNG plots: the task metric against the round
(global and mean local) and ``rho_rel`` against the round (with the ``compare/*`` series of
other estimators on the same uploads, when the run logs them). A resumed run drops the rows
after its checkpoint from ``metrics.jsonl`` (and a row torn by a kill), then rebuilds the
TensorBoard events from the rows kept, so each round appears once everywhere.

Keys of a row: ``train/loss``, ``server/rho``, ``server/rho_rel``, ``server/rho_svd``, ...
(scalar estimator metrics; ``server/bytes_*`` are per client per round),
``comm/bytes_{up,down}_total`` (cumulative over rounds and sampled clients), ``time/*_s``
(wall seconds per phase, the only fields that differ between identical runs), and on
evaluation rounds ``eval/global/<metric>``, ``eval/local/<metric>`` and
``eval/gap/<metric>`` (local minus global). With ``eval.at_start`` a first row of
``"round": 0`` holds the global evaluation of the model before training. A task that
generates text also leaves ``generations/round_<k>.jsonl``: the first generations of the
global evaluation after round ``k`` (:meth:`Reporter.write_generations`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any

import numpy as np
import tqdm
from absl import logging

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.md"
GENERATIONS_DIR = "generations"


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (empty list if there is none).

    A malformed last line is a row torn by a killed process: it is dropped with a warning.
    A malformed line before it is corruption and raises ``ValueError`` naming file:line.
    """
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
    rows = []
    for k, (lineno, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if k < len(lines) - 1:
                raise ValueError(f"{path}:{lineno}: corrupt row, not JSON ({e.msg})") from None
            logging.warning("%s:%d: dropping a torn last row (the run was killed)", path, lineno)
    return rows


def _truncate(path: str, last_round: int) -> list[dict[str, Any]]:
    """Keep only rows up to ``last_round`` (a resumed run rewrites the rows after it); return
    them. Written to a temporary file and renamed, so a kill here loses no row."""
    rows = [r for r in read_rows(path) if r["round"] <= last_round]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)
    return rows


def _remove_event_files(logdir: str) -> None:
    """Delete the TensorBoard event files directly in ``logdir``, nothing else."""
    if not os.path.isdir(logdir):
        return
    for entry in os.scandir(logdir):
        if entry.is_file(follow_symlinks=False) and entry.name.startswith("events.out.tfevents."):
            os.remove(entry.path)


def _add_scalars(writer, row: dict[str, Any]) -> None:
    for k, v in row.items():
        if k != "round" and isinstance(v, int | float):
            writer.add_scalar(k, v, row["round"])


class Reporter:
    """Writes round rows to JSONL, TensorBoard and a progress bar; summary at the end."""

    def __init__(
        self, workdir: str, *, start_round: int, num_rounds: int, main_metric: str,
        primary: bool = True, loss_metric: str = "", global_split: bool = True,
    ):  # fmt: skip
        """``primary=False``: a process of a multi-process run other than process 0, which
        writes nothing and keeps its rows for :meth:`finish`'s table. ``loss_metric``: the
        task's continuous metric, also in the table (``Task.loss_metric``).
        ``global_split=False``: the run has no split to evaluate its global model on, which
        the table says."""
        self.workdir, self.main_metric, self.primary = workdir, main_metric, primary
        self.loss_metric, self.global_split = loss_metric, global_split
        self.path = os.path.join(workdir, METRICS_FILE)
        if not primary:
            self.kept = [r for r in read_rows(self.path) if r["round"] <= start_round]
            self.rows = list(self.kept)
            return
        os.makedirs(workdir, exist_ok=True)
        kept = _truncate(self.path, start_round)
        self.kept = kept  # rows of the rounds already done (resuming), in order
        from tensorboardX import SummaryWriter  # noqa: PLC0415  (slow import)

        # metrics.jsonl is the source of truth: the event files are rebuilt from its kept rows.
        # Appending a second events file would show the rounds after the checkpoint twice, and
        # tensorboardX names files by the second, so a quick resume would overwrite the first.
        # SummaryWriter(purge_step=...) only hides stale steps from TensorBoard's own loader;
        # the files still hold them for any other reader. Rows carry no wall time, so re-emitted
        # events get the resume's.
        logdir = os.path.join(workdir, "tensorboard")
        _remove_event_files(logdir)
        self.writer = SummaryWriter(logdir)
        for row in kept:
            _add_scalars(self.writer, row)
        self.writer.flush()
        self.bar = tqdm.tqdm(total=num_rounds, initial=start_round, desc="rounds", unit="round")

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        """After a failure: end the progress bar's line, so the error prints on its own,
        and stop the TensorBoard writer (its lost events are rebuilt on resume)."""
        if kind is not None and self.primary:
            self.bar.close()
            with contextlib.suppress(OSError):  # the disk that failed may fail it too
                self.writer.close()

    def write(self, row: dict[str, Any]) -> None:
        if not self.primary:
            self.rows.append(row)
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        _add_scalars(self.writer, row)
        self.writer.flush()
        shown = {"loss": row.get("train/loss"), "rho_rel": row.get("server/rho_rel")}
        glob = row.get(f"eval/global/{self.main_metric}")
        if glob is not None:
            shown[self.main_metric] = glob
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if v is not None})
        self.bar.update(1 if row["round"] else 0)  # round 0: the evaluation before training

    def write_generations(self, round_: int, records: list[dict[str, Any]]) -> None:
        """``generations/round_<round_>.jsonl``: one JSON object a record (the evaluation
        of that round's global model); rewritten when a resumed run evaluates it again."""
        if not self.primary:
            return
        folder = os.path.join(self.workdir, GENERATIONS_DIR)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"round_{round_}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def finish(self, title: str) -> str:
        """Write summary.md and the plots; return the summary table."""
        if not self.primary:
            return summary_table(self.rows, self.main_metric, title, self.loss_metric,
                                 self.global_split)  # fmt: skip
        self.bar.close()
        self.writer.close()
        rows = read_rows(self.path)
        text = summary_table(rows, self.main_metric, title, self.loss_metric, self.global_split)
        with open(os.path.join(self.workdir, SUMMARY_FILE), "w") as f:
            f.write(text + "\n")
        plot_rows(rows, self.main_metric, self.workdir)
        logging.info("summary\n%s", text)
        return text


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def format_value(value: float | None, kind: str = "g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "bytes":
        units = ["B", "KB", "MB", "GB", "TB"]
        i = min(int(math.log(max(value, 1), 1000)), len(units) - 1)
        return f"{value / 1000**i:.3g} {units[i]}"
    return f"{value:.4g}"


NO_GLOBAL_SPLIT = "none: no global split (eval.global_split=False)"


def _metric_lines(
    rows: list[dict[str, Any]], m: str, global_split: bool = True
) -> list[tuple[str, str]]:
    """Global (and before round 1, with ``eval.at_start``), local and gap of metric ``m``;
    without a ``global_split`` the global lines say so."""
    if global_split:
        glob = format_value(_last(rows, f"eval/global/{m}"))
        gap = format_value(_last(rows, f"eval/gap/{m}"))
    else:
        glob = gap = NO_GLOBAL_SPLIT
    lines = [
        (f"global {m}", glob),
        (f"local {m} (mean over clients)", format_value(_last(rows, f"eval/local/{m}"))),
        (f"gap local - global {m}", gap),
    ]
    before = [r[f"eval/global/{m}"] for r in rows if r["round"] == 0 and f"eval/global/{m}" in r]
    if before:  # eval.at_start: the global model before training
        lines.insert(0, (f"global {m} before round 1", format_value(before[0])))
    return lines


def summary_table(
    rows: list[dict[str, Any]], main_metric: str, title: str, loss_metric: str = "",
    global_split: bool = True,
) -> str:  # fmt: skip
    """A markdown table of the run's final figures (metric, gap, rho, bytes, time), and
    those of the task's ``loss_metric`` (``Task.loss_metric``) when it has one;
    ``global_split=False``: the global lines say the run has none."""
    rho_rel = [r["server/rho_rel"] for r in rows if "server/rho_rel" in r]
    last_rho, mean_rho = (rho_rel[-1], float(np.mean(rho_rel))) if rho_rel else (None, None)
    lines = [
        ("rounds", str(_last(rows, "round") or 0)),
        *_metric_lines(rows, main_metric, global_split),
        *(_metric_lines(rows, loss_metric, global_split) if loss_metric else []),
        ("train loss (last round)", format_value(_last(rows, "train/loss"))),
        ("rho_rel (last / mean)", f"{format_value(last_rho)} / {format_value(mean_rho)}"),
        ("bytes up (total)", format_value(_last(rows, "comm/bytes_up_total"), "bytes")),
        ("bytes down (total)", format_value(_last(rows, "comm/bytes_down_total"), "bytes")),
    ]  # fmt: skip
    eps = _last(rows, "privacy/epsilon")
    if eps is not None:  # a DP-FedAvg run (floranna_jax.privacy)
        lines.append((f"epsilon at delta={_last(rows, 'privacy/delta'):g}", format_value(eps)))
    for phase in ("clients", "server", "eval"):
        total = sum(r.get(f"time/{phase}_s", 0.0) for r in rows)
        lines.append((f"time {phase} (s, all rounds)", f"{total:.2f}"))
    width = max(len(k) for k, _ in lines)
    out = [
        f"## {title}",
        "",
        f"| {'quantity'.ljust(width)} | value |",
        f"|{'-' * (width + 2)}|-------|",
    ]
    out += [f"| {k.ljust(width)} | {v} |" for k, v in lines]
    return "\n".join(out)


def _series(rows, key):
    pts = [(r["round"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_rows(rows: list[dict[str, Any]], main_metric: str, workdir: str) -> list[str]:
    """``metric.png`` (global and local task metric vs round) and ``rho_rel.png``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    paths = []
    compared = sorted({k for r in rows for k in r if k.startswith("compare/")})
    panels = {
        "metric.png": ([f"eval/global/{main_metric}", f"eval/local/{main_metric}"], main_metric),
        "rho_rel.png": (["server/rho_rel", *compared], "rho / ||dW_ideal||"),
    }
    for name, (keys, ylabel) in panels.items():
        fig = Figure(figsize=(5, 3.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for key in keys:
            x, y = _series(rows, key)
            ax.plot(x, y, marker="o", label=key.split("/")[1] if key.startswith("eval") else key)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
        fig.tight_layout()
        paths.append(os.path.join(workdir, name))
        fig.savefig(paths[-1])
    return paths
