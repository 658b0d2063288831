"""Tests for floranna_jax.models.decoder: LoRA invariants, the chunked loss, packed batches,
generation, loading, and parity with transformers' PyTorch LlamaForCausalLM.

Parity tests skip, with the reason, when torch/transformers or the SmolLM2 GGUF file is
absent.
"""

import functools
import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from floranna_jax import lora, models, packing
from floranna_jax.models import decoder, loading
from floranna_jax.models.architecture import split_stacked

ALL_TARGETS = decoder.TARGETS


def _config(model_type: str = "llama", **kw) -> dict:
    # initializer_range 0.1 (not 0.02): logits of order 1, so tolerances below bite.
    return dict(models.tiny_config(model_type), initializer_range=0.1, **kw)


@functools.cache  # one random tiny model per setting keeps the suite fast on 2 cores
def _build(config_json: str, kw: tuple) -> models.Model:
    return models.build_random(json.loads(config_json), key=jax.random.key(0), **dict(kw))


def _tiny(config: dict | None = None, **kw) -> models.Model:
    kw.setdefault("lora", models.LoraSpec(rank=4, alpha=8.0, targets=ALL_TARGETS))
    return _build(json.dumps(config or _config(), sort_keys=True), tuple(sorted(kw.items())))


def _randomize_B(trainable: dict, seed: int, std: float = 0.5) -> dict:
    """Nonzero B everywhere so the adapters change the output (numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    adapters = {
        n: {"A": a["A"], "B": jnp.asarray(rng.normal(0.0, std, a["B"].shape), jnp.float32)}
        for n, a in sorted(trainable["lora"].items())
    }
    return {"lora": adapters, "head": trainable["head"]}


def _batch(b: int = 4, L: int = 16, vocab: int = 512, seed: int = 0, lengths=None) -> dict:
    """Right-padded rows of ``lengths`` tokens (default ``L - 3 i``); the second half of
    each row is completion."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(b, L)).astype(np.int32)
    mask = np.ones((b, L), np.int32)
    loss_mask = np.zeros((b, L), np.int32)
    for i in range(b):
        n = L - 3 * i if lengths is None else lengths[i]
        ids[i, n:], mask[i, n:] = 0, 0
        loss_mask[i, n // 2 : n] = 1
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def _jit(model: models.Model):
    return jax.jit(model.apply, static_argnames="deterministic")


def _max_diff(x, y) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))


