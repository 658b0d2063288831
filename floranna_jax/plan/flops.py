"""FLOPs of a traced program, counted on its jaxpr: ``count(jaxpr, loop_trips=1)``.

XLA's ``cost_analysis()`` counts a loop body once, whatever its trip count, and a client
step is loops inside loops (local steps, layers, loss chunks), so it reads 100x low. Here
every ``dot_general`` counts ``2 * prod(output shape) * prod(contracted sizes)``
(multiply and add), inside every sub-program: a ``scan`` body times its length, a
``while`` body times ``loop_trips`` (its count is only known at run time: decoding passes
its token budget), the costliest branch of a ``cond``. Only matrix products count, as
in the model FLOPs of a utilization figure; what autodiff and remat add is in the jaxpr,
so it counts. FLOPs are those of the whole program, before it is split over devices.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core


def _dot_flops(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _subjaxprs(value):
    """The jaxprs held in one equation parameter (a jaxpr, or a tuple of them)."""
    if isinstance(value, core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, core.Jaxpr):
        return [value]
    if isinstance(value, tuple | list):
        return [j for v in value for j in _subjaxprs(v)]
    return []


def count(jaxpr, loop_trips: int = 1) -> int:
    """Matrix-product FLOPs of ``jaxpr`` (a ``Jaxpr`` or ``ClosedJaxpr``), loops unrolled
    as the module says."""
    if isinstance(jaxpr, core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
            continue
        if name == "cond":
            total += max(count(b, loop_trips) for b in eqn.params["branches"])
            continue
        if name == "while":
            total += loop_trips * count(eqn.params["body_jaxpr"], loop_trips)
            continue
        inner = sum(count(j, loop_trips) for v in eqn.params.values() for j in _subjaxprs(v))
        total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def of(fn, *args, loop_trips: int = 1) -> int:
    """FLOPs of the jitted ``fn`` at ``args`` (arrays or ``jax.ShapeDtypeStruct``)."""
    return count(jax.make_jaxpr(fn)(*args), loop_trips)
