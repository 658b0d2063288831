"""Run a study's grids, resumably: every cell through ``train.run``, as ``launch.py`` runs one.

    results = run_grids(study, ["core"], out="docs/study", work="runs/study")

For each cell, in the grid's order:

- finished in ``<out>/<study>/<cell>/`` (``results.read_cell``): skipped;
- otherwise trained in the scratch folder ``<work>/<study>/<cell>/``, which keeps the
  checkpoints, so an interrupted cell resumes from its newest round (``train.run``); then
  its ``metrics.jsonl``, ``config.json`` (locations made portable) and, last,
  ``summary.md`` are copied to ``<out>/<study>/<cell>/``: only small text is committed, and
  a kill while copying leaves the cell unfinished, not wrong;
- a round that fails (``RoundError``: a non-finite loss at a high learning rate, say)
  keeps its rows and the one-line error (``error.txt``) and the study goes on; a re-run
  tries it again, from its last checkpoint.

Before any cell runs, every cell is built and validated, and each folder that already
holds a cell is checked to hold this experiment: a bad input stops the study with one
``ConfigError`` line and nothing changes. After every cell, ``<out>/<study>/<grid>.md``
lists the grid's cells and their figures, and ``progress`` gets one line: cells done of
the total, the current cell, elapsed time and the time left at the measured time per cell.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from absl import logging

from floranna_jax import reporting, train
from floranna_jax.errors import ConfigError, RoundError
from floranna_jax.study import grid as grid_lib
from floranna_jax.study import results


class CellResult(NamedTuple):
    """``status``: "skipped" (finished before), "done" or "failed" (``error`` says why);
    ``seconds``: wall time spent on it in this call."""

    cell: grid_lib.Cell
    status: str
    seconds: float
    error: str = ""


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def collect(study, grids: Sequence[str]) -> list[grid_lib.Cell]:
    """The cells of ``grids``, in order; a cell two grids share is run once."""
    cells: dict[str, grid_lib.Cell] = {}
    for name in grids:
        for cell in grid_lib.expand(study, name):
            twin = cells.get(cell.name)
            if twin is None:
                cells[cell.name] = cell
            elif results.changed_fields(_as_dict(twin.config), _as_dict(cell.config)):
                raise ConfigError(
                    f"cell {cell.name}: grids {twin.grid} and {cell.grid} give it "
                    "different configs; rename a label"
                )
    return list(cells.values())


def _as_dict(config) -> dict[str, Any]:
    return json.loads(config.to_json())


def _check_folders(cell: grid_lib.Cell, out_dir: str, work_dir: str) -> None:
    """``out_dir`` and ``work_dir`` hold this cell's experiment, or nothing yet."""
    new = _as_dict(cell.config)
    for folder, what in ((out_dir, "results"), (work_dir, "checkpoints")):
        path = os.path.join(folder, results.CONFIG_FILE)
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                diff = results.changed_fields(json.load(f), new)
        except (OSError, ValueError, AttributeError, KeyError) as e:
            raise ConfigError(f"cell {cell.name}: {path}: unreadable ({e})") from None
        if diff:
            raise ConfigError(
                f"cell {cell.name}: config field {diff[0]}: {folder} holds {what} of a run with "
                f"other values of {', '.join(diff)}; move it away or rename the study"
            )


def _copy(src: str, dst: str) -> None:
    shutil.copyfile(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)


def _publish(work_dir: str, out_dir: str, error: str = "") -> None:
    """Copy the cell's small text to ``out_dir``; the summary last (it marks "finished")."""
    os.makedirs(out_dir, exist_ok=True)
    _copy(
        os.path.join(work_dir, reporting.METRICS_FILE),
        os.path.join(out_dir, reporting.METRICS_FILE),
    )
    with open(os.path.join(work_dir, results.CONFIG_FILE)) as f:
        config = results.portable(json.load(f))
    with open(os.path.join(out_dir, results.CONFIG_FILE), "w") as f:
        f.write(json.dumps(config, indent=2) + "\n")
    error_path = os.path.join(out_dir, results.ERROR_FILE)
    if error:
        with open(error_path, "w") as f:
            f.write(error + "\n")
        return
    if os.path.exists(error_path):
        os.remove(error_path)
    _copy(
        os.path.join(work_dir, reporting.SUMMARY_FILE),
        os.path.join(out_dir, reporting.SUMMARY_FILE),
    )


