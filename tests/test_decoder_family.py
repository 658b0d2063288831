"""Tests for floranna_jax.models.decoder: LoRA invariants, the chunked causal-LM loss,
packed batches, the compiled programs (no full-batch logits, one scan), generation."""

import re
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from decoder_cases import (
    ALL_TARGETS,
    jitted,
    max_diff,
    random_batch,
    randomize_B,
    tiny_config,
    tiny_model,
)
from smoke_setup import config_file

from floranna_jax import experiment, lora, models, packing
from floranna_jax.models import decoder
from floranna_jax.models.architecture import split_stacked
from floranna_jax.models.decoder import modules

# One config per family, windows (5) shorter than the rows wherever the family has them;
# the tiny Gemma configs window layer 0 and leave layer 1 full.
WINDOWED_FAMILIES = {
    "llama": tiny_config(),
    "mistral": tiny_config("mistral", sliding_window=5),
    "qwen2": tiny_config("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "qwen3": tiny_config("qwen3"),
    "gemma2": tiny_config("gemma2", attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3_text": tiny_config("gemma3_text"),
    "phi3": tiny_config("phi3", sliding_window=5),
}


def layer_policies(jaxpr) -> list[str]:
    """What each checkpoint region of a decoder's jaxpr keeps for the backward pass:
    ``"saves"`` (the layer's matmul outputs and dropout masks, remat off) or
    ``"recomputes"`` (everything, remat on)."""
    found = []

    def visit(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name.startswith("remat"):  # jax.checkpoint
                policy = eqn.params["policy"]
                kinds = {None: "recomputes", modules.KEEP_FOR_BACKWARD: "saves"}
                found.append(kinds.get(policy, repr(policy)))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return found


class DecoderTest(chex.TestCase):
    def test_adapter_tree_names_and_shapes(self):
        model = tiny_model(lora=models.LoraSpec(rank=4))  # default targets: q_proj, v_proj
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
            tiny_model(lora=models.LoraSpec(targets=("q_proj", "query")))

    @chex.variants(with_jit=True, without_jit=True)
    def test_b_zero_is_exactly_the_base_model(self):
        model = tiny_model()
        apply = self.variant(model.apply)
        batch = random_batch()
        bare = apply(model.base, {"lora": {}, "head": {}}, batch)
        # B = 0 adds exact zeros: bit-identical, no tolerance.
        chex.assert_trees_all_equal(apply(model.base, model.trainable, batch), bare)
        changed = apply(model.base, randomize_B(model.trainable, 1), batch)
        self.assertGreater(max_diff(changed[0], bare[0]), 1e-2)

    @chex.variants(with_jit=True, without_jit=True)
    def test_merged_weights_equal_adapter_forward(self):
        model = tiny_model()
        trainable = randomize_B(model.trainable, 1)
        merges = {n: a["B"] @ a["A"] for n, a in trainable["lora"].items()}
        merged = models.merge_into_base(model.base, merges, model.lora_scale)
        apply = self.variant(model.apply)
        batch = random_batch()
        bare = {"lora": {}, "head": {}}
        adapted = apply(model.base, trainable, batch)
        self.assertGreater(max_diff(adapted[0], apply(model.base, bare, batch)[0]), 1e-2)
        # fp32 reassociation (x@W + s(x@A^T)@B^T vs x@(W + sBA)^T) over 2 layers and a
        # sum of ~30 token losses of O(5): a few 1e-5 relative.
        chex.assert_trees_all_close(apply(merged, bare, batch), adapted, rtol=1e-5, atol=1e-4)

    def test_merge_into_stacked_kernel_touches_one_layer(self):
        model = tiny_model()
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
        model = tiny_model()
        trainable = randomize_B(model.trainable, 2)
        batch = random_batch()
        nll, tokens = jitted(model)(model.base, trainable, batch)
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

    @parameterized.product(softcap=(None, 3.0), axes=("dv", "vd"))
    def test_fused_loss_gradient_equals_autodiff(self, softcap, axes):
        """The loss's hand-written gradient (formed in the forward pass, chunk by chunk)
        equals autodiff of the full logits, with and without a soft-cap, for a head stored
        ``[d, V]`` and for a tied embedding read in place as ``[V, d]``."""
        rng = np.random.default_rng(3)
        h = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
        weights = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
        stored = w if axes == "dv" else w.T

        def full(h):
            logits = modules.soft_cap(h @ w, softcap)
            picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
            return jnp.sum(weights * (jax.nn.logsumexp(logits, axis=-1) - picked))

        def chunked(h):  # 3 positions a chunk: 10 positions pad to 12
            nll = decoder.token_nll(h, stored, y, weights != 0, jnp.float32, 3, softcap, axes)
            return jnp.sum(weights * nll)

        np.testing.assert_allclose(jax.jit(chunked)(h), full(h), rtol=1e-6)
        np.testing.assert_allclose(jax.grad(chunked)(h), jax.grad(full)(h), rtol=1e-5,
                                   atol=1e-6)  # fmt: skip

    def test_loss_computes_only_chunks_with_active_positions(self):
        """Inactive positions (prompt, padding) are moved behind the active ones and their
        chunks are skipped: loss and gradient equal autodiff of the full logits over the
        active positions, even with NaN hidden states where only skipped chunks read them."""
        rng = np.random.default_rng(5)
        h = rng.normal(size=(2, 6, 8)).astype(np.float32)
        w = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 11, (2, 6)), jnp.int32)
        active = np.zeros((2, 6), bool)
        active[0, 4], active[1, [0, 5]] = True, True  # 3 of 12: one chunk of 3 runs
        poisoned = np.where(active[..., None], h, np.nan)  # read by a skipped chunk: NaN
        weights = jnp.asarray(active, jnp.float32)

        def full(h):
            logits = h @ w
            picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
            return jnp.sum(weights * (jax.nn.logsumexp(logits, axis=-1) - picked))

        def chunked(h):
            return jnp.sum(weights * decoder.token_nll(h, w, y, active, jnp.float32, 3))

        nll = jax.jit(decoder.token_nll, static_argnums=(4, 5))(
            jnp.asarray(poisoned), w, y, active, jnp.float32, 3)  # fmt: skip
        self.assertTrue(np.all(np.asarray(nll)[~active] == 0))
        np.testing.assert_allclose(jax.jit(chunked)(poisoned), full(h), rtol=1e-6)
        grad = np.asarray(jax.jit(jax.grad(chunked))(jnp.asarray(poisoned)))
        self.assertTrue(np.all(grad[~active] == 0))
        np.testing.assert_allclose(grad, jax.grad(full)(jnp.asarray(h)), rtol=1e-5, atol=1e-6)

    @parameterized.named_parameters(*WINDOWED_FAMILIES.items())
    def test_packed_equals_padded(self, config):
        model = tiny_model(config)
        trainable = randomize_B(model.trainable, 3)
        arrays = random_batch(b=6, L=32, seed=4, lengths=(30, 9, 13, 6, 19, 11))
        take = np.array([[0, 1, 2, 3, 4, 5]])
        real = np.array([[True, True, True, True, True, False]])
        packed = {k: v[0] for k, v in packing.batches(arrays, take, real,
                                                      packing.layout(arrays)).items()}  # fmt: skip
        self.assertLess(packed["input_ids"].shape[0], 5)  # rows really shared
        padded = {k: v[take[0]] for k, v in arrays.items()}
        nll_pad, tok_pad = jitted(model)(model.base, trainable, padded)
        nll_pack, tok_pack = jitted(model)(model.base, trainable, packed)
        real_rows = real[0]
        chex.assert_trees_all_equal(tok_pack[real_rows], tok_pad[real_rows])
        chex.assert_trees_all_equal(tok_pack[~real_rows], jnp.zeros(1))
        # same math on the same tokens; only summation lengths and orders differ (sums near
        # 70, whose float32 spacing is 8e-6)
        np.testing.assert_allclose(nll_pack[real_rows], nll_pad[real_rows], rtol=1e-6,
                                   atol=1e-5)  # fmt: skip
        self.assertEqual(float(nll_pack[~real_rows][0]), 0.0)

    @parameterized.named_parameters(
        ("llama", tiny_config()), ("mistral", WINDOWED_FAMILIES["mistral"])
    )
    def test_query_chunks_change_no_loss_or_gradient(self, config):
        model = tiny_model(config)
        trainable = randomize_B(model.trainable, 3)
        batch = random_batch(b=3, L=32, seed=5)

        def run(chunk):  # a fresh trace reads the patched chunk length
            with mock.patch.object(modules, "QUERY_CHUNK", chunk):
                loss = lambda t: jnp.sum(model.apply(model.base, t, batch)[0])  # noqa: E731
                text = jax.jit(loss).lower(trainable).as_text()
                return jax.jit(jax.value_and_grad(loss))(trainable), text.count("dot_general")

        (chunked, dots_chunked), (whole, dots_whole) = run(8), run(1000)
        self.assertGreater(dots_chunked, dots_whole)  # 4 chunks of 8 queries really ran
        # the same softmax over the same keys; only summation orders differ (gradient entries
        # up to 20, float32 spacing 2e-6, summed over 32 positions and 2 layers)
        chex.assert_trees_all_close(chunked, whole, rtol=1e-5, atol=1e-4)

    def test_bf16_compute_close_to_fp32(self):
        f32 = tiny_model()
        b16 = tiny_model(compute_dtype=jnp.bfloat16)
        self.assertTrue(all(x.dtype == jnp.float32 for x in jax.tree.leaves(b16.base)))
        trainable = randomize_B(f32.trainable, 1)
        batch = random_batch()
        out32 = jitted(f32)(f32.base, trainable, batch)[0]
        out16 = jitted(b16)(b16.base, trainable, batch)[0]
        self.assertEqual(out16.dtype, jnp.float32)
        self.assertGreater(max_diff(out16, out32), 0.0)  # bf16 really ran
        # bf16 keeps 8 mantissa bits (~4e-3 relative per op); sums of ~8 token losses
        # of O(5) over 2 layers drift by well under 1%.
        np.testing.assert_allclose(out16, out32, rtol=1e-2)

    def test_remat_same_loss_and_grads(self):
        plain, remat = tiny_model(), tiny_model(remat=True)
        trainable = randomize_B(plain.trainable, 1)
        batch = random_batch()

        def grads(model):
            def loss(t):
                nll, tokens = model.apply(model.base, t, batch)
                return jnp.sum(nll) / jnp.sum(tokens)

            return jax.jit(jax.value_and_grad(loss))(trainable)

        # recomputation runs the same ops again: equal up to XLA fusion differences
        # (gradients of O(0.3); fp32 differences of a few 1e-7 absolute)
        chex.assert_trees_all_close(grads(remat), grads(plain), rtol=1e-4, atol=1e-5)
        jaxprs = [jax.make_jaxpr(m.apply)(m.base, trainable, batch) for m in (plain, remat)]
        self.assertEqual(list(map(layer_policies, jaxprs)), [["saves"], ["recomputes"]])

    def test_remat_reached_from_the_config(self):
        batch = random_batch()
        counts = []  # the layer's checkpoint region, by what it keeps
        for remat in (False, True):
            config = config_file("gsm8k.py", **{"model.remat": remat})
            model = experiment.build_model(config, 0, jax.random.key(0))
            jaxpr = jax.make_jaxpr(model.apply)(model.base, model.trainable, batch)
            counts.append(layer_policies(jaxpr))
        self.assertEqual(counts, [["saves"], ["recomputes"]])

    def test_vmap_over_stacked_trainable_equals_loop(self):
        model = tiny_model()
        clients = [randomize_B(model.trainable, i) for i in range(3)]
        stacked = jax.tree.map(lambda *x: jnp.stack(x), *clients)
        batch = random_batch()
        vmapped = jax.jit(jax.vmap(model.apply, in_axes=(None, 0, None)))(
            model.base, stacked, batch
        )
        looped = [jitted(model)(model.base, t, batch) for t in clients]
        looped = jax.tree.map(lambda *x: jnp.stack(x), *looped)
        chex.assert_shape(vmapped[0], (3, 4))
        chex.assert_trees_all_close(vmapped, looped, rtol=1e-5, atol=1e-5)  # same math

    def test_jit_traces_once(self):
        model = tiny_model()

        # (chex keys its trace counter by source: this body must differ from test_models')
        @jax.jit
        @chex.assert_max_traces(n=1)
        def loss_sums(base, trainable, batch):
            return model.apply(base, trainable, batch)

        loss_sums(model.base, model.trainable, random_batch())
        loss_sums(model.base, randomize_B(model.trainable, 2), random_batch(seed=1))

    def test_program_size_does_not_grow_with_depth(self):
        # one scan over stacked layers: 8 layers lower to the same matmuls as 2 (only the
        # per-layer adapters' stacking grows, by a few ops per layer)
        counts = []
        for n in (2, 8):
            model = models.build_random(
                tiny_config(num_hidden_layers=n), lora=models.LoraSpec(rank=4)
            )
            text = jax.jit(model.apply).lower(model.base, model.trainable, random_batch()).as_text()
            counts.append((text.count("dot_general"), text.count("stablehlo.while")))
        self.assertEqual(counts[0], counts[1])
        self.assertGreater(counts[0][0], 9)  # the layer's 9 matmuls are in there, once

    def test_dropout(self):
        spec = models.LoraSpec(rank=4, targets=ALL_TARGETS, dropout=0.2)
        model = tiny_model(tiny_config(attention_dropout=0.1), lora=spec)
        trainable = randomize_B(model.trainable, 1)
        batch = random_batch()
        apply = jitted(model)
        clean = apply(model.base, trainable, batch)[0]

        def noisy(seed):
            key = jax.random.key(seed)
            return apply(model.base, trainable, batch, deterministic=False, dropout_key=key)[0]

        chex.assert_trees_all_equal(noisy(3), noisy(3))  # the key decides
        self.assertGreater(max_diff(noisy(3), noisy(4)), 1e-3)
        self.assertGreater(max_diff(noisy(3), clean), 1e-3)
        with self.assertRaisesRegex(ValueError, "dropout_key"):
            model.apply(model.base, trainable, batch, deterministic=False)

    def test_lora_dropout_masks_rate_and_scale(self):
        """16-bit draws: the drop rate is the asked one and the scaled masks average 1."""
        cfg = decoder.parse_config(tiny_config())
        ctx = modules.Context(None, None, None, jnp.float32, 1.0, dropout=(0.2, 0.0))
        adapters = {"attn/q_proj": {}, "attn/v_proj": {}}
        masks = modules.lora_dropout_masks(cfg, ctx, adapters, jax.random.key(0), 64, 33)
        q, v = np.asarray(masks["q_proj"]), np.asarray(masks["v_proj"])
        self.assertEqual(q.shape, (64, 33, cfg.hidden_size))
        for m in (q, v):
            self.assertAlmostEqual(float((m == 0).mean()), 0.2, delta=0.01)
            self.assertAlmostEqual(float(m.mean()), 1.0, delta=0.015)
        self.assertAlmostEqual(float(((q == 0) & (v == 0)).mean()), 0.04, delta=0.005)

    def test_unknown_adapter_name_raises(self):
        model = tiny_model()
        trainable = {"lora": {"layers_7/attn/q_proj": {}, "layers_0/attn/query": {}}, "head": {}}
        with self.assertRaisesRegex(ValueError, "layers_0/attn/query.*layers_7/attn/q_proj"):
            model.apply(model.base, trainable, random_batch())

    def test_batch_without_loss_mask_raises(self):
        model = tiny_model()
        batch = {k: v for k, v in random_batch().items() if k != "loss_mask"}
        with self.assertRaisesRegex(ValueError, "loss_mask"):
            model.apply(model.base, model.trainable, batch)


# ------------------------------------------------------------- no [b, T, vocab] float32


def _f32_shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in m.group(1).split(","))
            for m in re.finditer(r"f32\[([0-9]+(?:,[0-9]+)*)\]", text)]  # fmt: skip


