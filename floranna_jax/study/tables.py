"""The study's tables, as markdown lines, from finished runs (``Run``) alone.

Each table has one block per group (``report.group_axis``: one axis, e.g. Dirichlet alpha,
or a tuple of axes, e.g. split and local steps) and one row per method; "mean ± std" is over
seeds with ddof = 1, and a "95% CI" is Student's t interval of a mean paired difference.
``spearman`` is Spearman's rank correlation, written out (ties get their average rank).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from scipy import stats as scipy_stats

from floranna_jax import reporting
from floranna_jax.study import results


class Run(NamedTuple):
    """A finished cell: its ``name``, ``method`` label, ``group`` and ``seed`` values, its
    ``rows`` and ``stats`` (``results.stats``)."""

    name: str
    method: str
    group: Any
    seed: Any
    rows: list[dict[str, Any]]
    stats: dict[str, float]


def show(group) -> str:
    """A group as a table cell: its value, or the values of a tuple of axes joined."""
    return ", ".join(map(str, group)) if isinstance(group, tuple) else str(group)


def axis_name(group_axis) -> str:
    """The group column's header: the axis, or the axes of a tuple joined."""
    return " x ".join(group_axis) if isinstance(group_axis, tuple | list) else group_axis


def interval(values, level: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean of ``values`` (ddof = 1); NaNs for fewer than 2."""
    values = np.asarray(values, float)
    if len(values) < 2:
        return float("nan"), float("nan")
    half = scipy_stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1)
    half /= np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def show_interval(values) -> str:
    lo, hi = interval(values)
    return "-" if np.isnan(lo) else f"[{lo:+.4f}, {hi:+.4f}]"


def mean_std(values, digits: int = 4, sign: str = "") -> str:
    """ "mean ± std" (ddof=1) of the non-NaN ``values``; "-" for none, the value for one.
    ``sign="+"`` signs the mean (for differences)."""
    values = [v for v in values if not np.isnan(v)]
    if not values:
        return "-"
    mean = f"{np.mean(values):{sign}.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ± {np.std(values, ddof=1):.{digits}f}"


def _ranks(x) -> np.ndarray:
    """1-based ranks of ``x``, ties given their average rank."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson's of the tie-averaged ranks); NaN when either
    side is constant or there are fewer than 3 points."""
    if len(x) < 3:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def by_group(runs: list[Run], group) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for run in runs:
        if run.group == group:
            out.setdefault(run.method, []).append(run)
    return out


def metric_table(runs: list[Run], groups, metric: str, group_axis: str) -> list[str]:
    cols = ["global at start", "global final", "global best", "local final", "local best",
            "gap final"]  # fmt: skip
    keys = ["global_start", "global_final", "global_best", "local_final", "local_best",
            "gap_final"]  # fmt: skip
    lines = [
        f"| {axis_name(group_axis)} | method | seeds | "
        + " | ".join(f"{c} {metric}" for c in cols)
        + " | rho_rel (mean over rounds) | bytes (up + down) | server s |",
        "|" + "---|" * 12,
    ]
    for group in groups:
        for method, mine in by_group(runs, group).items():
            figures = [mean_std([r.stats[k] for r in mine]) for k in (*keys, "rho_rel")]
            nbytes = reporting.format_value(
                float(np.mean([r.stats["bytes"] for r in mine])), "bytes"
            )
            server_s = mean_std([r.stats["server_s"] for r in mine], 2)
            lines.append(
                f"| {show(group)} | {method} | {len(mine)} | "
                + " | ".join(figures)
                + f" | {nbytes} | {server_s} |"
            )
    return lines


def compare_table(runs: list[Run], groups, group_axis: str) -> list[str]:
    lines = [
        f"| {axis_name(group_axis)} | run's method | " + " | ".join(results.COMPARED) + " |",
        "|" + "---|" * (2 + len(results.COMPARED)),
    ]
    for group in groups:
        for method, mine in by_group(runs, group).items():
            cols = [mean_std([r.stats[f"compare/{c}"] for r in mine]) for c in results.COMPARED]
            lines.append(f"| {show(group)} | {method} | " + " | ".join(cols) + " |")
    return lines


def differences(runs: list[Run], group, baseline: str, method: str) -> dict[str, list[float]]:
    """``method`` minus ``baseline`` on the same seed, in ``group``: per seed, the paired
    ``global_final``, ``global_best`` and ``rho_rel`` differences (empty lists: no pair)."""
    by = by_group(runs, group)
    base = {r.seed: r.stats for r in by.get(baseline, [])}
    pairs = [(r.stats, base[r.seed]) for r in by.get(method, []) if r.seed in base]
    return {k: [a[k] - b[k] for a, b in pairs] for k in ("global_final", "global_best", "rho_rel")}


def paired_table(runs, groups, baseline: str, paired, metric: str, group_axis: str) -> list[str]:
    lines = [
        f"| {axis_name(group_axis)} | method - {baseline} | seeds | global final {metric}: mean "
        "| std | min | max | better on | 95% CI | global best: mean ± std | 95% CI "
        "| rho_rel: mean ± std |",
        "|" + "---|" * 12,
    ]
    for group, method, d in paired_rows(runs, groups, baseline, paired):
        final, n = d["global_final"], len(d["global_final"])
        if not n:
            lines.append(f"| {show(group)} | {method} | 0 |" + " - |" * 9)
            continue
        std = f"{np.std(final, ddof=1):.4f}" if n > 1 else "-"
        better = sum(x > 0 for x in final)
        lines.append(
            f"| {show(group)} | {method} | {n} | {np.mean(final):+.4f} | {std} "
            f"| {min(final):+.4f} | {max(final):+.4f} | {better} of {n} "
            f"| {show_interval(final)} | {gain(d['global_best'])} "
            f"| {mean_std(d['rho_rel'], sign='+')} |"
        )
    return lines


def paired_rows(runs: list[Run], groups, baseline: str, paired):
    """``(group, method, differences)`` for each group and each method of ``paired``."""
    for group in groups:
        for method in paired:
            yield group, method, differences(runs, group, baseline, method)


def gain(values: list[float]) -> str:
    """Paired differences as two cells: mean ± std, and the 95% interval of the mean."""
    return f"{mean_std(values, sign='+')} | {show_interval(values)}"


def baseline_rho(runs: list[Run], group, baseline: str) -> list[float]:
    """The ``rho_rel`` of each ``baseline`` run in ``group``."""
    return [r.stats["rho_rel"] for r in by_group(runs, group).get(baseline, [])]


def rho_cut(base: list[float], d: dict[str, list[float]]) -> float:
    """The share of the baseline's mean ``rho_rel`` (``base``) that a method removes, from
    its paired :func:`differences` ``d``; NaN without runs on either side."""
    if not base or not d["rho_rel"]:
        return float("nan")
    return float(-np.mean(d["rho_rel"]) / np.mean(base))


def dose_table(runs, groups, baseline: str, paired, metric: str, group_axis: str) -> list[str]:
    """Per group: the baseline's own ``rho_rel``, and per method the relative reduction of
    ``rho_rel`` against the baseline on the same seed with the paired gain in final and best
    global ``metric`` (mean and 95% CI)."""
    lines = [
        f"| {axis_name(group_axis)} | {baseline} rho_rel | method | seeds "
        f"| rho_rel reduction (share of {baseline}'s) | gain, final {metric} | 95% CI "
        f"| gain, best {metric} | 95% CI |",
        "|" + "---|" * 9,
    ]
    for group, method, d in paired_rows(runs, groups, baseline, paired):
        base = baseline_rho(runs, group, baseline)
        lines.append(
            f"| {show(group)} | {mean_std(base)} | {method} | {len(d['rho_rel'])} "
            f"| {reporting.format_value(rho_cut(base, d))} "
            f"| {gain(d['global_final'])} | {gain(d['global_best'])} |"
        )
    return lines


def ordering_table(runs: list[Run], groups, group_axis: str) -> list[str]:
    lines = [
        f"| {axis_name(group_axis)} | by rho_rel, lowest first | by global final, highest first "
        "| Spearman over method means | Spearman over runs |",
        "|" + "---|" * 5,
    ]
    for group in groups:
        by = by_group(runs, group)
        rho = {m: np.mean([r.stats["rho_rel"] for r in rs]) for m, rs in by.items()}
        acc = {m: np.mean([r.stats["global_final"] for r in rs]) for m, rs in by.items()}
        mine = [r for rs in by.values() for r in rs]
        over_means = spearman(list(rho.values()), [acc[m] for m in rho])
        over_runs = spearman(
            [r.stats["rho_rel"] for r in mine], [r.stats["global_final"] for r in mine]
        )
        lines.append(
            f"| {show(group)} | {', '.join(sorted(rho, key=rho.get))} "
            f"| {', '.join(sorted(acc, key=lambda m: -acc[m]))} "
            f"| {reporting.format_value(over_means)} "
            f"| {reporting.format_value(over_runs)} |"
        )
    return lines
