"""Tests of studies (floranna_jax/study/): a grid of two smoke cells runs through train.run,
a re-run skips finished cells, an interrupted cell resumes and ends equal to an uninterrupted
one, the report is regenerated from the committed cell folders alone and its numbers are the
rows', and bad grid input is one clear line before anything is written."""

import copy
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import types

import numpy as np
import pytest
from smoke_setup import REPO, shared_compilation

from floranna_jax import reporting, train
from floranna_jax.errors import ConfigError, RoundError
from floranna_jax.study import grid, report, results, runner, tables

CELLS = ("fedit_alpha0.5_seed0", "floranna_layer_alpha0.5_seed0")  # the smoke core grid
PUBLISHED = {"metrics.jsonl", "config.json", "summary.md"}


def _study(arg="smoke"):
    """configs/studies/evidence.py[:arg], unlocked (tests add grids), as the command loads it,
    but without the per-step bar, so cells share the clients' program (smoke_setup)."""
    path = REPO / "configs" / "studies" / "evidence.py"
    spec = importlib.util.spec_from_file_location("evidence_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    study = module.get_config(arg)
    study.base.train.step_progress = False
    return study


def _with_grid(study, name, axes, fixed=None):
    study = copy.deepcopy(study)
    study.grids[name] = {"axes": axes, **({"fixed": fixed} if fixed else {})}
    return study


def _rows(folder):
    return [
        {k: v for k, v in r.items() if not k.startswith("time/")}
        for r in reporting.read_rows(folder / reporting.METRICS_FILE)
    ]


def _counting_train_run(monkeypatch):
    calls = []
    real = train.run

    def counted(config, workdir):
        calls.append(workdir)
        return real(config, workdir)

    monkeypatch.setattr(train, "run", counted)
    return calls


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """The smoke study's core grid (two cells), run once for the tests that read it."""
    root = tmp_path_factory.mktemp("study")
    study, lines = _study(), []
    with shared_compilation(), pytest.MonkeyPatch.context() as mp:
        calls = _counting_train_run(mp)
        done = runner.run_grids(
            study, ["core"], str(root / "docs"), str(root / "work"), progress=lines.append
        )
    return types.SimpleNamespace(
        study=study, out=root / "docs", work=root / "work", done=done, lines=lines, calls=calls
    )


def test_two_cell_grid_runs_and_publishes_small_text(grid_run):
    assert [(r.cell.name, r.status) for r in grid_run.done] == [(c, "done") for c in CELLS]
    assert len(grid_run.calls) == 2
    for cell in CELLS:
        folder = grid_run.out / "smoke" / cell
        assert {p.name for p in folder.iterdir()} == PUBLISHED  # no checkpoints, no PNGs
        assert [r["round"] for r in _rows(folder)] == [0, 1, 2]  # 0: eval.at_start
        assert (grid_run.work / "smoke" / cell / "checkpoints").is_dir()
    config = json.loads((grid_run.out / "smoke" / CELLS[1] / "config.json").read_text())
    assert (config["server"]["name"], config["server"]["scope"]) == ("floranna", "layer")
    assert config["partition"]["alpha"] == 0.5 and config["train"]["seed"] == 0
    table = (grid_run.out / "smoke" / "core.md").read_text()
    assert all(f"| {c} | done | 2 |" in table for c in CELLS)
    assert grid_run.lines[0].startswith(f"[1/2] {CELLS[0]}: running")
    assert any(
        line.startswith(f"[2/2] {CELLS[1]}: running") and "left at" in line
        for line in grid_run.lines
    )


def test_rerun_skips_finished_cells(grid_run, monkeypatch):
    files = [p for c in CELLS for p in (grid_run.out / "smoke" / c).iterdir()]
    before = {p: p.stat().st_mtime_ns for p in files}
    calls = _counting_train_run(monkeypatch)
    lines = []
    done = runner.run_grids(
        grid_run.study, ["core"], str(grid_run.out), str(grid_run.work), progress=lines.append
    )
    assert calls == []
    assert [r.status for r in done] == ["skipped", "skipped"]
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert all("skipped" in line for line in lines)


class _Killed(Exception):
    """Stands for a kill after a round's checkpoint."""


def test_interrupted_cell_resumes_and_equals_uninterrupted(grid_run, tmp_path, monkeypatch):
    study = _with_grid(
        grid_run.study,
        "one",
        (("method", ("fedit",)), ("partition.alpha", (0.5,)), ("train.seed", (0,))),
    )
    out, work = str(tmp_path / "docs"), str(tmp_path / "work")
    write = reporting.Reporter.write
    written = []

    def killed_at_round_2(self, row):
        if row["round"] == 2:
            raise _Killed  # rounds 0 (at start) and 1 are written, round 2 is lost
        written.append(row["round"])
        write(self, row)

    with shared_compilation():
        monkeypatch.setattr(reporting.Reporter, "write", killed_at_round_2)
        with pytest.raises(_Killed):
            runner.run_grids(study, ["one"], out, work)
        assert not results.read_cell(os.path.join(out, "smoke", CELLS[0])).finished
        monkeypatch.setattr(
            reporting.Reporter, "write", lambda s, r: (written.append(r["round"]), write(s, r))
        )
        done = runner.run_grids(study, ["one"], out, work)
    assert written == [0, 1, 2]  # the resumed call trained round 2 only
    assert [r.status for r in done] == ["done"]
    resumed = tmp_path / "docs" / "smoke" / CELLS[0]
    assert _rows(resumed) == _rows(grid_run.out / "smoke" / CELLS[0])  # bit-identical on CPU


def _section(text, heading):
    """The part of a report under the heading that starts with ``heading``."""
    return text.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]


