r"""Entry point: ``python launch.py --config=configs/glue.py:smoke --workdir=/tmp/floranna_smoke``.

Trains the config (resuming from ``--workdir`` if it holds a checkpoint), then prints the
run's summary table. Override any field: ``--config.server.name=fedit``. Every bad input
(a misspelled or mistyped override, a bad value, a malformed data file, a workdir that is
a file, an unusable checkpoint) is one ``error: ...`` line on stderr and exit code 2,
before anything is compiled and with the workdir untouched. A round that produces NaN or
Inf is one ``error: round N: ...`` line and exit code 1; its state is not checkpointed. A
write that fails mid-run (a full disk) is one ``error: cannot write ...`` line and exit
code 1; the same command then resumes from the last checkpoint.

``--plan=DEVICE`` (``h100-80gb``, ``8xh100-80gb``, ...; :mod:`floranna_jax.plan`) trains
nothing: it compiles the config's programs ahead of time with an abstract base (no weight
is read), prints what they need per device and ends with ``plan: fits ...`` (exit 0) or
``plan: does not fit: ...`` (exit 2). On an accelerator every run makes that check first,
before any weight loads, and stops with that line instead of an out-of-memory error.
"""

import os
import re
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from floranna_jax import cli, config_check, plan, train
from floranna_jax.errors import ConfigError, RoundError, WriteError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<task>.py[:arg]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder (default ./runs/<method>_<task>)")
_PLAN = flags.DEFINE_string(
    "plan", None, "print what the config needs on DEVICE and exit: one of "
    f"{', '.join(plan.DEVICES)}, optionally with a count (8xh100-80gb)"
)  # fmt: skip
_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_]+\.[A-Za-z0-9_.]+)(=.*)?$")


def _fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(code)


def _stop(message: str, code: int = 2) -> None:
    """:func:`_fail` once a run has started. One process ends at once: Orbax's and
    asyncio's threads would otherwise print a failed restore's tracebacks while Python shuts
    down, after the one line; nothing is left to write (the run's files were closed on the
    way here). Several processes exit normally, through jax.distributed's shutdown."""
    if jax.process_count() > 1:
        _fail(message, code)
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    os._exit(code)


def _config_unreadable(e: OSError) -> None:
    """config_flags lists the paths it tried; the last line says why the file failed."""
    _fail(f"--config: {str(e).strip().splitlines()[-1].strip()}")


def _overrides(argv: list[str]) -> list[str]:
    """The ``section.field`` paths that ``--config.section.field=value`` arguments set."""
    return [m.group(1) for a in argv[1:] if (m := _OVERRIDE.match(a))]


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with its failures as one line: a misspelled field names the
    nearest valid one, a value of the wrong type names the field and the value."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # e.g. "flag --config.train.num_rounds=abc: invalid literal ..."
        _check_overrides(argv)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        where = re.sub(r"^flag ", "", lines[0]).split(": ")[0]
        # A failing config file comes with its traceback: its last line says what failed.
        _fail(f"{where}: {lines[-1]}" if len(lines) > 1 else re.sub(r"^flag ", "", lines[0]))
    except OSError as e:  # the config file failed to load, and an override needed it
        _config_unreadable(e)
    except (AttributeError, KeyError) as e:  # a field the locked config does not have
        _check_overrides(argv)
        _fail(f"bad override: {str(e).splitlines()[0]}")


def _check_overrides(argv: list[str]) -> None:
    config = flags.FLAGS["config"].value or config_check.config_of_argv(argv)
    if config is None:
        return
    try:
        config_check.check_overrides(config, _overrides(argv))
    except ConfigError as e:
        _fail(str(e))
    except OSError:  # the file itself failed to load: main names that
        return


def make_plan(config, text: str) -> None:
    """``--plan=text``: print the plan and exit 0 (fits) or 2 (does not fit)."""
    try:
        device, count = plan.parse(text)
        if count > 1:  # a CPU plan compiles for that many devices; set before any device use
            jax.config.update("jax_num_cpu_devices", count)
        report = plan.make(config, device, count)
    except ConfigError as e:
        _fail(str(e))
    print("\n".join(report.lines))
    sys.exit(0 if report.fits else 2)


def check_fits(config) -> None:
    """On an accelerator, the plan's check before any weight loads: a program that does not
    fit stops the run with the plan's one line (exit 2) instead of an out-of-memory error."""
    if jax.default_backend() == "cpu":
        return
    try:
        plan.check(config)
    except plan.DoesNotFit as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(2)


def main(argv):
    cli.begin(argv)
    config = _CONFIG.value
    try:  # config_flags defers a failed file load to the first access
        method, task = config.server.name, config.data.task
    except OSError as e:
        _config_unreadable(e)
    _check_overrides(sys.argv)
    if _PLAN.value:
        make_plan(config, _PLAN.value)
    workdir = _WORKDIR.value or os.path.join("runs", f"{method}_{task}")
    try:
        config_check.start_processes(config)  # before anything touches a device
        check_fits(config)
        summary = train.run(config, workdir)
    except ConfigError as e:
        _stop(str(e))
    except (RoundError, WriteError) as e:
        _stop(str(e), code=1)
    print(summary)
    print(f"\nworkdir: {os.path.abspath(workdir)}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_flags)
