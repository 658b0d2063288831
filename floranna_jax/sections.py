"""The run config's sections that every task shares, with their defaults.

    c.lora = sections.lora(targets=("query", "value"))
    c.client = sections.client(micro_batch_size=16)  # a default changed for this task

A ``configs/*.py`` builds these sections here and writes only what its task changes, so a
default is written once. Each field is commented where it is defined. Three components
define their section next to the code that checks it: ``server.section()``,
``privacy.section()`` and ``distributed.section()``. An unknown field given here is an
error, as on the command line. :func:`smoke` makes the changes every config's seconds-long
version shares.
"""

from __future__ import annotations

from typing import Any

import ml_collections


def _section(name: str, defaults: dict[str, Any], changes: dict[str, Any]):
    unknown = sorted(set(changes) - set(defaults))
    if unknown:
        valid = list(defaults)
        raise ValueError(f"config section {name}: unknown fields {unknown}; valid: {valid}")
    return ml_collections.ConfigDict({**defaults, **changes})


def lora(targets: tuple[str, ...], **changes: Any) -> ml_collections.ConfigDict:
    """The ``lora`` section: rank 16, alpha 16, dropout 0.05 on ``targets``."""
    defaults = dict(
        rank=16,  # r, adapter rank
        alpha=16.0,  # LoRA alpha; scale s = alpha / r (alpha / sqrt(r) with rslora)
        rslora=False,  # rank-stabilized scale
        targets=tuple(targets),  # names of the adapted linear layers
        dropout=0.05,  # dropout probability inside the adapter, training only
        init_from="",  # a PEFT LoRA folder to start from ("": fresh); r, alpha, targets match
    )
    return _section("lora", defaults, changes)


def partition(**changes: Any) -> ml_collections.ConfigDict:
    """The ``partition`` section: 10 clients, a Dirichlet(0.5) label split."""
    defaults = dict(
        scheme="dirichlet",  # client split: "dirichlet", "iid", "quantity" or "k_classes"
        num_clients=10,  # total clients
        alpha=0.5,  # Dirichlet concentration (smaller = more non-IID); quantity skew too
        classes_per_client=2,  # k_classes only: labels held by each client
        holdout_fraction=0.1,  # share of each client's data kept for local evaluation
    )
    return _section("partition", defaults, changes)


def client(**changes: Any) -> ml_collections.ConfigDict:
    """The ``client`` section: METHOD.md's reference, 10 AdamW steps of batch 128 at 2e-2."""
    defaults = dict(
        optimizer="adamw",  # local optimizer name (clients.make_optimizer)
        learning_rate=2e-2,  # local learning rate
        weight_decay=0.0,  # decoupled weight decay
        # Optimizer steps per client per round (S). A client holding fewer than S * b
        # examples goes on with a fresh shuffle of its data (epochs): no masked steps.
        local_steps=10,
        batch_size=128,  # examples per local step (b)
        # Examples per micro-batch, a divisor of b (0: the whole batch); the step's gradient
        # is their sum, so the training is the same.
        micro_batch_size=0,
        persistent_opt_state=False,  # keep each client's optimizer state across rounds
    )
    return _section("client", defaults, changes)


def train(**changes: Any) -> ml_collections.ConfigDict:
    """The ``train`` section: 100 rounds of 10 sampled clients, vmapped 2 at a time."""
    defaults = dict(
        seed=0,  # root of all randomness (sampling, data order, init, dropout)
        num_rounds=100,  # federated rounds
        clients_per_round=10,  # clients sampled per round (U)
        client_mode="vmap",  # how clients run: "vmap" (stacked) or "loop"
        shard_clients=False,  # shard the client axis over devices when more than one
        model_shards=1,  # >1: the frozen base split over that many devices, FSDP (fsdp.py)
        # vmap: clients trained at once (0 = all). Activations grow with it: 10 encoder
        # clients of batch 128 would not fit a 24 GB machine; 2 is also the fastest on a
        # 2-core CPU.
        clients_per_chunk=2,
        # A "clients" bar counts the local steps (a host callback in the clients' program).
        # False: no bar, and JAX's persistent compilation cache can keep that program.
        step_progress=True,
    )
    return _section("train", defaults, changes)


def ckpt(**changes: Any) -> ml_collections.ConfigDict:
    """The ``ckpt`` section: the round state every 10 rounds, the last 2 kept."""
    defaults = dict(
        every_rounds=10,  # save the round state every this many rounds (0 = never)
        keep=2,  # checkpoints kept
    )
    return _section("ckpt", defaults, changes)


def evaluation(task_fields: dict[str, Any] | None = None, **changes: Any):
    """The ``eval`` section: the fields every task reads, then the task's own
    (``task_fields``, with their values)."""
    defaults = dict(
        every_rounds=5,  # evaluate every this many rounds (and after the last)
        batch_size=256,  # examples per evaluation batch
        local=True,  # also evaluate each sampled client on its held-out split
        at_start=False,  # also evaluate before round 1 (row "round": 0; local: every client)
        max_local_examples=0,  # held-out rows per client in the local evaluation (0 = all)
        # Evaluate the global model on the validation split, which the server holds; False:
        # a server without data (a federation), whose summary says it has no global split.
        global_split=True,
    )
    section = _section("eval", defaults, changes)
    section.update(task_fields or {})
    return section


def smoke(c: ml_collections.ConfigDict) -> None:
    """Make ``c`` a seconds-long CPU run in place: a random model with rank-4 adapters on
    synthetic data, 2 rounds of 3 of 4 clients (all at once, 3 local steps each, 20 solver
    steps), checkpointed and evaluated every round. The config adds its task's sizes."""
    c.model.source, c.model.path = "random", ""
    c.lora.rank, c.lora.alpha = 4, 8.0
    c.data.source = "synthetic"
    c.partition.num_clients = 4
    c.client.local_steps = 3
    c.server.steps = 20
    c.train.num_rounds, c.train.clients_per_round = 2, 3
    c.train.clients_per_chunk = 0  # 3 tiny clients: all at once
    c.ckpt.every_rounds = 1
    c.eval.every_rounds = 1