def _table_row(text, *first_cells):
    prefix = "| " + " | ".join(first_cells) + " |"
    rows = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, text)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_report_from_committed_rows_alone(grid_run, tmp_path):
    committed = tmp_path / "docs"
    for cell in CELLS:  # only the cell folders: no checkpoints, no workdir, no grid tables
        shutil.copytree(grid_run.out / "smoke" / cell, committed / "smoke" / cell)
    path = tmp_path / "new_folder" / "evidence.md"  # made, before the PNGs are written
    text = report.write_report(grid_run.study, str(committed), str(path), "evidence.py:smoke")
    assert path.read_text() == text
    assert (path.parent / "evidence_curves.png").stat().st_size > 0
    assert (path.parent / "evidence_rho_vs_accuracy.png").stat().st_size > 0

    rows = {c: reporting.read_rows(committed / "smoke" / c / "metrics.jsonl") for c in CELLS}
    by_hand = {}
    for cell, method in zip(CELLS, ("fedit", "floranna_layer"), strict=True):
        got = _table_row(_section(text, "Global and local"), "0.5", method, "1")
        evals = [r for r in rows[cell] if "eval/global/accuracy" in r]
        by_hand[method] = evals[-1]["eval/global/accuracy"]
        rho = np.mean([r["server/rho_rel"] for r in rows[cell] if r["round"]])
        assert evals[0]["round"] == 0 and "eval/local/accuracy" in evals[0]  # at_start
        assert got[3] == f"{evals[0]['eval/global/accuracy']:.4f}"
        assert got[4] == f"{by_hand[method]:.4f}"
        assert got[5] == f"{max(r['eval/global/accuracy'] for r in evals[1:]):.4f}"
        assert got[6] == f"{evals[-1]['eval/local/accuracy']:.4f}"
        assert got[8] == f"{evals[-1]['eval/gap/accuracy']:.4f}"
        assert got[9] == f"{rho:.4f}"
        total = rows[cell][-1]["comm/bytes_up_total"] + rows[cell][-1]["comm/bytes_down_total"]
        assert got[10] == reporting.format_value(total, "bytes")
    diff = by_hand["floranna_layer"] - by_hand["fedit"]
    assert _table_row(_section(text, "Paired"), "0.5", "floranna_layer")[3] == f"{diff:+.4f}"
    assert "grid `core`: 2 of 2 cells finished" in text
    assert "grid `extra`: 0 of 1 cells finished; not yet: ffa_alpha0.5_seed0" in text


