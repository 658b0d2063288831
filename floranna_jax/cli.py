"""What every command (launch.py, generate, export, study) does first."""

from __future__ import annotations

from absl import app, flags, logging


def begin(argv: list[str], *, positional: bool = False) -> None:
    """Refuse positional arguments unless the command takes some (``positional``): a flag
    typed without its ``--`` would be dropped silently. Then keep absl's log to warnings
    unless ``--verbosity`` was given: Orbax logs every save and restore at INFO."""
    if not positional and len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