class DecoderTest(chex.TestCase):
    def test_adapter_tree_names_and_shapes(self):
        model = _tiny(lora=models.LoraSpec(rank=4))  # default targets: q_proj, v_proj
        self.assertEqual(
            list(model.trainable["lora"]),
            ["layers_0/attn/q_proj", "layers_0/attn/v_proj",
             "layers_1/attn/q_proj", "layers_1/attn/v_proj"],
        )  # fmt: skip
        self.assertEqual(model.trainable["head"], {})
        v = model.trainable["lora"]["layers_1/attn/v_proj"]
        chex.assert_shape([v["A"], v["B"]], [(4, 64), (32, 4)])  # GQA: 2 kv heads of 16
        chex.assert_trees_all_equal(v["B"], jnp.zeros((32, 4)))
        # each layer_name is slice i of a stacked kernel [N, d_in, d_out] (merging relies on it)
        arch = models.architecture(model.config, 0, models.LoraSpec(targets=ALL_TARGETS))
        for name, (d_in, d_out) in arch.lora_shapes.items():
            stack, i, rest = split_stacked(name)
            node = model.base[stack]
            for part in rest.split("/"):
                node = node[part]
            self.assertEqual(node["kernel"][i].shape, (d_in, d_out))
        self.assertLen(arch.lora_shapes, 2 * 7)

    def test_unknown_target_raises_with_valid_names(self):
        with self.assertRaisesRegex(ValueError, "targets: unknown \\['query'\\].*q_proj"):
            _tiny(lora=models.LoraSpec(targets=("q_proj", "query")))

    @chex.variants(with_jit=True, without_jit=True)
    def test_b_zero_is_exactly_the_base_model(self):
        model = _tiny()
        apply = self.variant(model.apply)
        batch = _batch()
        bare = apply(model.base, {"lora": {}, "head": {}}, batch)
        # B = 0 adds exact zeros: bit-identical, no tolerance.
        chex.assert_trees_all_equal(apply(model.base, model.trainable, batch), bare)
        changed = apply(model.base, _randomize_B(model.trainable, 1), batch)
        self.assertGreater(_max_diff(changed[0], bare[0]), 1e-2)

    @chex.variants(with_jit=True, without_jit=True)
    def test_merged_weights_equal_adapter_forward(self):
        model = _tiny()
        trainable = _randomize_B(model.trainable, 1)
        merges = {n: a["B"] @ a["A"] for n, a in trainable["lora"].items()}
        merged = models.merge_into_base(model.base, merges, model.lora_scale)
        apply = self.variant(model.apply)
        batch = _batch()
        bare = {"lora": {}, "head": {}}
        adapted = apply(model.base, trainable, batch)
        self.assertGreater(_max_diff(adapted[0], apply(model.base, bare, batch)[0]), 1e-2)
        # fp32 reassociation (x@W + s(x@A^T)@B^T vs x@(W + sBA)^T) over 2 layers and a
        # sum of ~30 token losses of O(5): a few 1e-5 relative.
        chex.assert_trees_all_close(apply(merged, bare, batch), adapted, rtol=1e-5, atol=1e-4)

    def test_merge_into_stacked_kernel_touches_one_layer(self):
        model = _tiny()
        before = jax.tree.map(jnp.copy, model.base)
        dW = jnp.ones((32, 64))  # v_proj: [d_out, d_in]
        merged = models.merge_into_base(model.base, {"layers_1/attn/v_proj": dW}, 2.0)
        chex.assert_trees_all_equal(model.base, before)
        kernel = before["layers"]["attn"]["v_proj"]["kernel"]
        got = merged["layers"]["attn"]["v_proj"]["kernel"]
        chex.assert_trees_all_equal(got[0], kernel[0])
        chex.assert_trees_all_close(got[1], lora.merge_into_kernel(kernel[1], dW, 2.0))
        with self.assertRaisesRegex(ValueError, "layers_2/attn/q_proj.*layers_x/attn/q_proj"):
            models.merge_into_base(
                model.base, {"layers_2/attn/q_proj": dW, "layers_x/attn/q_proj": dW}, 1.0
            )
        with self.assertRaisesRegex(ValueError, "does not match kernel"):
            models.merge_into_base(model.base, {"layers_0/attn/v_proj": dW.T}, 1.0)

    def test_loss_equals_log_softmax_of_full_logits(self):
        model = _tiny()
        trainable = _randomize_B(model.trainable, 2)
        batch = _batch()
        nll, tokens = _jit(model)(model.base, trainable, batch)
        logits = decoder.logits(model.config, model.base, trainable["lora"],
                                batch["input_ids"], batch["attention_mask"],
                                lora_scale=model.lora_scale)  # fmt: skip
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
        ids, lm = batch["input_ids"], batch["loss_mask"]
        want = [-sum(logp[j, t - 1, ids[j, t]] for t in range(1, ids.shape[1]) if lm[j, t])
                for j in range(len(ids))]  # fmt: skip
        chex.assert_trees_all_equal(tokens, lm[:, 1:].sum(1).astype(np.float32))
        # chunked vs one-shot log-softmax, fp32 sums of ~8 terms of O(5)
        np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-5)

    @parameterized.parameters(("llama", None), ("mistral", 5))
    def test_packed_equals_padded(self, model_type, window):
        extra = {"sliding_window": window} if model_type == "mistral" else {}
        model = _tiny(_config(model_type, **extra))
        trainable = _randomize_B(model.trainable, 3)
        arrays = _batch(b=6, L=32, seed=4, lengths=(30, 9, 13, 6, 19, 11))
        take = np.array([[0, 1, 2, 3, 4, 5]])
        real = np.array([[True, True, True, True, True, False]])
        packed = {k: v[0] for k, v in packing.batches(arrays, take, real,
                                                      packing.layout(arrays)).items()}  # fmt: skip
        self.assertLess(packed["input_ids"].shape[0], 5)  # rows really shared
        padded = {k: v[take[0]] for k, v in arrays.items()}
        nll_pad, tok_pad = _jit(model)(model.base, trainable, padded)
        nll_pack, tok_pack = _jit(model)(model.base, trainable, packed)
        real_rows = real[0]
        chex.assert_trees_all_equal(tok_pack[real_rows], tok_pad[real_rows])
        chex.assert_trees_all_equal(tok_pack[~real_rows], jnp.zeros(1))
        # same math on the same tokens; only the attention's summation length differs
        np.testing.assert_allclose(nll_pack[real_rows], nll_pad[real_rows], rtol=0, atol=1e-5)
        self.assertEqual(float(nll_pack[~real_rows][0]), 0.0)

    def test_bf16_compute_close_to_fp32(self):
        f32 = _tiny()
        b16 = _tiny(compute_dtype=jnp.bfloat16)
        self.assertTrue(all(x.dtype == jnp.float32 for x in jax.tree.leaves(b16.base)))
        trainable = _randomize_B(f32.trainable, 1)
        batch = _batch()
        out32 = _jit(f32)(f32.base, trainable, batch)[0]
        out16 = _jit(b16)(b16.base, trainable, batch)[0]
        self.assertEqual(out16.dtype, jnp.float32)
        self.assertGreater(_max_diff(out16, out32), 0.0)  # bf16 really ran
        # bf16 keeps 8 mantissa bits (~4e-3 relative per op); sums of ~8 token losses
        # of O(5) over 2 layers drift by well under 1%.
        np.testing.assert_allclose(out16, out32, rtol=1e-2)

    def test_remat_same_loss_and_grads(self):
        plain, remat = _tiny(), _tiny(remat=True)
        trainable = _randomize_B(plain.trainable, 1)
        batch = _batch()

        def grads(model):
            def loss(t):
                nll, tokens = model.apply(model.base, t, batch)
                return jnp.sum(nll) / jnp.sum(tokens)

            return jax.jit(jax.value_and_grad(loss))(trainable)

        # recomputation runs the same ops again: equal up to XLA fusion differences
        chex.assert_trees_all_close(grads(remat), grads(plain), rtol=1e-5, atol=1e-6)
        jaxprs = [str(jax.make_jaxpr(m.apply)(m.base, trainable, batch)) for m in (plain, remat)]
        # the chunked loss is one remat region; remat=True adds the layer's
        self.assertEqual(jaxprs[1].count("checkpoint["), jaxprs[0].count("checkpoint[") + 1)

    def test_vmap_over_stacked_trainable_equals_loop(self):
        model = _tiny()
        clients = [_randomize_B(model.trainable, i) for i in range(3)]
        stacked = jax.tree.map(lambda *x: jnp.stack(x), *clients)
        batch = _batch()
        vmapped = jax.jit(jax.vmap(model.apply, in_axes=(None, 0, None)))(
            model.base, stacked, batch
        )
        looped = [_jit(model)(model.base, t, batch) for t in clients]
        looped = jax.tree.map(lambda *x: jnp.stack(x), *looped)
        chex.assert_shape(vmapped[0], (3, 4))
        chex.assert_trees_all_close(vmapped, looped, rtol=1e-5, atol=1e-5)  # same math

    def test_jit_traces_once(self):
        model = _tiny()

        @jax.jit
        @chex.assert_max_traces(n=1)
        def apply(base, trainable, batch):
            return model.apply(base, trainable, batch)

        batch = _batch()
        apply(model.base, model.trainable, batch)
        apply(model.base, _randomize_B(model.trainable, 2), batch)

    def test_program_size_does_not_grow_with_depth(self):
        # one scan over stacked layers: 8 layers lower to the same matmuls as 2 (only the
        # per-layer adapters' stacking grows, by a few ops per layer)
        counts = []
        for n in (2, 8):
            model = models.build_random(_config(num_hidden_layers=n), lora=models.LoraSpec(rank=4))
            text = jax.jit(model.apply).lower(model.base, model.trainable, _batch()).as_text()
            counts.append((text.count("dot_general"), text.count("stablehlo.while")))
        self.assertEqual(counts[0], counts[1])
        self.assertGreater(counts[0][0], 9)  # the layer's 9 matmuls are in there, once

    def test_dropout(self):
        spec = models.LoraSpec(rank=4, targets=ALL_TARGETS, dropout=0.2)
        model = _tiny(_config(attention_dropout=0.1), lora=spec)
        trainable = _randomize_B(model.trainable, 1)
        batch = _batch()
        apply = _jit(model)
        clean = apply(model.base, trainable, batch)[0]

        def noisy(seed):
            key = jax.random.key(seed)
            return apply(model.base, trainable, batch, deterministic=False, dropout_key=key)[0]

        chex.assert_trees_all_equal(noisy(3), noisy(3))  # the key decides
        self.assertGreater(_max_diff(noisy(3), noisy(4)), 1e-3)
        self.assertGreater(_max_diff(noisy(3), clean), 1e-3)
        with self.assertRaisesRegex(ValueError, "dropout_key"):
            model.apply(model.base, trainable, batch, deterministic=False)

    def test_unknown_adapter_name_raises(self):
        model = _tiny()
        trainable = {"lora": {"layers_7/attn/q_proj": {}, "layers_0/attn/query": {}}, "head": {}}
        with self.assertRaisesRegex(ValueError, "layers_0/attn/query.*layers_7/attn/q_proj"):
            model.apply(model.base, trainable, _batch())

    def test_batch_without_loss_mask_raises(self):
        model = _tiny()
        batch = {k: v for k, v in _batch().items() if k != "loss_mask"}
        with self.assertRaisesRegex(ValueError, "loss_mask"):
            model.apply(model.base, model.trainable, batch)


