"""Tests of the plan (floranna_jax.plan): its figures are those of the real compiled
programs, it plans from a model folder holding only config.json, and a config that does
not fit ends with the one line and exit code 2, from the command line and before a run on
an accelerator."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from smoke_setup import config_file
from smoke_setup import launch as launch_py

import launch
from floranna_jax import plan, rounds, train
from floranna_jax.errors import ConfigError
from floranna_jax.models import decoder
from floranna_jax.plan import figures, flops, knobs, programs, report
from floranna_jax.plan.figures import Figures


def _nbytes(x) -> int:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return int(np.asarray(x).nbytes)


def _gsm8k_smoke(**overrides):
    # 4 new tokens: the decoding program compiles in a fraction of the default's time.
    return config_file("gsm8k.py", "smoke", **{"eval.max_new_tokens": 4, **overrides})


def _weightless_folder(tmp_path, **changes) -> str:
    """A model folder with a tiny LLaMA's config.json and nothing else: no weights."""
    folder = tmp_path / "config_only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(decoder.tiny_config("llama") | changes))
    return str(folder)


def test_devices_parse_with_and_without_count():
    assert plan.parse("h100-80gb") == (plan.DEVICES["h100-80gb"], 1)
    assert plan.parse("8xh100-80gb") == (plan.DEVICES["h100-80gb"], 8)
    for bad in ("h100", "0xh100-80gb", "8x"):
        with pytest.raises(ConfigError, match="valid: cpu, h100-80gb"):
            plan.parse(bad)


def test_flops_count_scan_lengths_and_remat():
    """A scan's body counts ``length`` times; a rematerialized gradient counts forward,
    recomputation and backward: 3 forwards (the gradient is taken for x only)."""

    def f(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=10)[0]

    x, w = jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 16), jnp.float32)
    forward = 2 * 8 * 16 * 16 * 10
    assert flops.of(jax.jit(f), x, w) == forward
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jax.checkpoint(f)(x, w))))
    assert flops.of(grad, x, w) == 3 * forward


def test_client_figures_are_the_real_programs(monkeypatch):
    """The plan's client step (abstract base, round 1's shapes) has exactly the argument
    bytes of the arrays a real round 1 passes its runner, and the outputs and temporaries
    of the runner's program compiled on those arrays."""
    config = _gsm8k_smoke()
    abstract_run = train.build(config, abstract=True)
    program = programs.programs(config, abstract_run).round[0]
    planned = report.measure(program)

    recorded = []
    real_train_clients = rounds.train_clients

    def spy(runner, *args):
        def recording(*inputs):
            recorded.append(inputs)
            return runner(*inputs)

        return real_train_clients(recording, *args)

    monkeypatch.setattr(rounds, "train_clients", spy)
    run = train.build(config)
    run.round_fn(run.state)
    inputs = recorded[0]
    real_base = sum(_nbytes(x) for x in jax.tree.leaves(run.exp.model.base))
    assert programs.nbytes(abstract_run.exp.model.base) == real_base
    # XLA drops arguments a program never reads: a decoder reads no "starts" (where an
    # encoder's classifier finds an example's first token).
    base, trainable, opt_state, batches, step_mask, keys = inputs
    read = (base, trainable, opt_state, {k: v for k, v in batches.items() if k != "starts"},
            step_mask, keys)  # fmt: skip
    assert planned.arguments == sum(_nbytes(x) for x in jax.tree.leaves(read))
    memory = program.fn.lower(*inputs).compile().memory_analysis()
    assert planned.arguments == memory.argument_size_in_bytes
    assert planned.temporaries == memory.temp_size_in_bytes
    assert planned.outputs == memory.output_size_in_bytes - memory.alias_size_in_bytes
    assert planned.flops > 0


def test_plans_from_a_folder_with_only_config_json(tmp_path):
    folder = _weightless_folder(tmp_path)
    config = _gsm8k_smoke(**{"model.source": "pretrained", "model.path": folder,
                             "data.tokenizer": "bytes"})  # fmt: skip
    out = plan.make(config, plan.DEVICES["h100-80gb"])
    assert out.fits
    assert out.lines[-1].startswith("plan: fits: peak "), out.lines[-1]
    names = [line.split(" | ")[0] for line in out.lines if line.startswith("| ")]
    for name in ("client step", "server aggregate", "server apply", "generate", "answer loss"):
        assert any(name in n for n in names), (name, names)
    assert os.listdir(folder) == ["config.json"]


def test_encoder_plan_compiles_its_evaluation_forwards():
    out = plan.make(config_file("glue.py", "smoke"), plan.DEVICES["tpu-v5e"])
    assert out.fits, out.lines[-1]
    names = [line.split(" | ")[0] for line in out.lines if line.startswith("| ")]
    assert "| predict" in names and "| predict clients" in names, names


