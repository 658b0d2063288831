"""The merged base of FLoRA/FedEx (floranna_jax.merged_base): built in place, exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from floranna_jax import merged_base, models

LORA = models.LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))


def _model(dtype=jnp.bfloat16, layers: int = 4, abstract: bool = False):
    config = dict(models.tiny_config("llama"), hidden_size=128, intermediate_size=256,
                  num_hidden_layers=layers, initializer_range=0.1)  # fmt: skip
    build = models.build_abstract if abstract else models.build_random
    return build(config, lora=LORA, key=jax.random.key(0), base_dtype=dtype)


def _delta(model, seed: int) -> dict:
    """Dense merges ``[d_out, d_in]`` of every adapted layer, large enough to move bf16."""
    rng = np.random.default_rng(seed)
    return {n: jnp.asarray(rng.normal(0, 0.05, (f["B"].shape[0], f["A"].shape[1])), jnp.float32)
            for n, f in model.trainable["lora"].items()}  # fmt: skip


def _kernels(base, delta) -> dict:
    flat = traverse_util.flatten_dict(base, sep="/")
    return {p: flat[p] for p in models.merged_kernel_paths(flat, delta)}


def _nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_of_a_layer_has_no_temporaries_and_writes_into_its_input(dtype):
    # Compiled on shapes alone, a stack of 32 layers: the merge reads the pretrained stack
    # and one layer's float32 sum, and writes the donated merged stack. No float32 copy of
    # a stack: one program for every layer held one on XLA:CPU from 16 layers on.
    model = _model(dtype, layers=32, abstract=True)
    delta = jax.eval_shape(lambda: _delta(model, 0))
    stacks = _kernels(model.base, delta)
    assert len(stacks) == 2 and _nbytes(stacks) < _nbytes(model.base) / 4  # q and v
    stack = stacks["layers/attn/q_proj/kernel"]
    dW = delta["layers_0/attn/q_proj"]
    index = jax.ShapeDtypeStruct((), jnp.int32)
    memory = (merged_base.make_merge(model).trace(stack, index, dW, stack)
              .lower().compile().memory_analysis())  # fmt: skip
    assert memory.argument_size_in_bytes == 2 * _nbytes(stack) + _nbytes(dW) + 4  # + index
    assert memory.alias_size_in_bytes == _nbytes(stack)  # the output is the donated stack
    # Not asserted 0: the output's own descriptor is the only other output byte.
    assert memory.output_size_in_bytes - memory.alias_size_in_bytes < 1024
    assert memory.temp_size_in_bytes < 4 * np.prod(stack.shape[1:])  # one layer in float32


def test_base_for_merges_in_place_and_rebuilds_any_delta_exactly():
    model = _model()
    s = model.lora_scale
    base_for = merged_base.make(model)
    d1, d2 = _delta(model, 1), _delta(model, 2)
    first = _kernels(base_for(d1), d1)
    again = jax.tree.leaves(_kernels(base_for(d1), d1))  # the same delta: the same arrays
    assert all(a is b for a, b in zip(again, jax.tree.leaves(first), strict=True))
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(first)]
    second = base_for(d2)
    # The first kernels were donated: deleted, and the second written into their buffers.
    assert all(x.is_deleted() for x in jax.tree.leaves(first))
    kernels = jax.tree.leaves(_kernels(second, d2))
    assert [x.unsafe_buffer_pointer() for x in kernels] == pointers
    # Nothing else was donated: the pretrained base and both sums are intact, and every
    # leaf no merge touches is the pretrained base's own.
    pretrained = jax.tree.leaves(model.base)
    assert not any(x.is_deleted() for x in [*pretrained, *d1.values(), *d2.values()])
    touched = {id(x) for x in kernels}
    pairs = zip(jax.tree.leaves(second), pretrained, strict=True)
    shared = [a is b for a, b in pairs if id(a) not in touched]
    assert shared and all(shared)
    # Each base is W0 + s * delta, rebuilt from W0 whatever came before (bit for bit).
    _assert_equal(second, models.merge_into_base(model.base, d2, s))
    moved = zip(kernels, jax.tree.leaves(_kernels(model.base, d2)), strict=True)
    assert not any(bool(jnp.all(a == b)) for a, b in moved)  # the merges move bf16 kernels
    _assert_equal(base_for(d1), models.merge_into_base(model.base, d1, s))
    assert all(x.is_deleted() for x in kernels)  # the contract: valid until another delta
    assert base_for({}) is model.base


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
