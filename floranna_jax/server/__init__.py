"""Server side of every federated method of METHOD.md, chosen by name.

    ESTIMATORS[name](**hparams) -> Method                 # pure functions (method.py)
    aggregate(name, clients, weights, **hparams) -> Aggregate   # validated, jitted
    build(name, **hparams) -> Server                      # jitted once per run (rounds.py)

``clients``: layer -> {"A": [U, r, d_in], "B": [U, d_out, r]} (float32, jax or numpy);
``weights``: ``[U]`` non-negative, normalized inside (``p_u``). The result holds the
global factors ``lora``, the dense ``merge`` of flora/fedex (``{}`` otherwise, in ``B @ A``
units) and ``metrics``: rho, rho_rel, rho_svd, rho_svd_rel, rho_per_layer, bytes_up,
bytes_down, plus estimator-specific entries.

Modules: ``method`` (the :class:`Method` protocol and its stateless defaults),
``registry`` (names, building, comparisons), ``common`` (types, validation, layer
groups, bytes), ``factored`` (the Gram-form linear algebra), ``merging`` (the dense
merges of flora and fedex), and one module per method.

To add a method: one module with ``make_<name>(**hparams) -> Method`` (see ``fedit.py``;
``method.make_method`` fills in the stateless parts), one entry in
``registry.ESTIMATORS``, one test file.
"""

from floranna_jax.server.common import Aggregate
from floranna_jax.server.method import Method
from floranna_jax.server.registry import (
    COMPARISONS,
    ESTIMATORS,
    Server,
    aggregate,
    build,
    check_comparisons,
    make,
    make_compare,
    section,
    serve,
)

__all__ = [
    "COMPARISONS",
    "ESTIMATORS",
    "Aggregate",
    "Method",
    "Server",
    "aggregate",
    "build",
    "check_comparisons",
    "make",
    "make_compare",
    "section",
    "serve",
]