def test_flora_plans_its_merge_in_place():
    config = _gsm8k_smoke(**{"server.name": "flora"})
    run = train.build(config, abstract=True)
    progs = programs.programs(config, run)
    merge = progs.round[-1]
    assert merge.name == programs.MERGE
    fig = figures.measure(merge, progs.held[merge.name])
    kernels = programs.merged_kernels(run)
    merged, base = programs.nbytes(kernels), programs.nbytes(run.exp.model.base)
    method = programs.nbytes(run.state.method)
    assert 0 < merged < base / 4
    # One layer a call, every merged layer: it reads a pretrained stack and one layer's
    # float32 sum and writes the donated merged stack, so no new outputs (the output's
    # descriptor only) and no temporaries; the rest of the run stays beside it.
    stack, dW = merge.args[0], merge.args[2]
    assert merge.calls == len(run.state.lora)
    assert fig.arguments == 2 * programs.nbytes(stack) + programs.nbytes(dW) + 4  # + index
    assert fig.outputs < 1024 and fig.temporaries == 0
    rest = programs.nbytes((run.state.lora, run.state.head, run.state.opt_state))
    assert fig.held == base + merged + method + rest - fig.arguments + 4
    # The clients train on one base (merged kernels in place of the pretrained ones) while
    # the pretrained kernels and the sum stay: one set of kernels more, not a second base.
    assert progs.held[progs.round[0].name] == merged + method + rest


def test_auto_base_dtype_resolves_for_the_planned_device():
    """A plan made on this CPU for a GPU or TPU builds a bfloat16 base from
    ``model.base_dtype="auto"``; for a CPU a float32 one; a set dtype is kept."""
    config = _gsm8k_smoke()
    for name, dtype in (("h100-80gb", jnp.bfloat16), ("tpu-v5e", jnp.bfloat16),
                        ("cpu", jnp.float32)):  # fmt: skip
        resolved = report.for_device(config, plan.DEVICES[name])
        base = train.build(resolved, abstract=True).exp.model.base
        assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(dtype)}, name
    config.model.base_dtype = "float32"
    assert report.for_device(config, plan.DEVICES["h100-80gb"]).model.base_dtype == "float32"


def test_suggestion_is_planned_again():
    """On a device 1 byte short of the client step's peak, the plan proposes training the
    clients one at a time and says the peak it then measured, which fits."""
    h100 = plan.DEVICES["h100-80gb"]
    config = _gsm8k_smoke()
    out = plan.make(config, h100)
    assert "(bfloat16)" in out.lines[0], out.lines[0]  # base_dtype="auto" for the GPU
    worst = out.worst
    assert worst.name.startswith("client step")
    capacity = worst.peak - 1
    config = report.for_device(config, h100)
    line = knobs.suggest(config, 0, worst, capacity)
    assert line.startswith("try train.clients_per_chunk=1 (peak then "), line
    assert "still over" not in line
    config.train.clients_per_chunk = 1
    assert knobs.replan(config, 0).peak <= capacity


def test_too_big_exits_2_with_one_line(tmp_path):
    """A 2M-token vocabulary (33 GB of float32 embeddings; abstract, so nothing is
    allocated) on a 16 GB TPU v5e: exit 2, the verdict as the last line."""
    folder = _weightless_folder(tmp_path, vocab_size=2_000_000, hidden_size=2048,
                                num_attention_heads=16, num_key_value_heads=16)  # fmt: skip
    proc = launch_py("--plan=tpu-v5e", "--config.model.source=pretrained",
                     f"--config.model.path={folder}", "--config.data.tokenizer=bytes",
                     "--config.eval.max_new_tokens=4", config="configs/gsm8k.py:smoke",
                     timeout=600)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.match(r"^plan: does not fit: .+ needs [0-9.]+ GB of 16\.0 GB per device; try ", last)


def test_run_on_an_accelerator_stops_before_loading(monkeypatch, capsys):
    """``launch.check_fits`` plans on any backend but the CPU; a device too small stops
    the run with the plan's line and exit code 2."""
    config = _gsm8k_smoke()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(plan, "local_device", lambda: plan.Device("tiny", 10_000, None))
    with pytest.raises(SystemExit) as stop:
        launch.check_fits(config)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("plan: does not fit: client step"), err
    assert "of 10.0 kB per device; try " in err[0]


def test_knobs_try_remat_dtype_and_micro_batches_before_the_batch():
    """Cheapest first: remat, a bfloat16 base, then a micro-batch size that divides the
    batch (20 examples, room for 8: micro-batches of 5); the batch size itself last."""
    config = _gsm8k_smoke(**{"client.batch_size": 20, "train.clients_per_chunk": 1,
                             "model.remat": False, "model.base_dtype": "float32"})  # fmt: skip
    fig = Figures("client step (3 clients, 1 at a time)", 1, 10, 0, 100, 0, 0)
    capacity = 10 + 40  # 40% of the temporaries fit: 8 of 20 examples
    seen = []
    for field in ("model.remat", "model.base_dtype", "client.micro_batch_size"):
        proposal = knobs._proposal(config, fig, capacity)
        seen.append(proposal)
        section, name = field.split(".")
        config[section][name] = proposal[1]
    assert seen == [("model.remat", True), ("model.base_dtype", "bfloat16"),
                    ("client.micro_batch_size", 5)]  # fmt: skip
    assert knobs._proposal(config, fig, capacity) == ("client.micro_batch_size", 2)