def test_report_command_writes_the_study_report(grid_run, tmp_path):
    shutil.copytree(grid_run.out / "smoke", tmp_path / "docs" / "study" / "smoke")
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    config = REPO / "configs" / "studies" / "evidence.py"
    cmd = [sys.executable, "-m", "floranna_jax.study", "report", f"--config={config}:smoke"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "docs" / "study" / "smoke" / "report.md").read_text()  # report.path
    assert "| 0.5 | floranna_layer | 1 |" in text
    assert (tmp_path / "docs" / "study" / "smoke" / "report_curves.png").is_file()


def test_report_from_a_folder_without_the_study_is_one_line_and_writes_nothing(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    config = REPO / "configs" / "studies" / "evidence.py"
    cmd = [sys.executable, "-m", "floranna_jax.study", "report", f"--config={config}:smoke",
           "--out=docs/stduy"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert (
        proc.stderr
        == "error: --out=docs/stduy: no folder docs/stduy/smoke of the study's cells to report\n"
    )
    assert not any(tmp_path.iterdir())


def test_report_keeps_the_handwritten_findings(grid_run, tmp_path):
    path = tmp_path / "evidence.md"
    report.write_report(grid_run.study, str(grid_run.out), str(path), "s.py")
    assert report.FINDINGS_EMPTY in path.read_text()
    mine = "FLoRA-NA: a finding written by a person.\n\nSecond paragraph."
    path.write_text(path.read_text().replace(report.FINDINGS_EMPTY, mine))
    text = report.write_report(grid_run.study, str(grid_run.out), str(path), "s.py")
    assert mine in text and report.FINDINGS_EMPTY not in text


def test_report_needs_no_model_and_no_data(tmp_path):
    study = _study("")
    study.base.model.path = str(tmp_path / "no_model_here")
    study.base.data.dir = str(tmp_path / "no_data_here")
    text = report.write_report(study, str(tmp_path / "docs"), str(tmp_path / "e.md"), "e.py")
    assert "grid `core`: 0 of 30 cells finished" in text
    assert "grid `extra`: 0 of 9 cells finished" in text


def _fake_cell(folder, cell, accuracies, rho_rel, finished=True):
    """A cell folder as the runner publishes it, with the given per-round figures."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(cell.config.to_json())
    with open(folder / "metrics.jsonl", "w") as f:
        for r, (acc, rho) in enumerate(zip(accuracies, rho_rel, strict=True), start=1):
            row = {
                "round": r,
                "server/rho_rel": rho,
                "eval/global/accuracy": acc,
                "eval/local/accuracy": 0.9,
                "eval/gap/accuracy": 0.9 - acc,
                "comm/bytes_up_total": 100.0 * r,
                "comm/bytes_down_total": 100.0 * r,
                "time/server_s": 0.5,
            }
            f.write(json.dumps(row) + "\n")
    if finished:
        (folder / "summary.md").write_text("table\n")


def test_report_numbers_over_seeds_by_hand(tmp_path):
    study = _with_grid(
        _study(),
        "core",
        (
            ("method", ("fedit", "floranna_layer", "svd")),
            ("partition.alpha", (0.5,)),
            ("train.seed", (0, 1, 2)),
        ),
    )
    study.report.grids = ("core",)
    finals = {
        "fedit": [0.50, 0.60, 0.55],
        "floranna_layer": [0.70, 0.58, 0.66],
        "svd": [0.80, 0.75, 0.90],
    }
    rhos = {"fedit": 0.3, "floranna_layer": 0.2, "svd": 0.1}
    for cell in grid.expand(study, "core"):
        m, s = cell.values["method"], cell.values["train.seed"]
        rho = rhos[m] + 0.01 * s
        _fake_cell(tmp_path / "docs" / "smoke" / cell.name, cell, [0.4, finals[m][s]], [rho, rho])
    text = report.write_report(study, str(tmp_path / "docs"), str(tmp_path / "e.md"), "e.py")

    row = _table_row(_section(text, "Global and local"), "0.5", "floranna_layer", "3")
    x = finals["floranna_layer"]
    assert row[4] == f"{statistics.mean(x):.4f} ± {statistics.stdev(x):.4f}"  # ddof = 1
    d = [a - b for a, b in zip(x, finals["fedit"], strict=True)]
    paired = _table_row(_section(text, "Paired"), "0.5", "floranna_layer")
    assert paired[2:8] == [
        "3",
        f"{statistics.mean(d):+.4f}",
        f"{statistics.stdev(d):.4f}",
        f"{min(d):+.4f}",
        f"{max(d):+.4f}",
        "2 of 3",
    ]
    order = _table_row(_section(text, "Is the ordering"), "0.5")
    assert order[1] == "svd, floranna_layer, fedit" == order[2]
    assert order[3] == "-1"  # means: every lower rho_rel goes with a higher accuracy
    stats = pytest.importorskip("scipy.stats")
    pts = [(rhos[m] + 0.01 * s, finals[m][s]) for m in finals for s in range(3)]
    want = stats.spearmanr(*zip(*pts, strict=True)).statistic
    assert order[4] == reporting.format_value(want)


def test_dose_report_groups_by_two_axes_with_intervals_by_hand(tmp_path):
    """configs/studies/drift.py's report shape: groups are (alpha, local steps) pairs, and the
    paired gains carry Student's t intervals, checked against the formula written out."""
    study = _with_grid(
        _study(),
        "drift",
        (
            ("method", ("fedit", "svd")),
            ("client.local_steps", (2, 8)),
            ("partition.alpha", (0.5,)),
            ("train.seed", (0, 1, 2)),
        ),
    )
    study.report = study.report.to_dict() | dict(
        grids=("drift",), paired=("svd",), group_axis=("partition.alpha", "client.local_steps")
    )
    finals = {("fedit", 2): [0.60, 0.62, 0.61], ("svd", 2): [0.61, 0.62, 0.63],
              ("fedit", 8): [0.55, 0.60, 0.50], ("svd", 8): [0.65, 0.64, 0.70]}  # fmt: skip
    rhos = {("fedit", 2): 0.02, ("svd", 2): 0.01, ("fedit", 8): 0.2, ("svd", 8): 0.05}
    for cell in grid.expand(study, "drift"):
        key = (cell.values["method"], cell.values["client.local_steps"])
        acc, rho = finals[key][cell.values["train.seed"]], rhos[key]
        _fake_cell(tmp_path / "docs" / "smoke" / cell.name, cell, [0.5, acc], [rho, rho])
    text = report.write_report(study, str(tmp_path / "docs"), str(tmp_path / "d.md"), "d.py")

    d = np.subtract(finals[("svd", 8)], finals[("fedit", 8)])
    half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 degrees of freedom)
    ci = f"[{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]"
    paired = _table_row(_section(text, "Paired"), "0.5, 8", "svd")
    assert paired[8] == ci and paired[7] == "3 of 3"
    dose = _table_row(_section(text, "Dose-response"), "0.5, 8")
    assert dose[1:4] == ["0.2000 ± 0.0000", "svd", "3"]
    assert dose[4] == reporting.format_value(0.15 / 0.2)  # share of FedIT's rho_rel removed
    assert dose[6] == ci
    assert "| partition.alpha x client.local_steps |" in _section(text, "Dose-response")
    assert (tmp_path / "d_gain_vs_rho_cut.png").stat().st_size > 0


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    x, y = [0.1, 0.2, 0.2, 0.4, 0.0], [3.0, 1.0, 2.0, 2.0, 5.0]
    np.testing.assert_allclose(tables.spearman(x, y), stats.spearmanr(x, y).statistic, rtol=1e-12)
    assert np.isnan(tables.spearman([1, 2], [2, 1])) and np.isnan(tables.spearman([1] * 3, x[:3]))


def test_failed_round_is_kept_and_the_study_goes_on(grid_run, tmp_path, monkeypatch):
    def fake_run(config, workdir):  # fails on FedIT, finishes FLoRA-NA, without training
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json())
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"round": 1, "train/loss": 0.7}) + "\n")
        if config.server.name == "fedit":
            raise RoundError("round 2: non-finite loss on client 1")
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"round": 2, "train/loss": 0.6}) + "\n")
        with open(os.path.join(workdir, "summary.md"), "w") as f:
            f.write("table\n")

    monkeypatch.setattr(train, "run", fake_run)
    out = tmp_path / "docs"
    done = runner.run_grids(grid_run.study, ["core"], str(out), str(tmp_path / "work"))
    assert [r.status for r in done] == ["failed", "done"]
    failed = out / "smoke" / CELLS[0]
    assert (failed / "error.txt").read_text() == "round 2: non-finite loss on client 1\n"
    assert not results.read_cell(str(failed)).finished
    assert "failed: round 2: non-finite loss" in (out / "smoke" / "core.md").read_text()