class NoFullLogitsTest(parameterized.TestCase):
    """Training never holds the ``[b, T, vocab]`` float32 logits of a whole batch: the
    compiled forward and backward programs hold at most one chunk of them."""

    B, T, V = 2, 256, 32768

    def _compiled(self, budget: int, forward: bool = True) -> list[str]:
        config = tiny_config(vocab_size=self.V)
        model = models.build_random(config, lora=models.LoraSpec(rank=4),
                                    loss_chunk_elements=budget)  # fmt: skip
        batch = random_batch(b=self.B, L=self.T, vocab=self.V)

        def loss(trainable):
            nll, tokens = model.apply(model.base, trainable, batch)
            return jnp.sum(nll) / jnp.sum(tokens)

        programs = (jax.jit(loss),) * forward + (jax.jit(jax.value_and_grad(loss)),)
        return [f.lower(model.trainable).compile().as_text() for f in programs]

    def _vocab_buffers(self, text):
        return [s for s in _f32_shapes(text) if self.V in s and np.prod(s) > self.V * 64]

    def test_at_most_one_chunk_of_logits(self):
        budget = decoder.LOSS_CHUNK_ELEMENTS // 4  # these shapes fit the default in one chunk
        chunk = decoder.chunk_length(self.B, self.T, self.V, budget)
        self.assertLess(chunk, self.B * self.T)  # the case really is chunked
        for text in self._compiled(budget):
            found = self._vocab_buffers(text)
            self.assertLess(max(int(np.prod(s)) for s in found), self.B * self.T * self.V)
            self.assertTrue(found)  # the logits of one chunk are there
            self.assertLessEqual(max(int(np.prod(s)) for s in found), budget)

    def test_check_sees_full_logits(self):  # the check can fail: one chunk is everything
        for text in self._compiled(1 << 30, forward=False):
            self.assertIn((self.B * self.T, self.V), self._vocab_buffers(text))


