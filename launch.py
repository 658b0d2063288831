r"""Entry point: ``python launch.py --config=configs/glue.py:smoke --workdir=/tmp/floranna_smoke``.

Trains the config (resuming from ``--workdir`` if it holds a checkpoint), then prints the
run's summary table. A bad config value is one line on stderr and exit code 2, before
anything is built or compiled. Override any field: ``--config.server.name=fedit``.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from floranna_jax import config_check, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<task>.py[:arg]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder (default ./runs/<method>_<task>)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", f"{config.server.name}_{config.data.task}")
    try:
        summary = train.run(config, workdir)
    except config_check.ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    print(summary)
    print(f"\nworkdir: {os.path.abspath(workdir)}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
