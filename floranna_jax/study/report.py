"""The evidence report: tables and plots of a study, from its committed rows alone.

    write_report(study, out="docs/study", path="docs/evidence.md", source=...)

reads ``<out>/<study>/<cell>/`` of the cells of ``study.report.grids`` and
``study.report.lr_grid`` (``results.read_cell``: no model, no data), and writes ``path``
and three PNGs beside it (``<stem>_curves.png``, ``<stem>_rho_vs_metric.png``,
``<stem>_gain_vs_rho_cut.png``):

- the learning-rate table: global metric of each rate at each evaluated round;
- per method and group (``report.group_axis``: an axis such as Dirichlet alpha, or a tuple
  of axes such as split and local steps): global and local task
  metric and their gap, final and best, mean ± standard deviation over seeds (ddof=1),
  with ``rho_rel`` (mean over rounds), bytes (up + down) and server seconds;
- ``rho_rel`` of every comparison estimator on each run's own uploads (``server.compare``);
- the paired difference, method minus ``report.baseline`` on the same seed, with its 95% CI;
- the dose-response: per group the baseline's ``rho_rel``, each method's share of it removed
  and its paired gain, as a table and a plot (gain against reduction);
- whether the ordering by ``rho_rel`` is the ordering by the global metric: Spearman's
  rank correlation over the methods' means and over all runs, per group.

Only finished cells enter the tables; the header lists the missing ones. The text between
the ``findings`` markers is written by a person and kept when the report is regenerated.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from floranna_jax.study import grid as grid_lib
from floranna_jax.study import results, tables

FINDINGS_START = "<!-- findings: written by hand from the tables below; kept on regeneration -->"
FINDINGS_END = "<!-- end of findings -->"
FINDINGS_EMPTY = (
    "_Not written yet: what the tables and figures below show about each of the reviewers'\n"
    "five questions (METHOD.md) and about the paper's claim, including where they contradict\n"
    "it, goes here, once the core grid has run._"
)
MARKERS = "osD^v<>p"


def _value(cell: grid_lib.Cell, axis) -> Any:
    """The cell's value on ``axis``: its grid's axis, else the config field of that name; for
    a tuple of axes, the tuple of their values."""
    if isinstance(axis, tuple | list):
        return tuple(_value(cell, a) for a in axis)
    if axis in cell.values:
        return cell.values[axis]
    return grid_lib.flatten(cell.config.to_dict())[axis]


def _cells(study, grids) -> tuple[list[grid_lib.Cell], list[tuple[str, list[grid_lib.Cell]]]]:
    """The cells of ``grids`` (each once), and each grid with its cells."""
    cells, counts, seen = [], [], set()
    for grid in grids:
        mine = grid_lib.expand(study, grid, validate=False)
        cells += [c for c in mine if c.name not in seen]
        seen |= {c.name for c in mine}
        counts.append((grid, mine))
    return cells, counts


def lr_table(study, out: str, metric: str) -> list[str]:
    """The global metric of each learning rate (mean over the grid's other axes) per round."""
    rc = study.report
    curves: dict[Any, dict[int, list[float]]] = {}
    notes: dict[Any, list[str]] = {}
    for cell in grid_lib.expand(study, rc.lr_grid, validate=False):
        lr = _value(cell, rc.lr_axis)
        got = results.read_cell(os.path.join(out, study.name, cell.name))
        curve = curves.setdefault(lr, {})
        for row in got.rows:
            if f"eval/global/{metric}" in row:
                curve.setdefault(row["round"], []).append(row[f"eval/global/{metric}"])
        if not got.finished:
            notes.setdefault(lr, []).append(
                f"{cell.name}: {got.error or ('unfinished' if got.rows else 'not run')}"
            )
    rounds = sorted({r for c in curves.values() for r in c})
    lines = [
        "| " + " | ".join([rc.lr_axis, *(f"round {r}" for r in rounds), "not finished"]) + " |",
        "|" + "---|" * (len(rounds) + 2),
    ]
    for lr in sorted(curves):
        cols = [str(lr), *(tables.mean_std(curves[lr].get(r, [])) for r in rounds)]
        lines.append("| " + " | ".join([*cols, "; ".join(notes.get(lr, []))]) + " |")
    return lines


def _curve(runs: list[tables.Run], key: str) -> tuple[list[int], list[float]]:
    """The mean over ``runs`` of ``key`` at each round all of them have it."""
    per_round: dict[int, list[float]] = {}
    for run in runs:
        for row in run.rows:
            if key in row:
                per_round.setdefault(row["round"], []).append(row[key])
    rounds = [r for r in sorted(per_round) if len(per_round[r]) == len(runs)]
    return rounds, [float(np.mean(per_round[r])) for r in rounds]


def plot_curves(runs: list[tables.Run], groups, metric: str, group_axis: str, path: str) -> None:
    """Per group (column): the global metric and ``rho_rel`` per round, one line per method
    (mean over seeds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(4.5 * len(groups), 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(groups), squeeze=False)
    for j, group in enumerate(groups):
        for method, mine in tables.by_group(runs, group).items():
            for i, key in enumerate((f"eval/global/{metric}", "server/rho_rel")):
                axes[i, j].plot(*_curve(mine, key), marker="o", markersize=3, label=method)
        axes[0, j].set_title(f"{tables.axis_name(group_axis)} = {tables.show(group)}")
        axes[0, j].set_ylabel(f"global {metric}")
        axes[1, j].set_ylabel("rho_rel")
        axes[1, j].set_xlabel("round")
    axes[0, 0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def plot_scatter(runs: list[tables.Run], groups, metric: str, group_axis: str, path: str) -> None:
    """Final global metric against mean ``rho_rel``, every run: colour = method, marker =
    group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    methods = list(dict.fromkeys(r.method for r in runs))
    for run in runs:
        k, g = methods.index(run.method), list(groups).index(run.group)
        first = run is next(r for r in runs if r.method == run.method and r.group == run.group)
        ax.scatter(
            run.stats["rho_rel"],
            run.stats["global_final"],
            color=f"C{k % 10}",
            marker=MARKERS[g % len(MARKERS)],
            label=f"{run.method}, {tables.show(run.group)}" if first else None,
        )
    ax.set_xlabel("rho_rel of the run (mean over rounds)")
    ax.set_ylabel(f"final global {metric}")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path)


