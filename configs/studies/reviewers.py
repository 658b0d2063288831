r"""The runs of docs/reviewers.md (was benchmarks/reviewers.py), as a study.

    python -m floranna_jax.study --config=configs/studies/reviewers.py --grid=moderate,strong
    python -m floranna_jax.study report --config=configs/studies/reviewers.py

trains FedIT, FLoRA-NA (per-layer weights), SVD and FedEx-LoRA at Dirichlet alpha 0.5
(grid ``moderate``), and FedIT and FLoRA-NA at alpha 0.1 (grid ``strong``), one seed each
(about 40 minutes on a 2-core CPU), then writes docs/study/reviewers/report.md: the tables
and plots of docs/reviewers.md (global accuracy last and best, local accuracy and the gap,
the run's own rho_rel, the rho_rel of FedIT, FLoRA-NA per layer and shared, and SVD on the
same uploads, bytes) from the cells in docs/study/reviewers/.

The setting is the evidence study's (configs/studies/evidence.py) at docs/reviewers.md's
budget: client learning rate 5e-3, 10 rounds, evaluation every 2 rounds, up to 256
held-out rows per client in the local evaluation.
"""

import pathlib

import ml_collections

from floranna_jax import config_check


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The study, or with ``arg="smoke"`` its grids on configs/glue.py:smoke."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/studies/reviewers.py: unknown arg {arg!r}; valid: '' or 'smoke'")
    evidence = config_check.load_file(pathlib.Path(__file__).parent / "evidence.py", arg)
    c = ml_collections.ConfigDict()
    c.name = "reviewers_smoke" if arg else "reviewers"  # results in <out>/<name>/<cell>/
    c.base = evidence.base  # the experiment every cell starts from
    if not arg:
        c.base.client.learning_rate = 5e-3
        c.base.train.num_rounds = 10
        c.base.eval.every_rounds, c.base.eval.max_local_examples = 2, 256
    c.variants = evidence.variants  # method label -> server fields
    c.grids = {
        "moderate": {"axes": (("method", ("fedit", "floranna_layer", "svd", "fedex")),
                              ("partition.alpha", (0.5,)), ("train.seed", (0,)))},
        "strong": {"axes": (("method", ("fedit", "floranna_layer")),
                            ("partition.alpha", (0.1,)), ("train.seed", (0,)))},
    }  # fmt: skip
    c.report = dict(evidence.report)
    c.report.title = "The reviewers' questions, measured (the runs of docs/reviewers.md)"
    c.report.grids = ("moderate", "strong")
    c.report.paired = ("floranna_layer", "svd", "fedex")
    c.report.lr_grid = ""  # no learning-rate sweep here
    c.report.path = f"docs/study/{c.name}/report.md"
    return c
