"""Tests for floranna_jax.models: LoRA invariants, precision, vmap, and parity with PyTorch.

Parity tests compare with transformers' PyTorch BERT/RoBERTa and skip, with the reason,
when torch/transformers or the MiniLM checkpoint is absent.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from floranna_jax import lora, models
from floranna_jax.models import encoder

ALL_TARGETS = encoder.TARGETS


def _batch(model_type: str, b: int = 3, L: int = 12, seed: int = 0) -> dict:
    """Token ids with trailing padding of different lengths per row."""
    rng = np.random.default_rng(seed)
    pad = models.tiny_config(model_type)["pad_token_id"]
    ids = rng.integers(3, 1000, size=(b, L)).astype(np.int32)
    mask = np.ones((b, L), np.int32)
    for i in range(b):
        n = L - 2 * i
        ids[i, n:], mask[i, n:] = pad, 0
    types = np.zeros((b, L), np.int32)
    types[:, L // 2 :] = 1 if model_type == "bert" else 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _randomize_B(trainable: dict, seed: int, std: float = 0.5) -> dict:
    """Nonzero B everywhere so the adapters change the output (numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    adapters = {
        n: {"A": a["A"], "B": jnp.asarray(rng.normal(0.0, std, a["B"].shape), jnp.float32)}
        for n, a in sorted(trainable["lora"].items())
    }
    return {"lora": adapters, "head": trainable["head"]}


def _config(model_type: str) -> dict:
    # initializer_range 0.2 (not 0.02): logits of order 1, so tolerances below bite.
    return dict(models.tiny_config(model_type), initializer_range=0.2)


def _tiny(model_type: str, **kw) -> models.Model:
    kw.setdefault("lora", models.LoraSpec(rank=4, alpha=8.0, targets=ALL_TARGETS))
    return _build(model_type, tuple(sorted(kw.items())))


@functools.cache  # one random tiny model per setting keeps the suite fast on 2 cores
def _build(model_type: str, kw: tuple) -> models.Model:
    return models.build_random(_config(model_type), key=jax.random.key(0), **dict(kw))


def _jit(model: models.Model):
    # One jit cache per model.apply, shared by the tests (compiling is the slow part).
    return jax.jit(model.apply, static_argnames="deterministic")


def _max_diff(x, y) -> float:
    return float(jnp.abs(x - y).max())


class ModelTest(chex.TestCase):
    @parameterized.parameters("bert", "roberta")
    def test_adapter_tree_names_and_shapes(self, model_type):
        model = _tiny(model_type, lora=models.LoraSpec(rank=4, targets=("value", "mlp_down")))
        names = list(model.trainable["lora"])
        self.assertEqual(
            names,
            [
                "layer_0/attention/value",
                "layer_0/mlp/mlp_down",
                "layer_1/attention/value",
                "layer_1/mlp/mlp_down",
            ],
        )
        down = model.trainable["lora"]["layer_0/mlp/mlp_down"]
        chex.assert_shape([down["A"], down["B"]], [(4, 128), (64, 4)])
        self.assertGreater(float(jnp.abs(down["A"]).max()), 0.0)
        chex.assert_trees_all_equal(down["B"], jnp.zeros((64, 4)))
        self.assertEqual(model.lora_scale, 16.0 / 4)  # alpha / r
        self.assertNotIn("lora", model.base)
        self.assertNotIn("head", model.base)
        # each layer_name is the path of its kernel [d_in, d_out] in base (merging relies on it)
        for name, adapter in model.trainable["lora"].items():
            node = model.base
            for part in name.split("/"):
                node = node[part]
            self.assertEqual(node["kernel"].shape, (adapter["A"].shape[1], adapter["B"].shape[0]))

    def test_unknown_target_raises(self):
        with self.assertRaisesRegex(ValueError, "targets: unknown \\['qkv'\\]"):
            _tiny("bert", lora=models.LoraSpec(targets=("query", "qkv")))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("bert", "roberta")
    def test_b_zero_is_exactly_the_base_model(self, model_type):
        model = _tiny(model_type)
        apply = self.variant(model.apply)
        batch = _batch(model_type)
        no_lora = {"lora": {}, "head": model.trainable["head"]}
        base_out = apply(model.base, no_lora, batch)
        # B = 0 adds exact zeros: bit-identical, no tolerance.
        chex.assert_trees_all_equal(apply(model.base, model.trainable, batch), base_out)
        changed = apply(model.base, _randomize_B(model.trainable, 1), batch)
        self.assertGreater(_max_diff(changed, base_out), 1e-2)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("bert", "roberta")
    def test_merged_weights_equal_adapter_forward(self, model_type):
        model = _tiny(model_type)
        trainable = _randomize_B(model.trainable, 1)
        merges = {n: a["B"] @ a["A"] for n, a in trainable["lora"].items()}
        merged = models.merge_into_base(model.base, merges, model.lora_scale)
        batch = _batch(model_type)
        bare = {"lora": {}, "head": trainable["head"]}
        apply = self.variant(model.apply)
        with_adapters = apply(model.base, trainable, batch)
        self.assertGreater(_max_diff(with_adapters, apply(model.base, bare, batch)), 1e-2)
        # fp32 reassociation (x@W + s(x@A^T)@B^T vs x@(W + sBA)^T), 2 layers: ~1e-6 of O(1).
        chex.assert_trees_all_close(apply(merged, bare, batch), with_adapters, atol=1e-5, rtol=1e-5)

    def test_merge_into_base_unknown_name_raises_and_keeps_input(self):
        model = _tiny("bert")
        before = jax.tree.map(jnp.copy, model.base)
        dW = jnp.ones((64, 64))
        with self.assertRaisesRegex(ValueError, "embeddings/word.*layer_9/attention/query"):
            models.merge_into_base(
                model.base, {"layer_9/attention/query": dW, "embeddings/word": dW}, 1.0
            )
        merged = models.merge_into_base(model.base, {"layer_1/attention/key": dW}, 2.0)
        chex.assert_trees_all_equal(model.base, before)
        chex.assert_trees_all_close(
            merged["layer_1"]["attention"]["key"]["kernel"],
            lora.merge_into_kernel(before["layer_1"]["attention"]["key"]["kernel"], dW, 2.0),
        )

    def test_bf16_compute_close_to_fp32(self):
        f32 = _tiny("roberta")
        b16 = _tiny("roberta", compute_dtype=jnp.bfloat16)
        chex.assert_trees_all_equal(f32.base, b16.base)  # parameters stay fp32
        self.assertTrue(all(x.dtype == jnp.float32 for x in jax.tree.leaves(b16.base)))
        trainable = _randomize_B(f32.trainable, 1)
        batch = _batch("roberta")
        out32 = _jit(f32)(f32.base, trainable, batch)
        out16 = _jit(b16)(b16.base, trainable, batch)
        self.assertEqual(out16.dtype, jnp.float32)
        self.assertGreater(_max_diff(out16, out32), 0.0)  # bf16 really ran
        # bf16 keeps 8 mantissa bits (~4e-3 relative per op); O(1) logits after 2 layers
        # and a 2-layer head drift by a few 1e-2 at most.
        chex.assert_trees_all_close(out16, out32, atol=0.1, rtol=0.05)

    def test_vmap_over_stacked_trainable_equals_loop(self):
        model = _tiny("roberta")
        clients = [_randomize_B(model.trainable, i) for i in range(3)]
        stacked = jax.tree.map(lambda *x: jnp.stack(x), *clients)
        batch = _batch("roberta")
        vmapped = jax.jit(jax.vmap(model.apply, in_axes=(None, 0, None)))(
            model.base, stacked, batch
        )
        looped = jnp.stack([_jit(model)(model.base, t, batch) for t in clients])
        chex.assert_shape(vmapped, (3, 3, 2))
        chex.assert_trees_all_close(vmapped, looped, atol=1e-5, rtol=1e-5)  # same math

    def test_jit_traces_once(self):
        model = _tiny("roberta")

        @jax.jit
        @chex.assert_max_traces(n=1)
        def apply(base, trainable, batch):
            return model.apply(base, trainable, batch)

        batch = _batch("roberta")
        apply(model.base, model.trainable, batch)
        apply(model.base, _randomize_B(model.trainable, 2), batch)

    def test_trailing_padding_does_not_change_logits(self):
        # RoBERTa: pad tokens are masked and also shift no position id.
        model = _tiny("roberta")
        trainable = _randomize_B(model.trainable, 1)
        batch = _batch("roberta", L=12)
        short = {k: v[:, :7] for k, v in batch.items()}  # row 0 unpadded, rows 1-2 padded
        longer = {k: v.copy() for k, v in short.items()}
        for k, v in longer.items():
            longer[k] = np.pad(v, ((0, 0), (0, 5)))
        longer["input_ids"][:, 7:] = models.tiny_config("roberta")["pad_token_id"]
        # masked keys get exp(finfo.min) = 0 weight; only fp32 summation order differs.
        chex.assert_trees_all_close(
            _jit(model)(model.base, trainable, longer),
            _jit(model)(model.base, trainable, short),
            atol=1e-5,
            rtol=1e-5,
        )

    def test_regression_head(self):
        model = _tiny("bert", num_labels=1)
        out = _jit(model)(model.base, model.trainable, _batch("bert"))
        chex.assert_shape(out, (3, 1))
        self.assertEqual(out.dtype, jnp.float32)

    def test_optional_batch_fields_default_to_no_padding_and_type_zero(self):
        ids = np.ones((2, 5), np.int32)
        got_ids, mask, types, packed = encoder._inputs({"input_ids": ids})
        self.assertIsNone(packed)
        chex.assert_trees_all_equal((mask, types), (np.ones_like(ids), np.zeros_like(ids)))

    def test_dropout(self):
        spec = models.LoraSpec(rank=4, targets=ALL_TARGETS, dropout=0.1)
        model = _tiny("roberta", lora=spec)
        trainable = _randomize_B(model.trainable, 1)
        batch = _batch("roberta")
        apply = _jit(model)
        clean = apply(model.base, trainable, batch)

        def noisy(seed):
            key = jax.random.key(seed)
            return apply(model.base, trainable, batch, deterministic=False, dropout_key=key)

        chex.assert_trees_all_equal(noisy(3), noisy(3))  # the key decides
        self.assertGreater(_max_diff(noisy(3), noisy(4)), 1e-3)
        self.assertGreater(_max_diff(noisy(3), clean), 1e-3)
        with self.assertRaisesRegex(ValueError, "dropout_key"):
            model.apply(model.base, trainable, batch, deterministic=False)

    def test_unknown_adapter_name_raises(self):
        model = _tiny("bert")
        trainable = dict(model.trainable, lora={"layer_7/attention/query": {}})
        with self.assertRaisesRegex(ValueError, "layer_7/attention/query"):
            model.apply(model.base, trainable, _batch("bert"))

    def test_sequence_too_long_raises(self):
        model = _tiny("roberta")
        ids = np.full((1, 129), 5, np.int32)
        with self.assertRaisesRegex(ValueError, "129 needs 131 positions"):
            model.apply(model.base, model.trainable, {"input_ids": ids})

    def test_unknown_model_type_raises(self):
        with self.assertRaisesRegex(ValueError, "'gpt2' not supported.*bert.*roberta"):
            models.build_random({"model_type": "gpt2"})

    @parameterized.parameters("bert", "llama")
    def test_a_missing_size_field_is_named(self, model_type):
        hf_config = models.tiny_config(model_type)
        del hf_config["num_attention_heads"]
        with self.assertRaisesRegex(
            ValueError, rf"{model_type} config lacks \['num_attention_heads'\]"
        ):
            models.build_random(hf_config)


# ---------------------------------------------------------------- parity with PyTorch


def _torch():
    torch = pytest.importorskip("torch", reason="torch not installed: no PyTorch reference")
    pytest.importorskip("transformers", reason="transformers not installed")
    return torch


def test_parity_minilm_with_transformers(minilm_dir):
    torch = _torch()
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    texts = ["A man is playing a guitar.", "Federated low-rank adaptation.", "Hi"]
    enc = tok(texts, padding=True, return_tensors="np")
    batch = {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    ref = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        out = ref(**{k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()})

    model = models.load_pretrained(minilm_dir, num_labels=2, key=jax.random.key(0))
    hidden, pooled = encoder.encode(model.config, model.base, batch)
    # fp32 on both sides; 6 layers of different op order stay well under 1e-4.
    np.testing.assert_allclose(hidden, out.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4, rtol=0)
    chex.assert_shape(model.apply(model.base, model.trainable, batch), (3, 2))


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_parity_tiny_random_classifier_with_transformers(model_type, tmp_path):
    torch = _torch()
    import transformers

    config = dict(models.tiny_config(model_type), initializer_range=0.2, num_labels=3)
    config_cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}
    model_cls = {
        "bert": transformers.BertForSequenceClassification,
        "roberta": transformers.RobertaForSequenceClassification,
    }
    torch.manual_seed(0)
    ref = model_cls[model_type](config_cls[model_type](**config)).eval()
    ref.save_pretrained(tmp_path)
    batch = _batch(model_type, b=3, L=16)
    with torch.no_grad():
        t_in = {k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()}
        t_hidden = getattr(ref, model_type)(**t_in).last_hidden_state.numpy()
        t_logits = ref(**t_in).logits.numpy()

    model = models.load_pretrained(tmp_path, num_labels=3, key=jax.random.key(0))
    hidden, _ = encoder.encode(model.config, model.base, batch)
    logits = model.apply(model.base, model.trainable, batch)
    assert np.abs(t_logits).max() > 1e-2  # a head that does something
    np.testing.assert_allclose(hidden, t_hidden, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, t_logits, atol=1e-4, rtol=0)


def test_saved_folder_loads_in_transformers(tmp_path):
    """save_pretrained writes what transformers reads: same logits both sides."""
    torch = _torch()
    import transformers

    model = _tiny("roberta", num_labels=2, lora=models.LoraSpec(targets=()))
    models.save_pretrained(model, tmp_path)
    ref = transformers.RobertaForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = _batch("roberta")
    with torch.no_grad():
        t_logits = ref(**{k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()})
    np.testing.assert_allclose(
        model.apply(model.base, model.trainable, batch), t_logits.logits.numpy(), atol=1e-5
    )
