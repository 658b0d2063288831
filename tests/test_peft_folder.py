"""PEFT LoRA folders: what :mod:`floranna_jax.peft_folder` writes, transformers + peft load
on the same base and compute the project's logits; what it reads back is what it wrote;
a setting that differs is named.

Bases are tiny random models made by transformers' PyTorch classes and saved to a folder
(test-only); adapters get nonzero ``B`` so they change the output.
"""

import json

import jax
import numpy as np
import pytest
from decoder_cases import ALL_TARGETS, random_batch, randomize_B, tiny_config
from safetensors import safe_open

from floranna_jax import models, peft_folder
from floranna_jax.errors import BadValue
from floranna_jax.models import decoder

torch = pytest.importorskip("torch", reason="torch not installed: no PyTorch reference")
transformers = pytest.importorskip("transformers", reason="transformers not installed")
peft = pytest.importorskip("peft", reason="peft not installed")

# fp32 on both sides; LoRA adds a second matmul per projection, still far under 1e-4.
TOLERANCE = 1e-4
SPEC = models.LoraSpec(rank=4, alpha=8.0, targets=ALL_TARGETS)


def llama_folder(folder, seed: int = 0, dtype=None):
    """A tiny random ``LlamaForCausalLM`` saved to ``folder`` (float32 unless ``dtype``)."""
    torch.manual_seed(seed)
    config = {k: v for k, v in tiny_config().items() if k != "model_type"}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    return folder


def torch_logits(model, batch) -> np.ndarray:
    with torch.no_grad():
        args = {k: torch.as_tensor(batch[k], dtype=torch.long) for k in batch if k != "loss_mask"}
        return model(**args).logits.float().numpy()


def peft_logits(base_folder, adapter_folder, batch, cls=None) -> np.ndarray:
    """Logits of ``adapter_folder`` loaded by peft on the transformers model of ``base_folder``."""
    cls = cls or transformers.AutoModelForCausalLM
    base = cls.from_pretrained(base_folder, attn_implementation="eager")
    return torch_logits(peft.PeftModel.from_pretrained(base, adapter_folder).eval(), batch)


def max_real_diff(ours, theirs, mask) -> float:
    """Largest |difference| over the real (unpadded) positions."""
    return float(np.max(np.abs(np.asarray(ours) - theirs)[np.asarray(mask) > 0]))


def test_decoder_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    base_folder = llama_folder(tmp_path / "base")
    model = models.load_pretrained(base_folder, num_labels=0, lora=SPEC)
    trainable = randomize_B(model.trainable, seed=1)
    peft_folder.write(tmp_path / "adapter", model, SPEC, 0, trainable, str(base_folder))

    batch = random_batch(b=3, L=12)
    ours = decoder.logits(model.config, model.base, trainable["lora"], batch["input_ids"],
                          batch["attention_mask"], lora_scale=model.lora_scale)  # fmt: skip
    diff = max_real_diff(ours, peft_logits(base_folder, tmp_path / "adapter", batch),
                         batch["attention_mask"])  # fmt: skip
    bare = decoder.logits(model.config, model.base, {}, batch["input_ids"], batch["attention_mask"])
    print(f"decoder adapter: max |logits - peft| = {diff:.2e}")
    assert diff < TOLERANCE
    assert max_real_diff(ours, np.asarray(bare), batch["attention_mask"]) > 100 * TOLERANCE
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(ALL_TARGETS)
    assert (config["task_type"], config["base_model_name_or_path"]) == (
        "CAUSAL_LM",
        str(base_folder),
    )


def _encoder_batch(b: int = 3, L: int = 10) -> dict:
    rng = np.random.default_rng(0)
    mask = (np.arange(L)[None] < np.array([L, L - 3, 4])[:, None]).astype(np.int32)
    ids = rng.integers(3, 1000, (b, L)).astype(np.int32) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_encoder_adapter_and_head_load_in_peft(model_type, tmp_path):
    """The head goes in as modules_to_save; BERT's ``mlp_down`` (``output.dense``, which
    ``attention.output.dense`` also ends with) is listed by full module names."""
    config = dict(models.tiny_config(model_type), initializer_range=0.2, num_labels=3)
    cls = transformers.AutoModelForSequenceClassification
    torch.manual_seed(0)
    cls.from_config(transformers.AutoConfig.for_model(**config)).save_pretrained(tmp_path / "b")
    spec = models.LoraSpec(rank=4, alpha=8.0, targets=("query", "value", "mlp_down"))
    model = models.load_pretrained(tmp_path / "b", num_labels=3, lora=spec)
    trainable = randomize_B(model.trainable, seed=2)
    trainable["head"] = jax.tree.map(lambda h: h + 0.3, trainable["head"])  # not the saved one
    peft_folder.write(tmp_path / "a", model, spec, 3, trainable, str(tmp_path / "b"))

    batch = _encoder_batch()
    ours = model.apply(model.base, trainable, batch)
    theirs = peft_logits(tmp_path / "b", tmp_path / "a", batch, cls=cls)
    diff = float(np.max(np.abs(np.asarray(ours) - theirs)))
    print(f"{model_type} adapter + head: max |logits - peft| = {diff:.2e}")
    assert diff < TOLERANCE
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["modules_to_save"] == ["classifier"]
    assert written["task_type"] == "SEQ_CLS"
    assert {"query", "value"} <= set(written["target_modules"])
    assert f"{model_type}.encoder.layer.1.output.dense" in written["target_modules"]


def test_read_returns_what_write_wrote(tmp_path):
    model = models.load_pretrained(llama_folder(tmp_path / "base"), num_labels=0, lora=SPEC)
    trainable = randomize_B(model.trainable, seed=3)
    peft_folder.write(tmp_path / "a", model, SPEC, 0, trainable, "base")
    back = peft_folder.read(tmp_path / "a", model, SPEC, 0)
    jax.tree.map(np.testing.assert_array_equal, back, trainable)
    peft_folder.write(tmp_path / "again", model, SPEC, 0, back, "base")
    files = [safe_open(tmp_path / d / peft_folder.WEIGHTS_FILE, "numpy") for d in ("a", "again")]
    assert sorted(files[0].keys()) == sorted(files[1].keys())
    for k in files[0].keys():  # noqa: SIM118 (safe_open is not a mapping)
        np.testing.assert_array_equal(files[0].get_tensor(k), files[1].get_tensor(k))


@pytest.mark.parametrize(
    "change, field, fix",
    [
        (dict(rank=8), "rank", "set --config.lora.rank=4"),
        (dict(alpha=16.0), "alpha", "set --config.lora.alpha=8.0"),
        (dict(targets=("q_proj",)), "targets", "set --config.lora.targets=q_proj,v_proj"),
    ],
)
def test_read_names_the_setting_that_differs(tmp_path, change, field, fix):
    written = models.LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    model = models.build_random(tiny_config(), num_labels=0, lora=written)
    peft_folder.write(tmp_path, model, written, 0, model.trainable, "base")
    wanted = written._replace(**change)
    other = models.build_random(tiny_config(), num_labels=0, lora=wanted)
    with pytest.raises(BadValue) as e:
        peft_folder.read(tmp_path, other, wanted, 0)
    assert e.value.param == field and fix in e.value.message
