"""Decoder checkpoints: strict loading, and parity with transformers' PyTorch
LlamaForCausalLM (tiny random configs, LoRA, greedy generation, a sharded folder, and the
real SmolLM2-135M-Instruct).

Parity tests skip, with the reason, when torch/transformers or the SmolLM2 GGUF file is
absent.
"""

import chex
import numpy as np
import pytest
from decoder_cases import (
    left_padded_prompts,
    random_batch,
    randomize_B,
    tiny_config,
    tiny_model,
    torch_generate,
    torch_logits,
    torch_model,
    torch_or_skip,
)

from floranna_jax import lora, models
from floranna_jax.models import decoder, loading

# ---------------------------------------------------------------------- loading


def test_save_then_load_round_trip(tmp_path):
    model = tiny_model(lora=models.LoraSpec(rank=4))
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

    models.save_pretrained(tiny_model(lora=models.LoraSpec(rank=4)), folder)
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


PARITY_CASES = {
    "llama_gqa_untied": tiny_config(),
    "llama_gqa_tied": tiny_config(tie_word_embeddings=True),
    "llama_rope_parameters_head_dim": dict(
        {k: v for k, v in tiny_config().items() if k != "rope_theta"},
        rope_parameters={"rope_theta": 500.0, "rope_type": "default"}, head_dim=32,
    ),
    "mistral_sliding_window": tiny_config("mistral", sliding_window=5),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_parity_tiny_random_with_transformers(case, tmp_path):
    ref = torch_model(PARITY_CASES[case])
    ref.save_pretrained(tmp_path)
    batch = random_batch(b=3, L=16)
    want = torch_logits(ref, batch)
    model = models.load_pretrained(tmp_path)
    got = decoder.logits(model.config, model.base, {}, batch["input_ids"],
                         batch["attention_mask"])  # fmt: skip
    real = batch["attention_mask"] > 0  # padded positions' outputs are unused on both sides
    assert np.abs(want).max() > 0.5  # logits of order 1: the tolerance bites
    diff = np.abs(np.asarray(got) - want)[real].max()
    print(f"{case}: max |logits - torch| = {diff:.2e}")
    assert diff < 1e-5


def test_parity_lora_with_merged_torch_weights(tmp_path):
    torch = torch_or_skip()
    ref = torch_model(tiny_config())
    ref.save_pretrained(tmp_path)
    model = models.load_pretrained(tmp_path, lora=models.LoraSpec(rank=4, alpha=8.0))
    adapters = randomize_B(model.trainable, 5, std=0.3)["lora"]
    s = model.lora_scale
    with torch.no_grad():
        for name, a in adapters.items():
            i, target = int(name.split("/")[0].removeprefix("layers_")), name.split("/")[-1]
            weight = getattr(ref.model.layers[i].self_attn, target).weight
            weight += torch.from_numpy(np.array(lora.delta(a, s)))
    batch = random_batch(b=3, L=16)
    want = torch_logits(ref, batch)
    got = decoder.logits(model.config, model.base, adapters, batch["input_ids"],
                         batch["attention_mask"], lora_scale=s)  # fmt: skip
    bare = decoder.logits(model.config, model.base, {}, batch["input_ids"],
                          batch["attention_mask"])  # fmt: skip
    real = batch["attention_mask"] > 0
    assert np.abs(np.asarray(bare) - want)[real].max() > 1e-2  # the adapters matter
    diff = np.abs(np.asarray(got) - want)[real].max()
    print(f"lora: max |logits - torch(W + sBA)| = {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_generation_equals_transformers(tied, tmp_path):
    torch_or_skip()
    ref = torch_model(tiny_config(tie_word_embeddings=tied), seed=1)
    ref.save_pretrained(tmp_path)
    model = models.load_pretrained(tmp_path)
    ids, mask = left_padded_prompts(512)
    free = decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=10, eos_ids=())
    eos = (int(free[1, 4]),)  # a token row 1 emits: one row stops early on both sides
    want = torch_generate(ref, ids, mask, 10, eos, pad=0)
    got = decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=10, eos_ids=eos,
                           pad_id=0)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got), want)
    assert np.any(want == 0)  # some row stopped


# --------------------------------------------------------- a real checkpoint: SmolLM2


@pytest.fixture(scope="module")
def smollm2_dir(request, tmp_path_factory, smollm_gguf):
    """SmolLM2-135M-Instruct's GGUF, dequantized by transformers and saved as safetensors
    (a reference independent of floranna_jax's own converter). The conversion takes a
    minute and a half, so its result is kept in pytest's cache, keyed by the file."""
    gguf = smollm_gguf
    torch_or_skip()
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
    batch = random_batch(b=2, L=24, vocab=49152)
    want = torch_logits(ref, batch)
    got = decoder.logits(model.config, model.base, {}, batch["input_ids"],
                         batch["attention_mask"])  # fmt: skip
    real = batch["attention_mask"] > 0
    diff = np.abs(np.asarray(got) - want)[real].max()
    print(f"SmolLM2-135M: max |logits - torch| = {diff:.2e} (|logits| <= {np.abs(want).max():.0f})")
    # 30 fp32 layers, logits up to ~30: op-order differences add up to a few 1e-4
    assert diff < 1e-3
    ids, mask = left_padded_prompts(49152, lengths=(9, 5))
    want_new = torch_generate(ref, ids, mask, 6, (2,), pad=2)
    got_new = decoder.generate(model, model.base, {}, ids, mask, max_new_tokens=6, eos_ids=(2,))
    np.testing.assert_array_equal(np.asarray(got_new), want_new)


def test_sharded_checkpoint_loads(tmp_path):
    torch_or_skip()
    ref = torch_model(tiny_config())
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = models.load_pretrained(tmp_path)
    batch = random_batch(b=2, L=8)
    got = decoder.logits(model.config, model.base, {}, batch["input_ids"],
                         batch["attention_mask"])  # fmt: skip
    real = batch["attention_mask"] > 0
    assert np.abs(np.asarray(got) - torch_logits(ref, batch))[real].max() < 1e-5


def test_saved_folder_loads_in_transformers(tmp_path):
    """save_pretrained writes what transformers reads: same logits both sides."""
    torch_or_skip()
    import transformers

    model = tiny_model(tiny_config(tie_word_embeddings=True), lora=models.LoraSpec(rank=4))
    models.save_pretrained(model, tmp_path)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    batch = random_batch(b=2, L=8)
    got = decoder.logits(model.config, model.base, {}, batch["input_ids"],
                         batch["attention_mask"])  # fmt: skip
    real = batch["attention_mask"] > 0
    assert np.abs(np.asarray(got) - torch_logits(ref, batch))[real].max() < 1e-5