def _run_cell(cell: grid_lib.Cell, out_dir: str, work_dir: str) -> str:
    """Train (or resume) one cell and publish it; the failed round's line, or ""."""
    try:
        train.run(cell.config, work_dir)
    except RoundError as e:
        if os.path.exists(os.path.join(work_dir, reporting.METRICS_FILE)):
            _publish(work_dir, out_dir, error=str(e))
        return str(e)
    _publish(work_dir, out_dir)
    return ""


def _status(got: results.CellRows) -> str:
    if got.finished:
        return "done"
    if got.error:
        return f"failed: {got.error}"
    return f"{len(got.rows)} rounds, unfinished" if got.rows else "not run"


def summary(study, grid: str, out: str, source: str = "<study config>") -> str:
    """A markdown table of ``grid``'s cells as ``<out>/<study>/`` holds them now;
    ``source`` names the study config in the command it shows."""
    cells = grid_lib.expand(study, grid, validate=False)
    m = results.main_metric({"data": {"task": study.base.data.task}})
    head = f"| cell | status | rounds | global {m} | local {m} | gap | rho_rel (mean) | compute s |"
    lines = [
        f"# Study {study.name}, grid {grid}",
        "",
        f"    python -m floranna_jax.study --config={results.portable_path(source)} --grid={grid}",
        "",
        head,
        "|" + "---|" * 8,
    ]
    for cell in cells:
        got = results.read_cell(os.path.join(out, study.name, cell.name))
        status = _status(got)
        if not got.rows:
            lines.append(f"| {cell.name} | {status} |" + " - |" * 6)
            continue
        s = results.stats(got.rows, results.main_metric(got.config))
        figures = [
            s["rounds"],
            s["global_final"],
            s["local_final"],
            s["gap_final"],
            s["rho_rel"],
            s["compute_s"],
        ]
        lines.append(
            f"| {cell.name} | {status} | "
            + " | ".join(reporting.format_value(v) for v in figures)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _write_summaries(study, grids: Sequence[str], out: str, source: str) -> None:
    for grid in grids:
        with open(os.path.join(out, study.name, f"{grid}.md"), "w") as f:
            f.write(summary(study, grid, out, source))


def run_grids(
    study,
    grids: Sequence[str],
    out: str,
    work: str,
    progress: Callable[[str], None] = logging.info,
    source: str = "<study config>",
) -> list[CellResult]:
    """Run every unfinished cell of ``grids``; see the module docstring. ``source``: the
    study config file, for the command the grid summaries show."""
    cells = collect(study, grids)
    folders = [
        (os.path.join(out, study.name, c.name), os.path.join(work, study.name, c.name))
        for c in cells
    ]
    for cell, (out_dir, work_dir) in zip(cells, folders, strict=True):
        _check_folders(cell, out_dir, work_dir)
    os.makedirs(os.path.join(out, study.name), exist_ok=True)
    finished = [results.read_cell(out_dir).finished for out_dir, _ in folders]
    start, timed, done = time.perf_counter(), [], []
    for i, (cell, (out_dir, work_dir)) in enumerate(zip(cells, folders, strict=True)):
        where = f"[{i + 1}/{len(cells)}] {cell.name}"
        if finished[i]:
            done.append(CellResult(cell, "skipped", 0.0))
            progress(f"{where}: finished before, skipped")
            continue
        if timed:
            per_cell, to_run = sum(timed) / len(timed), len(cells) - i - sum(finished[i:])
            eta = f"~{_hms(per_cell * to_run)} left at {_hms(per_cell)} per cell"
        else:
            eta = "time left: known after the first cell"
        elapsed = _hms(time.perf_counter() - start)
        progress(f"{where}: running ({i} of {len(cells)} done; elapsed {elapsed}; {eta})")
        t0 = time.perf_counter()
        error = _run_cell(cell, out_dir, work_dir)
        timed.append(time.perf_counter() - t0)
        done.append(CellResult(cell, "failed" if error else "done", timed[-1], error))
        progress(f"{where}: {'failed: ' + error if error else 'done'} in {_hms(timed[-1])}")
        _write_summaries(study, grids, out, source)
    _write_summaries(study, grids, out, source)
    return done