class ConfigTest(parameterized.TestCase):
    def test_rope_theta_from_either_place(self):
        self.assertEqual(decoder.rope_theta({"rope_theta": 5e5}), 5e5)
        new = {"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}
        self.assertEqual(decoder.rope_theta(new), 1e5)
        self.assertEqual(decoder.rope_theta({}), 10000.0)

    @parameterized.parameters(
        {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}},
        {"rope_scaling": {"type": "yarn", "factor": 4.0}, "rope_theta": 1e4},
    )
    def test_unsupported_rope_type_is_named(self, **extra):
        name = (extra.get("rope_parameters") or extra.get("rope_scaling")).get(
            "rope_type", extra.get("rope_scaling", {}).get("type")
        )
        with self.assertRaisesRegex(ValueError, f"rope_type '{name}' is not supported"):
            models.build_random(dict(_config(), **extra))

    def test_unsupported_features_are_named(self):
        cases = (({"attention_bias": True}, "attention_bias"),
                 ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
                 ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"))  # fmt: skip
        for extra, msg in cases:
            with self.assertRaisesRegex(ValueError, msg):
                decoder.parse_config(dict(_config(), **extra))

    def test_head_dim_from_config(self):
        cfg = decoder.parse_config(dict(_config(), head_dim=32))
        self.assertEqual((cfg.head_dim, cfg.num_heads), (32, 4))
        model = models.build_random(dict(_config(), head_dim=32), lora=models.LoraSpec(rank=2))
        chex.assert_shape(model.base["layers"]["attn"]["q_proj"]["kernel"], (2, 64, 128))
        chex.assert_shape(model.trainable["lora"]["layers_0/attn/v_proj"]["B"], (64, 2))


# ------------------------------------------------------------- no [b, T, vocab] float32


def _f32_shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in m.group(1).split(","))
            for m in re.finditer(r"f32\[([0-9]+(?:,[0-9]+)*)\]", text)]  # fmt: skip