def _no_output(tmp_path):
    return not (tmp_path / "docs").exists() and not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    "axes, words",
    [
        ((("partition.alpah", (0.5,)),), ["partition.alpah", "did you mean partition.alpha"]),
        ((("partition.alpha", ("half",)),), ["partition.alpha", "'half'", "str", "float"]),
        ((("train.seed", (-1,)),), ["train.seed", "integer >= 0", "-1"]),
        ((("method", ("fedit", "floranna_v2")),), ["method", "floranna_v2", "fedit"]),
        ((("method", ("fedit",)), ("server.scope", ("model",))), ["server.scope", "'fedit'"]),
        ((("train.seed", 0),), ["train.seed", "non-empty list"]),
    ],
)
def test_bad_grid_input_is_one_clear_line(axes, words, tmp_path):
    study = _with_grid(_study(), "bad", axes)
    with pytest.raises(ConfigError) as e:
        runner.run_grids(study, ["bad"], str(tmp_path / "docs"), str(tmp_path / "work"))
    message = str(e.value)
    assert "\n" not in message and message.startswith("grid bad")
    for word in words:
        assert word in message, (word, message)
    assert _no_output(tmp_path)


def test_unknown_grid_is_named_with_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"--grid=cor: no such grid; .*core, extra, lr"):
        runner.run_grids(_study(), ["core", "cor"], str(tmp_path / "docs"), str(tmp_path / "work"))
    assert _no_output(tmp_path)


