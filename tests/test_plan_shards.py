"""The plan of a base split over devices (``train.model_shards``, floranna_jax.fsdp): its
figures are one device's share, and a base too big for one device is told to split.

Planned on 8 CPU devices in a subprocess (the device count is fixed before jax starts),
from a model folder with only config.json: abstract shapes, no weight anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from smoke_setup import REPO, config_file, shared_compilation

DEVICES = 8


class PlanShardsTest(absltest.TestCase):
    def test_split_plan_counts_one_device_and_is_suggested(self):
        env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
        tests = str(REPO / "tests")
        code = f"import sys; sys.path.insert(0, {tests!r}); import test_plan_shards as t; t.main()"
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        # One device holds an eighth of the base (every leaf of this model divides by 8).
        self.assertEqual(report["held_base"] * DEVICES, report["whole_base"])
        self.assertIn(f"base split over {DEVICES} devices", report["header"])
        self.assertTrue(report["verdict"].startswith("plan: fits: "), report["verdict"])
        # The client step (the worst program either way) takes mostly the base as
        # arguments: they fall about 1/8.
        ratio = report["split_arguments"] / report["whole_arguments"]
        self.assertLess(ratio, 0.2, report)
        self.assertLess(report["split_peak"], report["whole_peak"])
        # On a device between the two peaks, the one knob that fits is the split, planned.
        self.assertTrue(report["suggestion"].startswith(
            f"try train.model_shards={DEVICES} (peak then "),
            report["suggestion"])  # fmt: skip
        self.assertNotIn("still over", report["suggestion"])


def main():
    """Run in a fresh process: plans the split and whole base; prints one JSON line."""
    import jax

    jax.config.update("jax_num_cpu_devices", DEVICES)
    from floranna_jax import train
    from floranna_jax.models import decoder
    from floranna_jax.plan import DEVICES as TABLE
    from floranna_jax.plan import knobs, programs, report
    from floranna_jax.plan.figures import measure

    folder = tempfile.mkdtemp()
    # A base that dominates the client step: a 32k vocabulary, 512 wide.
    shape = dict(vocab_size=32000, hidden_size=512, intermediate_size=1024,
                 num_attention_heads=8, num_key_value_heads=8)  # fmt: skip
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(decoder.tiny_config("llama") | shape, f)
    h100 = TABLE["h100-80gb"]

    def config(**overrides):
        c = config_file("gsm8k.py", "smoke", **{
            "eval.max_new_tokens": 4, "model.source": "pretrained", "model.path": folder,
            "data.tokenizer": "bytes", "train.clients_per_chunk": 1, **overrides})  # fmt: skip
        return report.for_device(c, h100)

    split_config = config(**{"train.model_shards": DEVICES})
    with shared_compilation():
        split = report.make(split_config, h100, DEVICES)
        whole_config = config()
        run = train.build(whole_config, abstract=True)
        progs = programs.programs(whole_config, run)
        whole = measure(progs.round[0], progs.held[progs.round[0].name])
        capacity = (split.worst.peak + whole.peak) // 2
        suggestion = knobs.suggest(whole_config, 0, whole, capacity)
    split_run = train.build(split_config, abstract=True)
    assert split.worst.name.startswith("client step"), split.worst  # the base dominates it
    print(json.dumps({
        "header": "\n".join(split.lines[:3]), "verdict": split.lines[-1],
        "held_base": programs.nbytes(split_run.exp.model.base),
        "whole_base": programs.nbytes(run.exp.model.base),
        "split_arguments": split.worst.arguments, "whole_arguments": whole.arguments,
        "split_peak": split.worst.peak, "whole_peak": whole.peak, "suggestion": suggestion,
    }))  # fmt: skip


if __name__ == "__main__":
    absltest.main()
