"""The prepared accelerator check (benchmarks/accelerator.py) runs end to end with --tiny
on a CPU and reports every figure it promises, with sane values."""

import json
import os
import subprocess
import sys

import pytest
from smoke_setup import REPO


@pytest.mark.slow
def test_tiny_check_reports_every_figure(tmp_path):
    out = tmp_path / "figures.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "benchmarks.accelerator", "--tiny", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fig = json.loads(out.read_text())
    assert fig["machine"]["backend"] == "cpu"
    for key in ("train_tokens_per_s", "generate_new_tokens_per_s", "vmap_s", "loop_s"):
        assert 0 < fig[key] < float("inf"), key
    # The plan's figure counts at least the base, adapters, optimizer state and batches.
    assert fig["plan_peak_bytes"] > 2 * 64 * 256 * 2  # above the two bf16 embedding tables
    assert "measured_peak_bytes" not in fig and "train_mfu" not in fig  # a CPU has neither
    assert "train_tokens_per_s:" in proc.stdout
