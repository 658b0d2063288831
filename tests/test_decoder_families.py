"""Every decoder family against transformers' PyTorch implementation, on tiny random
configs whose special features bite (sliding windows shorter than the rows, small
soft-caps, noisy norm weights and biases): logits, logits with LoRA applied by PEFT
under the module names the family record gives, and greedy generation.

Skipped, with the reason, when torch, transformers or peft is absent.
"""

import numpy as np
import pytest
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
    free = decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=10, eos_ids=())
    eos = (int(free[1, 4]),)  # a token row 1 emits: one row stops early on both sides
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
