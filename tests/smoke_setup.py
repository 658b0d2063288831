"""Test helpers for the run-level tests: the smoke config with overrides, launch.py as a
user runs it, and a shared XLA compilation cache so runs built by different tests (in this
process or in launched ones) with the same shapes compile once."""

import contextlib
import os
import pathlib
import subprocess
import sys
import tempfile

import jax

from floranna_jax import config_check

REPO = pathlib.Path(__file__).resolve().parents[1]
XLA_CACHE = pathlib.Path(tempfile.gettempdir()) / "floranna_jax_test_xla_cache"
# A launched run without the per-step bar: its host callback would keep the clients' program
# out of the cache (test_train checks the bar).
NO_BAR = "--config.train.step_progress=False"


def smoke_config(**overrides):
    """configs/glue.py:smoke (unlocked) with ``{"section.field": value}`` overrides."""
    return config_file("glue.py", "smoke", **overrides)


def config_file(name: str, arg: str = "smoke", **overrides):
    """configs/<name>:<arg> (unlocked) with ``{"section.field": value}`` overrides.

    Without the per-step bar (``train.step_progress=False`` unless overridden): its host
    callback would keep the clients' program out of :func:`shared_compilation`'s cache, so
    every run of every test would compile it again. test_train checks the bar."""
    config = config_check.load_file(REPO / "configs" / name, arg)
    config.train.step_progress = False
    for field, value in overrides.items():
        section, name = field.split(".")
        config[section][name] = value
    return config


@contextlib.contextmanager
def shared_compilation():
    """A persistent XLA cache while the block runs (then the previous settings): runs built
    by different tests with the same shapes compile their client step once."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = [getattr(jax.config, n) for n in names]
    jax.config.update(names[0], str(XLA_CACHE))
    jax.config.update(names[1], 0.0)
    try:
        yield
    finally:
        for n, v in zip(names, before, strict=True):
            jax.config.update(n, v)


def launch(*args: str, config: str = "configs/glue.py:smoke", workdir=None,
           timeout: int = 300) -> subprocess.CompletedProcess:  # fmt: skip
    """``python launch.py --config=<config> [--workdir=<workdir>] <args>`` in the repository,
    on the CPU and offline, with :data:`XLA_CACHE` as JAX's persistent compilation cache."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               JAX_COMPILATION_CACHE_DIR=str(XLA_CACHE),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # fmt: skip
    where = [] if workdir is None else [f"--workdir={workdir}"]
    cmd = [sys.executable, "launch.py", f"--config={config}", *where, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
