"""Flower's fixed waits, shortened (floranna_jax/flower/waits.py): which sleeps the SuperNode
patch replaces and with what, the object pulls' retry, and the version guard."""

import functools
import importlib
import inspect
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")

import flwr

from floranna_jax.flower import waits


@pytest.fixture
def slept(monkeypatch):
    """The seconds each ``time.sleep`` of waits.py was asked for, sleeping none."""
    calls = []
    monkeypatch.setattr(waits.time, "sleep", calls.append)
    return calls


def test_backoff_grows_to_its_cap_and_restarts_after_work(slept):
    wait, reset = waits.make_backoff(0.05, 0.2, growth=2.0)
    for _ in range(5):
        wait()
    reset()
    wait()
    assert slept == [0.05, 0.1, 0.2, 0.2, 0.2, 0.05]


def test_the_supernode_loop_idles_on_a_backoff_and_polls_locally_fast(slept):
    pulled = iter([None, None, 7, None])  # two empty asks, a message of run 7, one empty

    def pull_objects(ids, fn, initial_backoff=1.0):
        return initial_backoff

    loop = SimpleNamespace(
        time=None, _pull_and_store_message=lambda **kw: next(pulled), pull_objects=pull_objects
    )
    waits.patch_supernode(loop)
    for _ in range(4):
        if loop._pull_and_store_message(state=None) is None:
            loop.time.sleep(3)  # the loop's idle wait
        else:
            loop.time.sleep(0.5)  # its wait for the ClientApp's reply
    first, grown = waits.FIRST_S, waits.FIRST_S * waits.GROWTH
    # Grows while idle, polls the reply at FIRST_S, restarts after the message.
    assert slept == pytest.approx([first, grown, first, first])
    assert loop.pull_objects([], None) == waits.FIRST_S
    waits.quicken_pulls(loop, "pull_objects")  # again: still one retry step, FIRST_S
    assert loop.pull_objects([], None) == waits.FIRST_S
    assert loop.pull_objects.func is pull_objects


def test_patches_fit_the_flwr_installed():
    """The names the patches replace exist in flwr (with the pinned version)."""
    if flwr.__version__ != waits.FLWR_VERSION:
        pytest.skip(f"flwr {flwr.__version__}, patches for {waits.FLWR_VERSION}")
    loop = importlib.import_module("flwr.supernode.start_client_internal")
    assert "time.sleep(3)" in inspect.getsource(loop)  # the idle wait patch_supernode finds
    for module, name in ((loop, "pull_objects"),
                         ("flwr.superlink.grid.http_grid", "pull_objects"),
                         ("flwr.supernode.runtime.run_clientapp",
                          "pull_and_inflate_object_from_tree")):  # fmt: skip
        fn = getattr(importlib.import_module(module) if isinstance(module, str) else module, name)
        fn = fn.func if isinstance(fn, functools.partial) else fn  # the ServerApp's tests patch
        assert inspect.signature(fn).parameters["initial_backoff"].default == 1


def test_another_flwr_version_stops_with_one_line(monkeypatch):
    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    with pytest.raises(SystemExit) as stop:
        waits.check_version()
    message = str(stop.value)
    assert "\n" not in message and "flwr 9.9.9 is installed" in message
