"""FedSA-LoRA: only ``A`` is shared; each client keeps its own ``B`` (personalized).

Update rule (METHOD.md; baseline in arXiv 2509.26399):

    A = sum_u p_u A_u  (broadcast),      B_u stays on client u

There is no single global model in the method itself; for *global* evaluation the
global adapter holds ``A`` and the weighted average ``B = sum_u p_u B_u`` (so ``rho`` is
FedIT's). Method state: ``{"B": {layer: [N, d_out, r]}}``, every client's own ``B``
(the initial global ``B`` until it first trains: zero, or an imported adapter's): a
sampled client starts from the global ``A`` and its own ``B``, and its trained ``B`` is
stored after the round. Communication: only ``A``, ``r d_in`` numbers per layer each way:
in a real federation (``floranna_jax.flower``) ``B`` is ``private`` and never leaves its
client, so the server's global adapter keeps the initial ``B`` there.
"""

from __future__ import annotations

import jax.numpy as jnp

from floranna_jax.server import common
from floranna_jax.server.fedit import average
from floranna_jax.server.method import Method, broadcast, make_method


def fedsa_bytes(shapes: common.Shapes, U: int) -> tuple[int, int]:
    n = common.factor_bytes(shapes, lambda do, di, r: r * di)
    return n, n


def init(lora: common.Lora, num_clients: int) -> dict:
    """Every client's ``B`` starts as the initial global one (zero, or an imported one)."""
    return {"B": {n: jnp.broadcast_to(f["B"], (num_clients, *f["B"].shape))
                  for n, f in lora.items()}}  # fmt: skip


def client_start(lora, state, client_ids, key) -> common.Clients:
    """The global ``A`` and each sampled client's own ``B``."""
    del key
    start = broadcast(lora, len(client_ids))
    return {n: {"A": f["A"], "B": state["B"][n][client_ids]} for n, f in start.items()}


def apply(state, aggregate: common.Aggregate, client_ids, uploads):
    """The averaged adapter for global evaluation; the trained ``B`` kept per client."""
    personal = {n: B.at[client_ids].set(uploads[n]["B"]) for n, B in state["B"].items()}
    return aggregate.lora, {"B": personal}


def private(path: tuple[str, ...]) -> bool:
    return path[0] == "lora" and path[-1] == "B"


def make_fedsa() -> Method:
    """FedSA-LoRA: average ``A``; personal ``B`` per client. No hyperparameters."""
    return make_method(average, fedsa_bytes, init=init, client_start=client_start, apply=apply,
                       private=private)  # fmt: skip