def test_a_folder_of_another_experiment_is_refused(grid_run, tmp_path):
    out = tmp_path / "docs"
    shutil.copytree(grid_run.out, out)
    study = copy.deepcopy(grid_run.study)
    study.base.client.learning_rate = 1e-3
    before = sorted(str(p) for p in out.rglob("*"))
    with pytest.raises(
        ConfigError,
        match=r"cell fedit_alpha0.5_seed0: config field "
        r"client.learning_rate: .* other values",
    ):
        runner.run_grids(study, ["core"], str(out), str(tmp_path / "work"))
    assert sorted(str(p) for p in out.rglob("*")) == before


def test_published_config_has_no_absolute_paths(monkeypatch, tmp_path):
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")  # commands run from the repository root
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = {
        "model": {"path": str(tmp_path / "home" / "models" / "m")},
        "data": {"dir": str(tmp_path / "repo" / "data" / "glue")},
    }
    assert results.portable(config) == {
        "model": {"path": "~/models/m"},
        "data": {"dir": "data/glue"},
    }
    kept = {"model": {"path": "org/name"}, "data": {"dir": "../shared/data/glue"}}
    assert results.portable(kept) == kept


@pytest.mark.parametrize(
    "args, words",
    [
        (["--grid=cor"], ["--grid=cor", "no such grid", "core, extra, lr"]),
        (["--grid=core", "--config.base.train.num_rounds=abc"], ["num_rounds", "abc"]),
        (
            ["--grid=core", "--config.base.client.learnin_rate=1"],
            ["base.client.learnin_rate", "did you mean base.client.learning_rate"],
        ),
        ([], ["--grid", "core, extra, lr"]),
    ],
)
def test_command_bad_input_is_one_line(args, words, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "floranna_jax.study",
        "--config=configs/studies/evidence.py:smoke",
        f"--out={tmp_path / 'docs'}",
        f"--work={tmp_path / 'work'}",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert _no_output(tmp_path)
