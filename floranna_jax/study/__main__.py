r"""The study command: run grids of a study config, or regenerate its report.

    python -m floranna_jax.study --config=configs/studies/evidence.py --grid=core
    python -m floranna_jax.study report --config=configs/studies/evidence.py

``run`` (the default) trains every unfinished cell of the grids (comma-separated) through
``train.run``, checkpoints in ``--work/<study>/<cell>/`` (scratch, large) and keeps each
cell's small text in ``--out/<study>/<cell>/`` (to commit); interrupted, it resumes where it
stopped. ``report`` writes the study's ``report.path`` (or ``--report``) and its PNGs from
``--out`` alone. Any field can be overridden (``--config.base.client.learning_rate=1e-3``).
A bad input (an unknown grid or field, a value of the wrong type, a bad value) is one
``error: ...`` line on stderr and exit code 2, before anything runs; a cell whose round
fails is kept with its error and the study goes on, then exits with code 1.
"""

import difflib
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from floranna_jax import cli, config_check
from floranna_jax.errors import ConfigError, first_line
from floranna_jax.study import grid as grid_lib
from floranna_jax.study import report, runner

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/studies/<study>.py[:arg]", lock_config=True
)
_GRID = flags.DEFINE_list("grid", None, "grids to run, comma-separated (run)")
_OUT = flags.DEFINE_string("out", "docs/study", "committed results: <out>/<study>/<cell>/")
_WORK = flags.DEFINE_string("work", "runs/study", "scratch checkpoints: <work>/<study>/<cell>/")
_REPORT = flags.DEFINE_string("report", None, "the report file (default: report.path)")
_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.]+)(=.*)?$")


def _fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def _unknown_field(argv: list[str]) -> str | None:
    """The first ``--config.<path>`` override that names no field, with the nearest one."""
    config = config_check.config_of_argv(argv)
    if config is None:
        return None
    fields = list(grid_lib.flatten(config.to_dict()))
    for arg in argv[1:]:
        m = _OVERRIDE.match(arg)
        if m and m.group(1) not in fields:
            near = difflib.get_close_matches(m.group(1), fields, n=1, cutoff=0.6)
            return f"--config.{m.group(1)}: no such field" + (
                f"; did you mean {near[0]}?" if near else ""
            )
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with its failures as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # e.g. "flag --config.base.train.seed=x: invalid literal ..."
        lines = [
            re.sub(r"^flag ", "", line.strip()) for line in str(e).splitlines() if line.strip()
        ]
        # A failing config file comes with its traceback: its last line says what failed.
        where = lines[0].split(": ")[0] + ": " if len(lines) > 1 else ""
        _fail(_unknown_field(argv) or where + lines[-1])
    except OSError as e:  # the config file failed to load
        _fail(f"--config: {str(e).strip().splitlines()[-1].strip()}")
    except (AttributeError, KeyError) as e:  # a field the locked config does not have
        _fail(_unknown_field(argv) or f"bad override: {first_line(e)}")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv):
    command = argv[1:] or ["run"]
    if command not in (["run"], ["report"]):
        raise app.UsageError(f"unknown command {' '.join(command)!r}; commands: run, report")
    cli.begin(argv, positional=True)  # the command: run or report
    study, source = _CONFIG.value, flags.FLAGS["config"].config_filename
    try:
        study.name  # noqa: B018  (config_flags defers a failed file load to the first access)
    except OSError as e:
        _fail(f"--config: {str(e).strip().splitlines()[-1].strip()}")
    try:
        if command == ["report"]:
            rows = os.path.join(_OUT.value, study.name)
            if not os.path.isdir(rows):  # a mistyped --out would write an empty report
                _fail(f"--out={_OUT.value}: no folder {rows} of the study's cells to report")
            path = _REPORT.value or study.report.path
            report.write_report(study, _OUT.value, path, source)
            print(f"wrote {path}")
            return
        if not _GRID.value:
            _fail(f"--grid: which grid to run? the study's grids: {', '.join(study.grids)}")
        results = runner.run_grids(
            study, _GRID.value, _OUT.value, _WORK.value, progress=_progress, source=source
        )
    except ConfigError as e:
        _fail(str(e))
    for grid in _GRID.value:
        print(runner.summary(study, grid, _OUT.value, source))
    failed = [r for r in results if r.status == "failed"]
    if failed:  # kept in their folders (error.txt); a re-run tries them again
        sys.stderr.write(
            f"{len(failed)} cell(s) failed: {', '.join(r.cell.name for r in failed)}\n"
        )
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_flags)