class NoFullLogitsTest(parameterized.TestCase):
    """Training never holds the ``[b, T, vocab]`` float32 logits of a whole batch: the
    compiled forward and backward programs hold at most one chunk of them."""

    B, T, V = 2, 256, 32768

    def _compiled(self, budget: int) -> list[str]:
        config = _config(vocab_size=self.V)
        model = models.build_random(config, lora=models.LoraSpec(rank=4),
                                    loss_chunk_elements=budget)  # fmt: skip
        batch = _batch(b=self.B, L=self.T, vocab=self.V)

        def loss(trainable):
            nll, tokens = model.apply(model.base, trainable, batch)
            return jnp.sum(nll) / jnp.sum(tokens)

        programs = (jax.jit(loss), jax.jit(jax.value_and_grad(loss)))
        return [f.lower(model.trainable).compile().as_text() for f in programs]

    def _vocab_buffers(self, text):
        return [s for s in _f32_shapes(text) if self.V in s and np.prod(s) > self.V * 64]

    def test_at_most_one_chunk_of_logits(self):
        budget = decoder.LOSS_CHUNK_ELEMENTS
        chunk = decoder.chunk_length(self.B, self.T, self.V, budget)
        self.assertLess(chunk, self.T)  # the case really is chunked
        for text in self._compiled(budget):
            found = self._vocab_buffers(text)
            self.assertNotIn((self.B, self.T, self.V), found)
            self.assertTrue(found)  # the logits of one chunk are there
            self.assertLessEqual(max(int(np.prod(s)) for s in found), budget)

    def test_check_sees_full_logits(self):  # the check can fail: one chunk is everything
        for text in self._compiled(1 << 30):
            self.assertIn((self.B, self.T, self.V), self._vocab_buffers(text))


