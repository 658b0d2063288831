"""The library is a library: importing it changes no process setting, benchmarks are not
part of it, and transformers' notice about a missing PyTorch never reaches a user."""

import json
import logging
import os
import subprocess
import sys

from smoke_setup import REPO

from floranna_jax.data import glue


def test_importing_every_module_changes_no_environment_variable():
    code = (
        "import json, os, pkgutil, importlib, importlib.util, floranna_jax\n"
        # floranna_jax.flower needs the optional flower extra; flwr itself sets GRPC_VERBOSITY
        # on import, which is Flower's business, so it is imported before the count starts.
        "flwr = importlib.util.find_spec('flwr') is not None\n"
        "if flwr: importlib.import_module('flwr.supercore.grpc')\n"
        "before = dict(os.environ)\n"
        "names = [m.name for m in pkgutil.walk_packages(floranna_jax.__path__, 'floranna_jax.')]\n"
        "names = [n for n in names if flwr or not n.startswith('floranna_jax.flower')]\n"
        "for n in names: importlib.import_module(n)\n"
        "changed = sorted(k for k in set(before) | set(os.environ)"
        " if before.get(k) != os.environ.get(k))\n"
        "print(json.dumps({'modules': names, 'changed': changed}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OPENBLAS_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "floranna_jax.rounds" in report["modules"]
    assert not any(".benchmarks" in m for m in report["modules"])
    assert report["changed"] == []


def test_no_torch_notice_is_filtered(minilm_dir):
    glue.load_tokenizer(minilm_dir)
    logger = logging.getLogger("transformers")
    notice = logging.makeLogRecord({"msg": "PyTorch was not found. Models won't be available"})
    other = logging.makeLogRecord({"msg": "a tokenizer warning"})
    assert not logger.filter(notice)
    assert logger.filter(other)
