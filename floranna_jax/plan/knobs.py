"""What to change when a program does not fit: ``suggest(config, index, figures, capacity)``.

:data:`KNOBS` lists, in the order they are tried, the config fields that shrink a
program. The first knob that the config has, that applies to the program and that can
help proposes a value; the program is then planned again with it (rebuilt and compiled
at its new shapes), and while it still does not fit the next proposal is added, at most
:data:`TRIES` times. The answer names every change and the peak it was measured at, so a
suggestion is a plan, not a guess.

The knobs, cheapest first: ``model.remat=True`` (a client step keeps one layer's
activations instead of all of them), ``model.base_dtype=bfloat16`` (half the frozen base,
an argument of every program), ``train.clients_per_chunk=1`` (one client at a time),
``train.model_shards`` (the base split over every device of the plan),
``client.micro_batch_size`` (the
same optimizer step, its batch run in parts: a divisor of ``client.batch_size``) and only
then ``client.batch_size``, which changes the training.
Only fields the config has are ever suggested.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax

from floranna_jax import train
from floranna_jax.plan import programs
from floranna_jax.plan.figures import Figures, gb, measure

TRIES = 3


def _scaled(value: int, fig: Figures, capacity: int) -> int | None:
    """``value`` (a batch size) times the share of the temporaries that would fit, down to
    a power of 2 and at most half of it; None when nothing smaller can fit."""
    room = capacity - (fig.peak - fig.temporaries)
    if room <= 0 or value <= 1:
        return None
    target = max(1.0, value * room / max(fig.temporaries, 1))
    return min(value // 2, 1 << int(math.log2(target)))


def _client(name: str) -> bool:
    return name.startswith("client step")


def _chunk(config, fig, capacity):
    t = config.train
    one_at_a_time = t.client_mode == "loop" or t.clients_per_chunk == 1
    return None if one_at_a_time or t.clients_per_round == 1 else 1


def _shards(config, fig, capacity):
    """Every device of the plan splits the base (:mod:`floranna_jax.fsdp`); clients sharded
    over devices (``train.shard_clients``) leave none to split it."""
    n, t = jax.device_count(), config.train
    if n == 1 or t.model_shards == n or t.client_mode == "loop" or t.shard_clients:
        return None
    return n


def _micro(config, fig, capacity):
    """A smaller micro-batch: the largest divisor of the batch size at most the scaled one."""
    c = config.client
    scaled = _scaled(c.micro_batch_size or c.batch_size, fig, capacity)
    if scaled is None:
        return None
    return max(d for d in range(1, scaled + 1) if c.batch_size % d == 0)


# (applies to the program named?, field, (config, figures, capacity) -> value or None)
Knob = tuple[Callable[[str], bool], str, Callable[..., object]]
KNOBS: list[Knob] = [
    (_client, "model.remat", lambda c, f, cap: None if c.model.remat else True),
    (lambda name: True, "model.base_dtype",
     lambda c, f, cap: "bfloat16" if c.model.base_dtype == "float32" else None),
    (_client, "train.clients_per_chunk", _chunk),
    (lambda name: True, "train.model_shards", _shards),
    (_client, "client.micro_batch_size", _micro),
    (_client, "client.batch_size", lambda c, f, cap: _scaled(c.client.batch_size, f, cap)),
    (lambda name: name.startswith("server"), "train.clients_per_round",
     lambda c, f, cap: c.train.clients_per_round // 2 or None),
    (lambda name: not name.startswith(("client step", "server", "merge")), "eval.batch_size",
     lambda c, f, cap: _scaled(c.eval.batch_size, f, cap)),
]  # fmt: skip


def _has(config, field: str) -> bool:
    section, name = field.split(".")
    return section in config and name in config[section]


def _proposal(config, fig: Figures, capacity: int) -> tuple[str, object] | None:
    for applies, field, propose in KNOBS:
        if applies(fig.name) and _has(config, field):
            value = propose(config, fig, capacity)
            if value is not None:
                return field, value
    return None


def replan(config, index: int) -> Figures:
    """The figures of program ``index`` (round programs, then evaluation ones) of ``config``."""
    run = train.build(config, abstract=True)
    progs = programs.programs(config, run)
    program = [*progs.round, *progs.evaluation][index]
    return measure(program, progs.held[program.name])


def suggest(config, index: int, fig: Figures, capacity: int) -> str:
    """``try <field>=<value> ... (peak then X GB)`` for program ``index`` with figures
    ``fig``, or a bigger device when no knob helps (see the module)."""
    config = config.copy_and_resolve_references()
    changes = {}  # field -> value; a field proposed again keeps its last value
    for _ in range(TRIES):
        proposal = _proposal(config, fig, capacity)
        if proposal is None:
            break
        field, value = proposal
        section, name = field.split(".")
        config[section][name] = changes[field] = value
        fig = replan(config, index)
        if fig.peak <= capacity:
            break
    if changes:
        fields = " ".join(f"{f}={v}" for f, v in changes.items())
        over = "" if fig.peak <= capacity else ": still over, plan again"
        return f"try {fields} (peak then {gb(fig.peak)}{over})"
    return f"try a device with more memory (its arguments alone take {gb(fig.arguments)})"
