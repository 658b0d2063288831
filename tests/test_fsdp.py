"""The base split over a "model" mesh axis (floranna_jax.fsdp) beside the clients axis."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from jax.sharding import PartitionSpec as P
from smoke_setup import smoke_config

from floranna_jax import clients, config_check, fsdp, keys, models, runners, train
from floranna_jax.errors import ConfigError
from floranna_jax.tasks import generation

MESH = (2, 4)  # clients x model, 8 fake CPU devices


class LeafSpecTest(absltest.TestCase):
    def test_largest_divisible_axis_and_never_the_layer_axis(self):
        self.assertEqual(fsdp.leaf_spec((4, 128, 256), 4, True), P(None, None, "model"))
        self.assertEqual(fsdp.leaf_spec((8, 6), 4, True), P())  # 6 % 4: stays whole
        self.assertEqual(fsdp.leaf_spec((8, 6), 4, False), P("model", None))
        self.assertEqual(fsdp.leaf_spec((512, 128), 1, False), P())

    def test_model_shards_must_divide_the_devices(self):
        with self.assertRaisesRegex(ValueError, "model_shards=3 does not divide 1"):
            runners.make_mesh(1, model_shards=3)

    def test_config_model_shards_must_divide_the_devices(self):
        config = smoke_config(**{"train.model_shards": 3})
        with self.assertRaisesRegex(ConfigError, "train.model_shards: 3 does not divide the 1 "):
            config_check.check_devices(config)
        with self.assertRaisesRegex(ConfigError, "train.model_shards: must be a positive"):
            config_check.validate(smoke_config(**{"train.model_shards": 0}))

    def test_with_several_processes_model_shards_must_divide_each_process(self):
        # 2 processes of 2 devices: a split over 4 would span both (a process would not
        # address a whole copy of the base), so the config names the field.
        config = smoke_config(**{"train.model_shards": 4})
        counts = {"device_count": 4, "local_device_count": 2, "process_count": 2}
        with contextlib.ExitStack() as stack:
            for name, n in counts.items():
                stack.enter_context(mock.patch.object(jax, name, return_value=n))
            with self.assertRaisesRegex(ConfigError, "4 does not divide the 2 devices of each"):
                config_check.check_devices(config)
            config_check.check_devices(smoke_config(**{"train.model_shards": 2}))

    def test_split_base_equals_one_device_on_eight_devices(self):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
        env["JAX_PLATFORMS"] = "cpu"
        here = pathlib.Path(__file__).resolve().parent
        code = f"import sys; sys.path.insert(0, {str(here)!r}); import test_fsdp; test_fsdp.main()"
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        self.assertLess(report["max_abs_diff"], 1e-5)
        self.assertLess(report["chunked_max_abs_diff"], 1e-5)
        # A checkpoint loads straight into the split: each leaf in its shards, values exact.
        self.assertTrue(report["loaded_shardings_match"], report)
        self.assertGreater(report["loaded_split_leaves"], 0)
        self.assertEqual(report["loaded_max_abs_diff"], 0.0)
        # Each device holds a quarter of the base: its argument bytes fall about 1/4 (the
        # adapters, optimizer states and batches, split over clients alike, stay the same).
        ratio = report["arg_bytes_split"] / report["arg_bytes_replicated"]
        self.assertLess(ratio, 0.35, report)
        self.assertGreater(report["split_leaves"], 0)
        # A whole round (3 AdamW steps at 5e-2, then the server's 20 solver steps) carries
        # float32 reduction-order noise further than one client program: 4.6e-6 on the VM
        # this test was written on, 1.2e-5 on an AVX-512 one (FedIT alone: 1.1e-5), with
        # factors of about 0.15; a split that read a wrong shard would be off by that much.
        self.assertLess(report["round_max_abs_diff"], 1e-4)
        # FSDP: each stacked kernel is gathered one layer at a time, in the forward pass and
        # again in the recomputation of the backward pass; none is gathered whole.
        self.assertEqual(report["stack_gathers"], 0)
        self.assertEqual(report["layer_gathers"], 2 * report["stacked_kernels"])
        # Temporaries stay about one layer: 4 more layers add far less than one layer (each
        # layer's input is kept, its gathered kernels are not), and 8 layers hold under 3
        # layers' worth where the whole base is nearly 9.
        layer = report["layer_bytes"]
        self.assertLess(report["temp_bytes_8_layers"] - report["temp_bytes"], layer)
        self.assertLess(report["temp_bytes_8_layers"], 3 * layer)


LORA = models.LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))


def llama(layers: int) -> dict:
    """A tiny LLaMA config: ``layers`` layers, hidden 128."""
    return dict(models.tiny_config("llama"), hidden_size=128, intermediate_size=256,
                num_hidden_layers=layers, initializer_range=0.1)  # fmt: skip


def problem(U: int = 4, S: int = 2, layers: int = 4, remat: bool = True):
    """A tiny random LLaMA (``layers`` layers, hidden 128) and ``U`` clients of ``S`` SGD
    steps; ``remat`` as ``model.remat``."""
    config = llama(layers)
    model = models.build_random(config, lora=LORA, key=jax.random.key(0), remat=remat)
    rng = np.random.default_rng(0)
    b, L = 4, 16
    ids = rng.integers(3, config["vocab_size"], (U, S, b, L)).astype(np.int32)
    loss_mask = np.zeros((U, S, b, L), np.int32)
    loss_mask[..., L // 2 :] = 1
    batches = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask,
               "mask": np.ones((U, S, b), np.float32)}  # fmt: skip
    opt = clients.make_optimizer("sgd", learning_rate=0.5, weight_decay=0.0)
    update = clients.make_local_update(generation.loss_fn(model), opt)
    trainable = model.trainable
    args = (runners.broadcast(trainable, U), runners.broadcast(opt.init(trainable), U),
            jax.tree.map(jnp.asarray, batches), jnp.ones((U, S), jnp.float32),
            keys.dropout_keys(jax.random.key(7), np.arange(U)))  # fmt: skip
    return model.base, update, args


def main():
    """Run with 8 fake CPU devices; prints one JSON line."""
    base, update, args = problem()
    one = runners.make_runner(update)(base, *args)
    split_mesh = runners.make_mesh(model_shards=MESH[1])
    shardings = fsdp.base_shardings(base, split_mesh, stacked=("layers",))
    split_base = fsdp.place(base, split_mesh, stacked=("layers",))
    # As a run builds it: train.model_shards=4 of 8 devices makes the 2x4 mesh.
    config = smoke_config(**{"train.model_shards": MESH[1]})
    split = train.make_client_runner(config, update)[0]
    many = split(split_base, *args)
    diff = max_diff(one, many)
    # Clients one at a time (train.clients_per_chunk=1), each on the base split 4 ways.
    chunk_config = smoke_config(**{"train.model_shards": MESH[1], "train.clients_per_chunk": 1})
    chunked = train.make_client_runner(chunk_config, update)[0]
    chunk_base = fsdp.place(base, train.client_mesh(chunk_config), stacked=("layers",))
    chunked_diff = max_diff(one, chunked(chunk_base, *args))
    whole = runners.make_runner(update, mesh=runners.make_mesh(MESH[0]))
    compiled = [run.lower(b, *args).compile() for run, b in ((split, split_base), (whole, base))]
    memory = [c.memory_analysis() for c in compiled]
    deeper, deeper_update, deeper_args = problem(layers=8)
    deeper_split = train.make_client_runner(config, deeper_update)[0]
    deeper_base = fsdp.place(deeper, split_mesh, stacked=("layers",))
    deeper_memory = deeper_split.lower(deeper_base, *deeper_args).compile().memory_analysis()
    hlo = compiled[0].as_text()
    kernels = [x for x in jax.tree.leaves(base["layers"]) if x.ndim == 3]  # [N, d_in, d_out]
    print(
        json.dumps(
            {
                "max_abs_diff": diff,
                "chunked_max_abs_diff": chunked_diff,
                "arg_bytes_split": memory[0].argument_size_in_bytes,
                "arg_bytes_replicated": memory[1].argument_size_in_bytes,
                "split_leaves": sum(s.spec != P() for s in jax.tree.leaves(shardings)),
                "round_max_abs_diff": round_diff(),
                "stack_gathers": gathers(hlo, {x.shape for x in kernels}),
                "layer_gathers": gathers(hlo, {x.shape[1:] for x in kernels}),
                "stacked_kernels": len(kernels),
                "temp_bytes": memory[0].temp_size_in_bytes,
                "temp_bytes_8_layers": deeper_memory.temp_size_in_bytes,
                "layer_bytes": sum(x[0].nbytes for x in jax.tree.leaves(base["layers"])),
                **loaded_into_shards(split_mesh),
            }
        )
    )


def loaded_into_shards(mesh) -> dict:
    """A saved tiny LLaMA loaded with ``fsdp.sharding_of``: whether every leaf came back
    with its split sharding and its saved values."""
    model = models.build_random(llama(2), lora=LORA, key=jax.random.key(1))
    with tempfile.TemporaryDirectory() as folder:
        models.save_pretrained(model, folder)
        loaded = models.load_pretrained(folder, lora=LORA,
                                        sharding=fsdp.sharding_of(mesh, ("layers",)))  # fmt: skip
    want = fsdp.base_shardings(model.base, mesh, ("layers",))
    leaves = jax.tree.leaves(loaded.base)
    same = [x.sharding.is_equivalent_to(w, x.ndim)
            for x, w in zip(leaves, jax.tree.leaves(want), strict=True)]  # fmt: skip
    return {"loaded_shardings_match": all(same),
            "loaded_split_leaves": sum(not x.is_fully_replicated for x in leaves),
            "loaded_max_abs_diff": max_diff(loaded.base, model.base)}  # fmt: skip


def max_diff(a, b) -> float:
    """The largest absolute difference between the leaves of two trees."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)


def gathers(hlo: str, shapes: set[tuple[int, ...]]) -> int:
    """All-gathers in the compiled ``hlo`` whose result has one of ``shapes``."""
    found = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo)
    return sum(tuple(int(n) for n in f.split(",") if n) in shapes for f in found)


def round_diff() -> float:
    """The smoke config's first round (FLoRA-NA, a tiny BERT) with its base split 4 ways on a
    2x4 mesh against one device: the largest difference of the global adapters."""
    states = []
    for shards in (1, MESH[1]):
        run = train.build(smoke_config(**{"train.model_shards": shards}))
        split = [not x.is_fully_replicated for x in jax.tree.leaves(run.exp.model.base)]
        assert any(split) == (shards > 1), "the run's base is split over the model axis"
        states.append(run.round_fn(run.state)[0])
    return max_diff(states[0].lora, states[1].lora)


if __name__ == "__main__":
    absltest.main()