def plot_dose(runs: list[tables.Run], groups, baseline: str, paired, metric: str, path: str):
    """Per group and method: the paired gain in final global ``metric`` over ``baseline``
    (mean, 95% CI as the bar) against the relative ``rho_rel`` reduction; colour = method,
    marker = group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(7, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for g, group in enumerate(groups):
        base = tables.baseline_rho(runs, group, baseline)
        for k, method in enumerate(paired):
            d = tables.differences(runs, group, baseline, method)
            cut = tables.rho_cut(base, d)
            if np.isnan(cut):
                continue
            gain = float(np.mean(d["global_final"]))
            lo, hi = tables.interval(d["global_final"])
            bar = None if np.isnan(lo) else [[gain - lo], [hi - gain]]
            ax.errorbar(
                cut,
                gain,
                yerr=bar,
                color=f"C{k % 10}",
                marker=MARKERS[g % len(MARKERS)],
                capsize=3,
                label=f"{method}, {tables.show(group)}",
            )
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel(f"rho_rel reduction, share of {baseline}'s (same seed)")
    ax.set_ylabel(f"gain in final global {metric} over {baseline} (95% CI)")
    ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def _findings(path: str) -> str:
    """The hand-written findings of an existing report (or the placeholder)."""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        if FINDINGS_START in text and FINDINGS_END in text:
            return text.split(FINDINGS_START, 1)[1].split(FINDINGS_END, 1)[0].strip("\n")
    return FINDINGS_EMPTY


def _setup(base) -> str:
    m, c, t, p = base.model, base.client, base.train, base.partition
    name = os.path.basename(os.path.normpath(m.path)) if m.source == "pretrained" else "random"
    return (
        f"{name} on {base.data.task} ({base.data.source}, max length {base.data.max_length}), "
        f"LoRA r = {base.lora.rank} on {', '.join(base.lora.targets)}; {p.num_clients} "
        f"clients ({p.scheme}), {t.clients_per_round} per round, {c.local_steps} local "
        f"{c.optimizer} steps of batch {c.batch_size} at learning rate {c.learning_rate}; "
        f"{t.num_rounds} rounds, evaluation every {base.eval.every_rounds} (local: "
        f"{base.eval.max_local_examples or 'all the'} held-out rows per client at most)"
    )


def load_runs(study, cells, out: str) -> list[tables.Run]:
    rc = study.report
    runs = []
    for cell in cells:
        got = results.read_cell(os.path.join(out, study.name, cell.name))
        if got.finished:
            stats = results.stats(got.rows, results.main_metric(got.config))
            runs.append(
                tables.Run(
                    cell.name,
                    _value(cell, rc.method_axis),
                    _value(cell, rc.group_axis),
                    _value(cell, rc.seed_axis),
                    got.rows,
                    stats,
                )
            )
    return runs


def write_report(study, out: str, path: str, source: str) -> str:
    """Write the report ``path`` and its PNGs from ``<out>/<study.name>/``; return its text.
    ``source``: the study config file, named in the report's command line."""
    rc = study.report
    cells, counts = _cells(study, rc.grids)
    runs = load_runs(study, cells, out)
    metric = results.main_metric({"data": {"task": study.base.data.task}})
    groups = sorted({r.group for r in runs})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # the PNGs are written first
    stem = os.path.splitext(path)[0]
    curves, scatter = f"{stem}_curves.png", f"{stem}_rho_vs_{metric}.png"
    dose = f"{stem}_gain_vs_rho_cut.png"
    ga = rc.group_axis
    finished = {r.name for r in runs}
    lines = [
        f"# {rc.title}",
        "",
        "Generated from the committed rows alone (no model, no data) by",
        "",
        f"    python -m floranna_jax.study report --config={results.portable_path(source)}",
        "",
        f"from `{results.portable_path(out)}/{study.name}/`; everything but the findings "
        "section is rewritten each time.",
        "",
        f"Setup: {_setup(study.base)}.",
        "",
    ]
    for grid, mine in counts:
        missing = [c.name for c in mine if c.name not in finished]
        lines.append(
            f"- grid `{grid}`: {len(mine) - len(missing)} of {len(mine)} cells "
            f"finished" + (f"; not yet: {', '.join(missing)}" if missing else "")
        )
    lines += ["", "## Findings", "", FINDINGS_START, _findings(path), FINDINGS_END, ""]
    if rc.lr_grid:
        lines += [
            f"## Learning rate (grid `{rc.lr_grid}`): global {metric} per round",
            "",
            *lr_table(study, out, metric),
            "",
        ]
    if not runs:
        lines += ["No finished cells of the compared grids yet: no tables or figures.", ""]
    else:
        lines += [
            f"## Global and local {metric} per method",
            "",
            "Mean ± standard deviation over seeds (ddof = 1); final = the last evaluation, "
            "best = the best one; gap = local - global.",
            "",
            *tables.metric_table(runs, groups, metric, ga),
            "",
            "## rho_rel of each estimator on each run's own uploads (mean over rounds)",
            "",
            *tables.compare_table(runs, groups, ga),
            "",
            f"## Paired differences against {rc.baseline}, same seed",
            "",
            *tables.paired_table(runs, groups, rc.baseline, rc.paired, metric, ga),
            "",
            f"## Dose-response: gain over {rc.baseline} against its rho_rel reduction",
            "",
            f"Per group: {rc.baseline}'s own rho_rel (mean over rounds), and per method the "
            f"share of it removed and the paired gain in global {metric} (same seed; 95% CI: "
            "Student's t over seeds).",
            "",
            *tables.dose_table(runs, groups, rc.baseline, rc.paired, metric, ga),
            "",
            f"## Is the ordering by rho_rel the ordering by global {metric}?",
            "",
            f"Spearman's rank correlation between rho_rel and final global {metric}: -1 = "
            "every lower rho_rel goes with a higher metric; '-' = fewer than 3 points or a "
            "tie everywhere.",
            "",
            *tables.ordering_table(runs, groups, ga),
            "",
            "## Figures",
            "",
            f"![global {metric} and rho_rel per round]({os.path.basename(curves)})",
            "",
            f"![final global {metric} against rho_rel, every run]({os.path.basename(scatter)})",
            "",
            f"![gain over {rc.baseline} against rho_rel reduction]({os.path.basename(dose)})",
            "",
        ]
        plot_curves(runs, groups, metric, ga, curves)
        plot_scatter(runs, groups, metric, ga, scatter)
        plot_dose(runs, groups, rc.baseline, rc.paired, metric, dose)
    text = "\n".join(lines)
    with open(path, "w") as f:
        f.write(text)
    return text
