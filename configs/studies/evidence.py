r"""Evidence study: does FLoRA-NA's lower aggregation error buy global accuracy? (issue 10)

    python -m floranna_jax.study --config=configs/studies/evidence.py --grid=lr
    python -m floranna_jax.study --config=configs/studies/evidence.py --grid=core,extra
    python -m floranna_jax.study report --config=configs/studies/evidence.py

The first runs the learning-rate sweep of FedIT, the second the method comparison; each
prints a line per cell ("[3/30] fedit_alpha0.1_seed1: running (2 of 30 done; elapsed 0:21:40;
~2:58:05 left at 0:06:10 per cell)"), then the grid's table. Cells land in
docs/study/evidence/<cell>/ (metrics.jsonl, config.json, summary.md: commit them) and their
checkpoints in runs/study/evidence/<cell>/; run the command again and it skips finished
cells and resumes the interrupted one. The third regenerates docs/evidence.md and its PNGs
from the committed rows alone.

Base: all-MiniLM-L6-v2 (shared/tools/fetch_models.sh) on SST-2 (../shared/data/glue), sized
for a 2-core CPU: 10 clients, 5 per round, 10 local steps of batch 16, max length 64,
20 rounds, evaluation every 5 (local: 128 held-out rows per client), and every round the
same uploads aggregated by FedIT, FLoRA-NA per layer and shared, and SVD
(``server.compare``). Grids:

    lr     fedit at Dirichlet 0.5, client.learning_rate in 3e-4 1e-3 3e-3 1e-2, seed 0   4 cells
    core   fedit floranna_layer floranna_model svd fedex x alpha 0.1 0.5 x seed 0 1 2   30 cells
    extra  ffa fedsa flora x alpha 0.5 x seed 0 1 2                                       9 cells

``base.client.learning_rate`` is the rate the core and extra grids use: set it from the lr
grid's table (``--config.base.client.learning_rate=...`` for a trial). With ``:smoke`` every
grid shrinks to a few cells of configs/glue.py:smoke (seconds each, no files).
"""

import pathlib

import ml_collections

from floranna_jax import config_check, server

# Labelled values of the "method" axis, each the config fields it sets: every estimator by its
# name, and FLoRA-NA's scopes by their server.COMPARISONS labels (floranna_layer, ..._model).
METHODS = {name: {"server": {"name": name}} for name in server.ESTIMATORS} | {
    label: {"server": {"name": name, **hparams}}
    for label, (name, hparams) in server.COMPARISONS.items()
}
CORE = ("fedit", "floranna_layer", "floranna_model", "svd", "fedex")


def _base(smoke: bool):
    c = config_check.load_file(
        pathlib.Path(__file__).parents[1] / "glue.py", "smoke" if smoke else None
    )
    c.server.compare = ("fedit", "floranna_layer", "floranna_model", "svd")
    c.eval.at_start = True  # the untrained model's scores (round 0): where learning starts
    if smoke:
        return c
    c.model.path = "~/.cache/floranna/models/all-MiniLM-L6-v2"
    c.data.dir = "../shared/data/glue"  # relative to the repository root, where it runs
    c.data.max_length = 64
    c.partition.num_clients, c.partition.alpha = 10, 0.5
    # Chosen from the lr grid: check its table (docs/evidence.md) before the core grid.
    c.client.learning_rate = 1e-3
    c.client.local_steps, c.client.batch_size = 10, 16
    c.server.scope = "layer"
    c.train.num_rounds, c.train.clients_per_round = 20, 5
    c.train.clients_per_chunk = 2  # fastest on a 2-core CPU (docs/clients_benchmark.md)
    c.ckpt.every_rounds, c.ckpt.keep = 1, 2  # a killed cell loses at most one round
    c.eval.every_rounds, c.eval.max_local_examples = 5, 128
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The study, or with ``arg="smoke"`` the same grids shrunk to seconds-long cells."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/studies/evidence.py: unknown arg {arg!r}; valid: '' or 'smoke'")
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()
    c.name = "smoke" if smoke else "evidence"  # results in <out>/<name>/<cell>/
    c.base = _base(smoke)  # the experiment every cell starts from (configs/glue.py)
    c.variants = {"method": METHODS}  # labelled axes: label -> fields it sets
    seeds = (0,) if smoke else (0, 1, 2)
    rates = (5e-2, 1e-2) if smoke else (3e-4, 1e-3, 3e-3, 1e-2)
    c.grids = {
        # FedIT's learning rate: the rate at which the global model leaves the majority class.
        "lr": {
            "axes": (
                ("method", ("fedit",)),
                ("partition.alpha", (0.5,)),
                ("client.learning_rate", rates),
                ("train.seed", (0,)),
            )
        },
        # The comparison: every core method at two non-IID strengths over seeds.
        "core": {
            "axes": (
                ("method", CORE[:2] if smoke else CORE),
                ("partition.alpha", (0.5,) if smoke else (0.1, 0.5)),
                ("train.seed", seeds),
            )
        },
        # The other baselines at one non-IID strength.
        "extra": {
            "axes": (
                ("method", ("ffa",) if smoke else ("ffa", "fedsa", "flora")),
                ("partition.alpha", (0.5,)),
                ("train.seed", seeds),
            )
        },
    }
    c.report = dict(
        title="Evidence: does FLoRA-NA's lower aggregation error buy global accuracy?",
        grids=("core", "extra"),  # grids whose cells the method tables compare
        method_axis="method",  # the axis that names a cell's method
        group_axis="partition.alpha",  # one table block per value of this axis
        seed_axis="train.seed",  # runs paired across methods by this axis
        baseline="fedit",  # the paired differences subtract this method
        paired=("floranna_layer", "floranna_model", "svd", "fedex"),  # ... from these
        lr_grid="lr",  # grid of the learning-rate table ("" = none)
        lr_axis="client.learning_rate",  # its rate axis
        # The report (its PNGs beside it), relative to the repository root, where it runs.
        path="docs/study/smoke/report.md" if smoke else "docs/evidence.md",
    )
    return c
