"""Flower's fixed waits, shortened: what made a warm round through Flower cost seconds.

flwr 1.42 waits in three places whatever the load (measured on a round of
``benchmarks/flower.py``, timestamps of every process's log):

- its SuperNode (``flwr/supernode/start_client_internal.py``) asks the SuperLink for a
  message and, when none is there, sleeps 3 s before it asks again. A node pushes its reply,
  asks at once, finds nothing (the server is still aggregating) and sleeps: the next
  round's message waited about 3 s on every node. It polls for the ClientApp's reply every
  0.5 s.
- every pull of a message's objects (``pull_objects``) that finds one not stored yet waits
  1 s, then 2 s: a receiver learns of a message before its sender has pushed the arrays, so
  a node (from the SuperLink), a ClientApp process (from its node) and the ServerApp (a
  reply, from the SuperLink) each lost 1 to 3 s a round there.

:func:`patch_supernode` and :func:`quicken_pulls` replace them, in the processes this
project starts: the SuperNode (:mod:`node`), its warm ClientApp process
(:mod:`warm_node`) and the ServerApp (:mod:`server_app`). Written against flwr
:data:`FLWR_VERSION`; on another version :func:`check_version` stops with one line.
"""

from __future__ import annotations

import functools
import sys
import time
from types import SimpleNamespace

FLWR_VERSION = "1.42.0"
FLWR_IDLE_S = 3.0  # the 1.42 SuperNode's sleep after an ask that found no message
FIRST_S = 0.05  # the first wait after work arrived, the step of local polls, a pull's retry
GROWTH = 1.1  # each empty ask waits this much longer than the last


def check_version() -> None:
    """Exit with one line when the installed flwr is not the one these patches are for."""
    import flwr

    if flwr.__version__ != FLWR_VERSION:
        sys.exit(
            f"error: floranna_jax.flower.waits patches flwr {FLWR_VERSION}'s waits; flwr "
            f"{flwr.__version__} is installed (pip install flwr=={FLWR_VERSION})"
        )


def make_backoff(first_s: float, last_s: float, growth: float = GROWTH):
    """``(wait, reset)``: ``wait()`` sleeps ``first_s``, then ``growth`` times longer each
    call, at most ``last_s``; ``reset()`` (work arrived) starts again from ``first_s``.
    After work, a new arrival waits at most about ``growth - 1`` of the idle time so far
    (plus ``first_s``), while a long idle poller asks about once every ``last_s``."""
    next_s = [first_s]

    def wait() -> None:
        time.sleep(next_s[0])
        next_s[0] = min(last_s, next_s[0] * growth)

    def reset() -> None:
        next_s[0] = first_s

    return wait, reset


def patch_supernode(module) -> None:
    """Replace the waits of flwr's SuperNode loop ``module``
    (``flwr.supernode.start_client_internal``, which uses ``time`` for nothing else): its
    idle 3 s by a :func:`make_backoff` wait that restarts whenever a message is pulled, its
    0.5 s polls by :data:`FIRST_S`, and its object pulls' by :func:`quicken_pulls`."""
    wait, reset = make_backoff(FIRST_S, FLWR_IDLE_S)
    pull = module._pull_and_store_message

    def pull_and_store_message(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            reset()
        return run_id

    def sleep(seconds: float) -> None:
        if seconds == FLWR_IDLE_S:
            wait()
        else:
            time.sleep(min(seconds, FIRST_S))

    module.time = SimpleNamespace(sleep=sleep)
    module._pull_and_store_message = pull_and_store_message
    quicken_pulls(module, "pull_objects")


def quicken_pulls(module, name: str) -> None:
    """``module.name`` (flwr's ``pull_objects`` or ``pull_and_inflate_object_from_tree``,
    as that module imported it) retrying a missing object after :data:`FIRST_S`, doubling
    as Flower's does, instead of after 1 s. Patching twice changes nothing more."""
    pull = getattr(module, name)
    if not isinstance(pull, functools.partial):
        setattr(module, name, functools.partial(pull, initial_backoff=FIRST_S))
