"""Progress lines for the long phases of a round, so that work never looks like a hang.

    with progress.bar("eval global", total=4, unit="batch") as tick:
        for batch in batches:
            ...
            tick()                          # advanced from the host, between jitted calls

    ticker = progress.Ticker()              # advanced from inside a jitted program:
    jax.debug.callback(ticker.tick)         # compiled once, it calls the same function
    with ticker.show("clients", total=S, unit="step"):
        jax.block_until_ready(run(...))     # each round, a new bar for those ticks

A bar is a transient tqdm line on stderr (under the run's ``rounds`` bar), removed when
its phase ends; only process 0 of a multi-process run shows one. Showing progress reads
nothing the computation produces, so it changes no number.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import jax
import tqdm


@contextlib.contextmanager
def bar(desc: str, total: int, unit: str) -> Iterator[Callable[..., None]]:
    """A bar of ``total`` ``unit``s while the block runs; yields ``tick()``, one unit done
    (never past ``total``)."""
    with tqdm.tqdm(total=total, desc=desc, unit=unit, leave=False,
                   disable=jax.process_index() != 0) as line:  # fmt: skip

        def tick(*_) -> None:
            if line.n < line.total:
                line.update(1)

        yield tick


class Ticker:
    """A bar that a compiled program advances: the program is built once with
    :meth:`tick` as its callback; :meth:`show` opens the bar those ticks go to (ticks
    outside a ``show`` block go nowhere). Host-side only: holds the open bar."""

    def __init__(self) -> None:
        self._tick: Callable[..., None] | None = None

    def tick(self, *_) -> None:
        """One unit done (the arguments a callback passes are ignored)."""
        if self._tick is not None:
            self._tick()

    @contextlib.contextmanager
    def show(self, desc: str, total: int, unit: str) -> Iterator[None]:
        with bar(desc, total, unit) as tick:
            self._tick = tick
            try:
                yield
            finally:
                self._tick = None
