"""Studies: grids of experiments over a base config, run resumably and reported from rows.

    python -m floranna_jax.study --config=configs/studies/evidence.py --grid=core
    python -m floranna_jax.study report --config=configs/studies/evidence.py

Modules: ``grid`` (a study config's grids -> named, validated cells), ``runner`` (every
cell through ``train.run``: skip finished, resume interrupted, publish small text),
``results`` (a committed cell folder: rows, config, figures), ``report`` (docs/evidence.md
and its plots from the committed rows alone) and ``__main__`` (the command).
"""

from floranna_jax.study.grid import Cell, expand
from floranna_jax.study.report import write_report
from floranna_jax.study.runner import CellResult, run_grids

__all__ = ["Cell", "CellResult", "expand", "run_grids", "write_report"]