# ---------------------------------------------------------------------- generation


class GenerateTest(chex.TestCase):
    def _prompts(self):
        rng = np.random.default_rng(7)
        ids = rng.integers(3, 512, size=(3, 6)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[1, :2], mask[2, :4] = 0, 0  # left padding
        ids[mask == 0] = 0
        return ids, mask

    @parameterized.product(family=tuple(WINDOWED_FAMILIES), base_dtype=("float32", "bfloat16"))
    def test_greedy_equals_argmax_of_full_forward(self, family, base_dtype):
        """With a float32 base the token loop runs the layers unrolled, with any other a
        scan over the stacked layers; both decode what the full forward's argmax gives."""
        model = tiny_model(WINDOWED_FAMILIES[family])
        base = jax.tree.map(lambda w: w.astype(base_dtype), model.base)
        adapters = randomize_B(model.trainable, 1)["lora"]
        ids, mask = self._prompts()
        new = decoder.generate(model, base, adapters, ids, mask, max_new_tokens=3, eos_ids=())
        chex.assert_shape(new, (3, 3))
        self.assertEqual(new.dtype, jnp.int32)
        # One causal forward, no cache, over the prompts and the first two new tokens: the
        # argmax at the prompt's last position and at each new token is the next new token.
        seq = np.concatenate([ids, np.asarray(new[:, :2])], 1)
        seq_mask = np.concatenate([mask, np.ones((3, 2), np.int32)], 1)
        logits = decoder.logits(model.config, base, adapters, seq, seq_mask,
                                lora_scale=model.lora_scale)  # fmt: skip
        np.testing.assert_array_equal(new, np.argmax(logits[:, -3:], -1))

    def test_rows_stop_at_eos_and_emit_pad(self):
        model = tiny_model()
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

    def test_rows_stop_after_a_stop_sequence(self):
        model = tiny_model()
        ids, mask = self._prompts()
        free = np.asarray(decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=8,
                                           eos_ids=()))  # fmt: skip
        stop = [int(t) for t in free[0, 1:3]]  # row 0 ends with it at step 2 (maybe others too)
        never = [600, 601, 602]  # ids past the vocabulary: a longer sequence that never matches
        stopped = np.asarray(decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=8,
                                              eos_ids=(), stop_ids=[never, stop],
                                              pad_id=511))  # fmt: skip
        for row in range(3):
            ends = [t + 1 for t in range(1, 8) if list(free[row, t - 1 : t + 1]) == stop]
            end = ends[0] if ends else 8
            np.testing.assert_array_equal(stopped[row, :end], free[row, :end])
            self.assertTrue(np.all(stopped[row, end:] == 511))
        self.assertTrue(np.all(stopped[0, 3:] == 511))
        with self.assertRaisesRegex(ValueError, "at least one token"):
            decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=2, stop_ids=[[]])

    def test_sampling(self):
        model = tiny_model()
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
