"""FFA-LoRA: ``A`` frozen at its shared random init, only ``B`` is trained and averaged.

Update rule (METHOD.md; baseline in arXiv 2509.26399):

    A = A_0 (never sent),      B = sum_u p_u B_u

With a shared ``A`` the average is exact: ``sum_u p_u B_u A_0 = B A_0``. The estimator's
``A`` is the p-weighted average of the clients' ``A``, which *is* ``A_0`` when the clients
share it, as FFA-LoRA requires; if they do not, ``rho`` reports the resulting error
honestly instead of hiding it.

Method state: ``{"A": {layer: [r, d_in]}}``, the shared init. Clients never train ``A``
(``frozen``), and the next global adapter takes ``A`` from the state, so it stays
bit-identical for the whole run; in a real federation (``floranna_jax.flower``) it is
``private``: each client holds it from the model's init and never sends it.
Communication: only ``B``, ``r d_out`` numbers per layer each way.
"""

from __future__ import annotations

from floranna_jax.server import common
from floranna_jax.server.fedit import average
from floranna_jax.server.method import Method, make_method


def ffa_bytes(shapes: common.Shapes, U: int) -> tuple[int, int]:
    n = common.factor_bytes(shapes, lambda do, di, r: r * do)
    return n, n


def init(lora: common.Lora, num_clients: int) -> dict:
    del num_clients
    return {"A": {n: f["A"] for n, f in lora.items()}}


def frozen(path: tuple[str, ...]) -> bool:
    return path[0] == "lora" and path[-1] == "A"


def apply(state, aggregate: common.Aggregate, client_ids, uploads):
    """The averaged ``B`` over the shared ``A`` of the state (``A`` is never sent)."""
    del client_ids, uploads
    lora = {n: {"A": state["A"][n], "B": f["B"]} for n, f in aggregate.lora.items()}
    return lora, state


def make_ffa() -> Method:
    """FFA-LoRA: average ``B`` over a frozen shared ``A``. No hyperparameters."""
    return make_method(average, ffa_bytes, init=init, frozen=frozen, apply=apply,
                       private=frozen)  # fmt: skip
