"""The server side of a Flower federation: ``train.run`` with clients reached over Flower.

The ServerApp runs the very loop of an in-process run (:mod:`floranna_jax.train`): the
same rounds, metrics rows, evaluation, summary, plots, checkpoints, resume and same-run
check, with the run's clients reached through :func:`floranna_jax.flower.transport.make`
instead of in this process. The run config (:mod:`runconfig`) gives the experiment, the
workdir and the fault policy. The server holds the config's validation split for its
global evaluation (``eval.global_split``; False: a server without data); each client
evaluates on its own held-out rows and sends back only its statistics.
"""

from __future__ import annotations

import functools

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import http_grid

from floranna_jax import train
from floranna_jax.flower import runconfig, transport, waits

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Connect the clients, then run ``train.num_rounds`` rounds (resuming a checkpoint)."""
    waits.check_version()
    # A reply is listed before its node has pushed its arrays: retry soon, not after 1 s.
    waits.quicken_pulls(http_grid, "pull_objects")
    opts = runconfig.options(context.run_config)
    config = runconfig.experiment(context.run_config)
    train.run(config, opts.workdir, functools.partial(transport.make, grid, config, opts))
