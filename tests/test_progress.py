"""Tests of floranna_jax/progress.py: a jitted program's ticks reach the bar that is open
while it runs, never past its total, and none reach a closed one."""

import jax
import jax.numpy as jnp
import pytest

from floranna_jax import progress


class _Line:
    """What progress needs of a tqdm bar, recording its count."""

    opened: list["_Line"] = []

    def __init__(self, total, **_):
        self.total, self.n = total, 0
        _Line.opened.append(self)

    def update(self, n):
        self.n += n

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False


@pytest.fixture(autouse=True)
def _lines(monkeypatch):
    _Line.opened = []
    monkeypatch.setattr(progress.tqdm, "tqdm", _Line)


def test_ticker_counts_the_ticks_of_a_jitted_scan():
    ticker = progress.Ticker()

    @jax.jit
    def run(x):
        def step(carry, t):
            jax.debug.callback(ticker.tick, t)
            return carry + t, None

        return jax.lax.scan(step, x, jnp.arange(5))[0]

    with ticker.show("steps", total=8, unit="step"):
        assert int(jax.block_until_ready(run(0))) == 10
    jax.block_until_ready(run(0))  # no bar open: these ticks go nowhere
    assert [line.n for line in _Line.opened] == [5]


def test_bar_stops_at_its_total():
    with progress.bar("eval", total=2, unit="batch") as tick:
        for _ in range(4):
            tick()
    assert [line.n for line in _Line.opened] == [2]
