"""Decoder family records: config parsing, and every family against transformers'
PyTorch implementation on tiny random configs whose special features bite (sliding
windows shorter than the rows, small soft-caps, noisy norm weights and biases): logits,
logits with LoRA applied by PEFT under the module names the family record gives, and
greedy generation.

The parity tests skip, with the reason, when torch, transformers or peft is absent.
"""

import chex
import numpy as np
import pytest
from absl.testing import parameterized
from decoder_cases import (
    left_padded_prompts,
    random_batch,
    randomize_B,
    tiny_config,
    torch_generate,
    torch_logits,
    torch_model,
    torch_or_skip,
)

from floranna_jax import models
from floranna_jax.models import decoder
from floranna_jax.models.decoder import rotary


class ConfigTest(parameterized.TestCase):
    def test_rope_theta_from_either_place(self):
        self.assertEqual(rotary.from_config({"rope_theta": 5e5}).theta, 5e5)
        new = {"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}
        self.assertEqual(rotary.from_config(new), rotary.Rope(1e5))
        self.assertEqual(rotary.from_config({}).theta, 10000.0)

    def test_gemma3_tables_from_old_or_nested_fields(self):
        old = {"rope_theta": 1e6, "rope_local_base_freq": 1e4,
               "rope_scaling": {"rope_type": "linear", "factor": 8.0}}  # fmt: skip
        nested = {"rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}  # fmt: skip
        want = (rotary.Rope(1e6, "linear", 8.0), rotary.Rope(1e4))
        self.assertEqual(rotary.per_layer_type(old, 0.0, 0.0), want)
        self.assertEqual(rotary.per_layer_type(nested, 0.0, 0.0), want)

    @parameterized.parameters(
        {"rope_parameters": {"rope_theta": 5e5, "rope_type": "longrope", "factor": 8.0}},
        {"rope_scaling": {"type": "yarn", "factor": 4.0}, "rope_theta": 1e4},
    )
    def test_unsupported_rope_type_is_named(self, **extra):
        name = (extra.get("rope_parameters") or extra.get("rope_scaling")).get(
            "rope_type", extra.get("rope_scaling", {}).get("type")
        )
        with self.assertRaisesRegex(ValueError, f"rope_type '{name}' is not supported"):
            models.build_random(dict(tiny_config(), **extra))

    def test_llama3_rope_needs_its_parameters(self):
        rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
        with self.assertRaisesRegex(ValueError, "lacks 'low_freq_factor'"):
            decoder.parse_config(dict(tiny_config(), rope_parameters=rope))

    def test_unsupported_features_are_named(self):
        cases = (({"mlp_bias": True}, "mlp_bias"),
                 ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
                 ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
                 ({"model_type": "gemma2", "use_bidirectional_attention": True},
                  "use_bidirectional_attention"),
                 ({"model_type": "gemma2", "layer_types": ["full_attention"]},
                  "layer_types must list 2"))  # fmt: skip
        for extra, msg in cases:
            with self.assertRaisesRegex(ValueError, msg):
                decoder.parse_config(dict(tiny_config(), **extra))

    def test_absent_fields_mean_transformers_defaults(self):
        bare = {k: v for k, v in tiny_config("gemma2").items()
                if k not in ("head_dim", "sliding_window", "query_pre_attn_scalar")}  # fmt: skip
        cfg = decoder.parse_config(bare)
        self.assertEqual((cfg.head_dim, cfg.query_scale), (256, 256**-0.5))
        self.assertEqual((cfg.attn_softcap, cfg.final_softcap), (50.0, 30.0))
        self.assertEqual(cfg.layer_windows, (4096, None))  # layer_types from the tiny config
        qwen = decoder.parse_config(dict(tiny_config("qwen2"), use_sliding_window=True,
                                         sliding_window=8, max_window_layers=1))  # fmt: skip
        self.assertEqual(qwen.layer_windows, (None, 8))

    def test_random_norms_start_at_weight_one(self):
        # Gemma's norms multiply by 1 + weight: a fresh one stores 0, the others 1
        for model_type, stored in (("llama", 1.0), ("gemma2", 0.0), ("gemma3_text", 0.0)):
            base = models.build_random(tiny_config(model_type)).base
            np.testing.assert_array_equal(base["norm"]["scale"], stored)
            np.testing.assert_array_equal(base["layers"]["post_attn_norm"]["scale"], stored)

    def test_head_dim_from_config(self):
        cfg = decoder.parse_config(dict(tiny_config(), head_dim=32))
        self.assertEqual((cfg.head_dim, cfg.num_heads), (32, 4))
        model = models.build_random(dict(tiny_config(), head_dim=32), lora=models.LoraSpec(rank=2))
        chex.assert_shape(model.base["layers"]["attn"]["q_proj"]["kernel"], (2, 64, 128))
        chex.assert_shape(model.trainable["lora"]["layers_0/attn/v_proj"]["B"], (64, 2))


# ---------------------------------------------------------------- parity with PyTorch

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # fmt: skip
CASES = {
    # wavelengths 6, 32, 166, ...: one kept, one blended, the rest stretched
    "llama3_rope": tiny_config(rope_parameters=LLAMA3_ROPE),
    "qwen2": tiny_config("qwen2"),
    "qwen2_sliding": tiny_config("qwen2", use_sliding_window=True, sliding_window=5,
                                 max_window_layers=1),  # fmt: skip
    "qwen3": tiny_config("qwen3"),
    "gemma2_softcaps": tiny_config("gemma2", attn_logit_softcapping=2.0,
                                   final_logit_softcapping=3.0),  # fmt: skip
    "gemma2_tied": tiny_config("gemma2", tie_word_embeddings=True),
    "gemma3_text_linear_rope": tiny_config("gemma3_text",
                                           rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "phi3": tiny_config("phi3"),
    "phi3_sliding": tiny_config("phi3", sliding_window=5),
}  # fmt: skip
NOISE = 0.1  # on norm weights and biases, so a misread offset or bias shows


def _real(batch):
    return batch["attention_mask"] > 0  # padded positions' outputs are unused on both sides


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """case -> (torch reference, folder it saved), built once per case on demand."""
    cache = {}

    def get(case):
        if case not in cache:
            ref = torch_model(CASES[case], seed=1, vector_noise=NOISE)
            folder = tmp_path_factory.mktemp(case)
            ref.save_pretrained(folder)
            cache[case] = (ref, folder)
        return cache[case]

    return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_tokens_equal_transformers(case, folders):
    ref, folder = folders(case)
    model = models.load_pretrained(folder)
    batch = random_batch(b=3, L=16)
    want = torch_logits(ref, batch)
    got = decoder.logits(model.config, model.base, {}, batch["input_ids"],
                         batch["attention_mask"])  # fmt: skip
    assert np.abs(want).max() > 0.5  # logits of order 1: the tolerance bites
    diff = np.abs(np.asarray(got) - want)[_real(batch)].max()
    print(f"{case}: max |logits - torch| = {diff:.2e}")
    assert diff < 1e-5
    ids, mask = left_padded_prompts(512)  # 7 + 10 positions: past every window of 5
    # A token row 1 emits with no stop (an id past the vocabulary never comes): one row
    # stops early on both sides.
    eos = (int(torch_generate(ref, ids, mask, 10, (10**6,), pad=0)[1, 4]),)
    want_new = torch_generate(ref, ids, mask, 10, eos, pad=0)
    got_new = decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=10,
                               eos_ids=eos, pad_id=0)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got_new), want_new)