# ---------------------------------------------------------------------- generation


class GenerateTest(chex.TestCase):
    def _prompts(self):
        rng = np.random.default_rng(7)
        ids = rng.integers(3, 512, size=(3, 6)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[1, :2], mask[2, :4] = 0, 0  # left padding
        ids[mask == 0] = 0
        return ids, mask

    def test_greedy_equals_argmax_of_full_forward(self):
        model = _tiny()
        adapters = _randomize_B(model.trainable, 1)["lora"]
        ids, mask = self._prompts()
        new = decoder.generate(model, model.base, adapters, ids, mask, max_new_tokens=5,
                               eos_ids=())  # fmt: skip
        chex.assert_shape(new, (3, 5))
        self.assertEqual(new.dtype, jnp.int32)
        seq, seq_mask = ids, mask  # re-run the whole sequence each step, no cache
        for t in range(5):
            logits = decoder.logits(model.config, model.base, adapters, seq, seq_mask,
                                    lora_scale=model.lora_scale)  # fmt: skip
            nxt = np.asarray(jnp.argmax(logits[:, -1], -1), np.int32)
            np.testing.assert_array_equal(new[:, t], nxt)
            seq = np.concatenate([seq, nxt[:, None]], 1)
            seq_mask = np.concatenate([seq_mask, np.ones((3, 1), np.int32)], 1)

    def test_rows_stop_at_eos_and_emit_pad(self):
        model = _tiny()
        ids, mask = self._prompts()
        free = decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=6, eos_ids=())
        eos = int(free[0, 2])  # row 0 emits it at step 2 (maybe others too)
        stopped = decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=6,
                                   eos_ids=(eos,), pad_id=511)  # fmt: skip
        for row in range(3):
            hits = np.flatnonzero(np.asarray(free[row]) == eos)
            end = hits[0] + 1 if len(hits) else 6
            np.testing.assert_array_equal(stopped[row, :end], free[row, :end])
            self.assertTrue(np.all(np.asarray(stopped[row, end:]) == 511))
        self.assertEqual(int(stopped[0, 3]), 511)

    def test_sampling(self):
        model = _tiny()
        ids, mask = self._prompts()

        def sample(seed, temperature=1.0):
            return decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=8,
                                    eos_ids=(), temperature=temperature,
                                    key=jax.random.key(seed))  # fmt: skip

        chex.assert_trees_all_equal(sample(1), sample(1))  # the key decides
        self.assertTrue(np.any(np.asarray(sample(1)) != np.asarray(sample(2))))
        greedy = decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=8, eos_ids=())
        chex.assert_trees_all_equal(sample(3, temperature=1e-4), greedy)  # cold = greedy
        with self.assertRaisesRegex(ValueError, "needs a key"):
            decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=2,
                             temperature=1.0)  # fmt: skip


# ---------------------------------------------------------------------- loading


def test_save_then_load_round_trip(tmp_path):
    model = _tiny(lora=models.LoraSpec(rank=4))
    models.save_pretrained(model, tmp_path)
    keys = loading.checkpoint_index(tmp_path)
    assert "model.layers.1.self_attn.q_proj.weight" in keys
    assert keys["model.layers.1.self_attn.k_proj.weight"][1] == (32, 64)  # [d_out, d_in]
    again = models.load_pretrained(tmp_path, lora=models.LoraSpec(rank=4))
    chex.assert_trees_all_equal(again.base, model.base)  # bit-exact
    assert again.trainable["head"] == {}


