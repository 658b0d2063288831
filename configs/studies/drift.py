r"""Dose-response study: does a more accurate aggregate help more as clients drift apart?
(issue 20)

    python -m floranna_jax.study --config=configs/studies/drift.py --grid=pilot
    python -m floranna_jax.study --config=configs/studies/drift.py --grid=drift
    python -m floranna_jax.study report --config=configs/studies/drift.py

The paper's mechanism predicts a dose-response: the further the clients' adapters drift apart
in a round, the larger FedIT's aggregation error (rho) and the more an accurate aggregate
should buy. Drift grows with the local steps of a round and with label heterogeneity, so the
``drift`` grid crosses both (docs/drift_preregistration.md states the question and the test,
written before the grid ran):

    pilot  fedit, IID, client.learning_rate 1e-3, seeds 0 1 2, 30 rounds             3 cells
    drift  fedit floranna_layer svd fedex x local steps 2 10 40
           x IID (label iid), Dirichlet 0.1 (label dirichlet01)
           x seeds 0 1 2                                                            72 cells

Base: the evidence study's (configs/studies/evidence.py; all-MiniLM-L6-v2 on SST-2, 10
clients, 5 per round, batch 16, max length 64, every round's uploads also aggregated by
FedIT, FLoRA-NA per layer and shared, and SVD), with the rounds and learning rate the pilot
chose (docs/drift_pilot.md). Cells land in docs/study/drift/<cell>/ (commit them) and resume
as the evidence study's do. With ``:smoke`` the grids shrink to seconds-long cells.
"""

import pathlib

import ml_collections

from floranna_jax import config_check

METHODS = ("fedit", "floranna_layer", "svd", "fedex")
# Label heterogeneity: IID shards, and the evidence study's strongest non-IID split.
SPLITS = {
    "iid": {"partition": {"scheme": "iid"}},
    "dirichlet01": {"partition": {"scheme": "dirichlet", "alpha": 0.1}},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The study, or with ``arg="smoke"`` its grids on configs/glue.py:smoke."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/studies/drift.py: unknown arg {arg!r}; valid: '' or 'smoke'")
    smoke = arg == "smoke"
    evidence = config_check.load_file(pathlib.Path(__file__).parent / "evidence.py", arg)
    c = ml_collections.ConfigDict()
    c.name = "drift_smoke" if smoke else "drift"  # results in <out>/<name>/<cell>/
    c.base = evidence.base
    c.base.server.compare = ("fedit", "floranna_layer", "floranna_model", "svd")
    if not smoke:
        c.base.train.num_rounds = 20  # the pilot's choice (docs/drift_preregistration.md)
        c.base.eval.every_rounds = 5
    c.variants = {"method": evidence.variants.method, "split": SPLITS}
    seeds = (0,) if smoke else (0, 1, 2)
    c.grids = {
        # FedIT on IID clients at the evidence study's best rate (its lr grid): does every
        # seed clearly learn, and by which round?
        "pilot": {
            "axes": (
                ("method", ("fedit",)),
                ("split", ("iid",)),
                ("client.learning_rate", (5e-2,) if smoke else (1e-3,)),
                ("train.seed", seeds),
            ),
            "fixed": {"train": {"num_rounds": 2 if smoke else 30}},
        },
        # The dose-response grid: drift (local steps) x heterogeneity x method x seed.
        "drift": {
            "axes": (
                ("method", METHODS[:2] if smoke else METHODS),
                ("client.local_steps", (1, 2) if smoke else (2, 10, 40)),
                ("split", ("iid",) if smoke else ("iid", "dirichlet01")),
                ("train.seed", seeds),
            )
        },
    }
    c.report = evidence.report.to_dict() | dict(
        title="Dose-response: where does aggregation error matter?",
        grids=("drift",),
        paired=("floranna_layer", "svd", "fedex"),
        group_axis=("split", "client.local_steps"),  # one block per split and drift level
        lr_grid="pilot",
        path="docs/study/drift_smoke/report.md" if smoke else "docs/drift.md",
    )
    return c