FAMILY_CASES = ("llama3_rope", "qwen2_sliding", "qwen3", "gemma2_softcaps",
                "gemma3_text_linear_rope", "phi3_sliding")  # fmt: skip


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_lora_equals_peft_on_the_named_modules(case, folders):
    """Our adapters, copied into PEFT's LoRA on ``family.module_name(layer_name)`` for
    every target of the family (Phi-3: the fused ones), give the same logits; PEFT's
    state-dict keys are the documented ``base_model.model.<module>.lora_A.weight``."""
    torch = torch_or_skip()
    peft = pytest.importorskip("peft", reason="peft not installed")
    ref, folder = folders(case)
    family = decoder.get_family(CASES[case]["model_type"])
    spec = models.LoraSpec(rank=4, alpha=8.0, targets=family.targets)
    model = models.load_pretrained(folder, lora=spec)
    adapters = randomize_B(model.trainable, 5, std=0.3)["lora"]
    config = peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=list(family.targets),
                             lora_dropout=0.0)  # fmt: skip
    tuned = peft.get_peft_model(ref, config).eval()
    keys = set(peft.get_peft_model_state_dict(tuned))
    with torch.no_grad():
        for name, a in adapters.items():
            module = family.module_name(name)
            assert f"base_model.model.{module}.lora_A.weight" in keys
            layer = tuned.base_model.model.get_submodule(module)
            layer.lora_A["default"].weight.copy_(torch.from_numpy(np.array(a["A"])))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(np.array(a["B"])))
    assert len(keys) == 2 * len(adapters)  # PEFT adapted exactly our layers
    batch = random_batch(b=3, L=16)
    want = torch_logits(tuned, batch)
    got = decoder.logits(model.config, model.base, adapters, batch["input_ids"],
                         batch["attention_mask"], lora_scale=model.lora_scale)  # fmt: skip
    bare = decoder.logits(model.config, model.base, {}, batch["input_ids"],
                          batch["attention_mask"])  # fmt: skip
    real = _real(batch)
    assert np.abs(np.asarray(bare) - want)[real].max() > 1e-2  # the adapters matter
    diff = np.abs(np.asarray(got) - want)[real].max()
    print(f"{case} + LoRA on {family.targets}: max |logits - torch+peft| = {diff:.2e}")
    assert diff < 1e-5
    tuned.unload()  # the reference is shared with the other tests of this case