def _folder_with(folder, edit):
    """A saved tiny model whose tensors ``edit`` changed."""
    from safetensors.numpy import load_file, save_file

    models.save_pretrained(_tiny(lora=models.LoraSpec(rank=4)), folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_missing_unexpected_and_misshapen_are_named(tmp_path):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.q_norm.weight"] = np.ones(4, np.float32)
        t["model.norm.weight"] = np.ones(65, np.float32)
        t["model.layers.1.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # unused

    with pytest.raises(ValueError, match="the llama model") as info:
        models.load_pretrained(_folder_with(tmp_path, edit))
    text = str(info.value)
    assert "missing keys: model.layers.1.mlp.up_proj.weight" in text
    assert "unexpected keys: model.layers.0.self_attn.q_norm.weight" in text
    assert "model.norm.weight (65,) (model expects (64,))" in text
    assert "inv_freq" not in text


def test_untied_model_needs_lm_head(tmp_path):
    folder = _folder_with(tmp_path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="missing keys: lm_head.weight"):
        models.load_pretrained(folder)


# ---------------------------------------------------------------- parity with PyTorch


def _torch():
    torch = pytest.importorskip("torch", reason="torch not installed: no PyTorch reference")
    pytest.importorskip("transformers", reason="transformers not installed")
    return torch


def _torch_model(config: dict, seed: int = 0):
    torch = _torch()
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_cls, model_cls = classes[config["model_type"]]
    torch.manual_seed(seed)
    hf = config_cls(**{k: v for k, v in config.items() if k != "model_type"})
    hf._attn_implementation = "eager"
    return model_cls(hf).eval()


def _torch_logits(ref, batch) -> np.ndarray:
    torch = _torch()
    with torch.no_grad():
        return ref(
            input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=torch.as_tensor(batch["attention_mask"], dtype=torch.long),
        ).logits.numpy()


PARITY_CASES = {
    "llama_gqa_untied": _config(),
    "llama_gqa_tied": _config(tie_word_embeddings=True),
    "llama_rope_parameters_head_dim": dict(
        {k: v for k, v in _config().items() if k != "rope_theta"},
        rope_parameters={"rope_theta": 500.0, "rope_type": "default"}, head_dim=32,
    ),
    "mistral_sliding_window": _config("mistral", sliding_window=5),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_parity_tiny_random_with_transformers(case, tmp_path):
    ref = _torch_model(PARITY_CASES[case])
    ref.save_pretrained(tmp_path)
    batch = _batch(b=3, L=16)
    want = _torch_logits(ref, batch)
    model = models.load_pretrained(tmp_path)
    got = decoder.logits(model.config, model.base, {}, batch["input_ids"],
                         batch["attention_mask"])  # fmt: skip
    real = batch["attention_mask"] > 0  # padded positions' outputs are unused on both sides
    assert np.abs(want).max() > 0.5  # logits of order 1: the tolerance bites
    diff = np.abs(np.asarray(got) - want)[real].max()
    print(f"{case}: max |logits - torch| = {diff:.2e}")
    assert diff < 1e-5


def test_parity_lora_with_merged_torch_weights(tmp_path):
    torch = _torch()
    ref = _torch_model(_config())
    ref.save_pretrained(tmp_path)
    model = models.load_pretrained(tmp_path, lora=models.LoraSpec(rank=4, alpha=8.0))
    adapters = _randomize_B(model.trainable, 5, std=0.3)["lora"]
    s = model.lora_scale
    with torch.no_grad():
        for name, a in adapters.items():
            i, target = int(name.split("/")[0].removeprefix("layers_")), name.split("/")[-1]
            weight = getattr(ref.model.layers[i].self_attn, target).weight
            weight += torch.from_numpy(np.array(lora.delta(a, s)))
    batch = _batch(b=3, L=16)
    want = _torch_logits(ref, batch)
    got = decoder.logits(model.config, model.base, adapters, batch["input_ids"],
                         batch["attention_mask"], lora_scale=s)  # fmt: skip
    bare = decoder.logits(model.config, model.base, {}, batch["input_ids"],
                          batch["attention_mask"])  # fmt: skip
    real = batch["attention_mask"] > 0
    assert np.abs(np.asarray(bare) - want)[real].max() > 1e-2  # the adapters matter
    diff = np.abs(np.asarray(got) - want)[real].max()
    print(f"lora: max |logits - torch(W + sBA)| = {diff:.2e}")
    assert diff < 1e-5


def _left_padded_prompts(vocab: int, lengths=(7, 4, 2), seed: int = 11):
    rng = np.random.default_rng(seed)
    P = max(lengths)
    ids = np.zeros((len(lengths), P), np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, P - n :] = rng.integers(3, vocab, n)
        mask[i, P - n :] = 1
    return ids, mask


def _torch_generate(ref, ids, mask, max_new, eos, pad) -> np.ndarray:
    torch = _torch()
    with torch.no_grad():
        out = ref.generate(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_new_tokens=max_new, do_sample=False, eos_token_id=list(eos), pad_token_id=pad,
        )  # fmt: skip
    new = out[:, ids.shape[1] :].numpy()
    return np.pad(new, ((0, 0), (0, max_new - new.shape[1])), constant_values=pad)


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_generation_equals_transformers(tied, tmp_path):
    _torch()
    ref = _torch_model(_config(tie_word_embeddings=tied), seed=1)
    ref.save_pretrained(tmp_path)
    model = models.load_pretrained(tmp_path)
    ids, mask = _left_padded_prompts(512)
    free = decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=10, eos_ids=())
    eos = (int(free[1, 4]),)  # a token row 1 emits: one row stops early on both sides
    want = _torch_generate(ref, ids, mask, 10, eos, pad=0)
    got = decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=10, eos_ids=eos,
                           pad_id=0)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got), want)
    assert np.any(want == 0)  # some row stopped


# --------------------------------------------------------- a real checkpoint: SmolLM2


@pytest.fixture(scope="module")
def smollm2_dir(request, tmp_path_factory, smollm2_gguf):
    """SmolLM2-135M-Instruct's GGUF, dequantized by transformers and saved as safetensors
    (a reference independent of floranna_jax's own converter). The conversion takes a
    minute and a half, so its result is kept in pytest's cache, keyed by the file."""
    gguf = smollm2_gguf
    _torch()
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read GGUF")
    import transformers

    stat = gguf.stat()
    name = f"smollm2-135m-hf-{stat.st_size}-{int(stat.st_mtime)}-{transformers.__version__}"
    folder = request.config.cache.mkdir(name)
    if (folder / "model.safetensors").is_file():
        return folder
    quantized = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)  # a GGUF-loaded model refuses to save itself
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(config))
    ref.load_state_dict(quantized.state_dict(), strict=True)
    partial = tmp_path_factory.mktemp("smollm2")
    ref.save_pretrained(partial, safe_serialization=True)
    for file in ("config.json", "model.safetensors"):  # the weights last: they mark it done
        (partial / file).replace(folder / file)
    return folder


@pytest.mark.slow
def test_parity_smollm2_with_transformers(smollm2_dir):
    import transformers

    ref = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir).eval()
    model = models.load_pretrained(smollm2_dir)
    assert model.config["tie_word_embeddings"] and "lm_head" not in model.base
    batch = _batch(b=2, L=24, vocab=49152)
    want = _torch_logits(ref, batch)
    got = decoder.logits(model.config, model.base, {}, batch["input_ids"],
                         batch["attention_mask"])  # fmt: skip
    real = batch["attention_mask"] > 0
    diff = np.abs(np.asarray(got) - want)[real].max()
    print(f"SmolLM2-135M: max |logits - torch| = {diff:.2e} (|logits| <= {np.abs(want).max():.0f})")
    # 30 fp32 layers, logits up to ~30: op-order differences add up to a few 1e-4
    assert diff < 1e-3
    ids, mask = _left_padded_prompts(49152, lengths=(9, 5))
    want_new = _torch_generate(ref, ids, mask, 6, (2,), pad=2)
    got_new = decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=6, eos_ids=(2,))
    np.testing.assert_array_equal(np.asarray(got_new), want_new)


def test_sharded_checkpoint_loads(tmp_path):
    _torch()
    ref = _torch_model(_config())
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = models.load_pretrained(tmp_path)
    batch = _batch(b=2, L=8)
    got = decoder.logits(model.config, model.base, {}, batch["input_ids"],
                         batch["attention_mask"])  # fmt: skip
    real = batch["attention_mask"] > 0
    assert np.abs(np.asarray(got) - _torch_logits(ref, batch))[real].max() < 1e-5


def test_saved_folder_loads_in_transformers(tmp_path):
    """save_pretrained writes what transformers reads: same logits both sides."""
    _torch()
    import transformers

    model = _tiny(_config(tie_word_embeddings=True), lora=models.LoraSpec(rank=4))
    models.save_pretrained(model, tmp_path)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    batch = _batch(b=2, L=8)
    got = decoder.logits(model.config, model.base, {}, batch["input_ids"],
                         batch["attention_mask"])  # fmt: skip
    real = batch["attention_mask"] > 0
    assert np.abs(np.asarray(got) - _torch_logits(ref, batch))[real].max() < 1e-5
