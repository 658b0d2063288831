"""Short runs on a pretrained tiny LLaMA, shared by the export and generate tests.

The base is a tiny random ``LlamaForCausalLM`` made by transformers (test-only) and saved
to a folder with a small byte-level BPE tokenizer (pad 0, bos 1, eos 2, as the config
says); the runs are configs/gsm8k.py:smoke on it, 2 rounds, checkpointed every round.
Each method's run is trained once per test session (:func:`trained`).
"""

from __future__ import annotations

import functools
import pathlib
import tempfile

import numpy as np
import pytest
from decoder_cases import tiny_config
from smoke_setup import REPO, config_file, shared_compilation

from floranna_jax import result, train
from floranna_jax.models import decoder

torch = pytest.importorskip("torch", reason="torch not installed: no PyTorch reference")
transformers = pytest.importorskip("transformers", reason="transformers not installed")

REPO_ROOT = REPO
ROOT = pathlib.Path(tempfile.mkdtemp(prefix="floranna_export_tests_"))
# fp32 on both sides; the adapter adds one low-rank matmul per projection.
TOLERANCE = 1e-4


def save_tokenizer(folder: pathlib.Path) -> None:
    """A byte-level BPE tokenizer trained on GSM8K-style text, 320 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(["Question: What is 12 + 7?\nAnswer:\n12 + 7 = 19\n#### 19"], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)


@functools.cache
def base_folder() -> pathlib.Path:
    """The tiny LLaMA (float32) and its tokenizer."""
    folder = ROOT / "base"
    torch.manual_seed(0)
    config = {k: v for k, v in tiny_config().items() if k != "model_type"}
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def run_config(method: str, **overrides):
    """configs/gsm8k.py:smoke on :func:`base_folder` with the method and ``overrides``."""
    fields = {
        "model.source": "pretrained", "model.path": str(base_folder()),
        "data.tokenizer": "model", "server.name": method, "eval.local": False,
        "eval.max_new_tokens": 4,
    }  # fmt: skip
    return config_file("gsm8k.py", "smoke", **(fields | overrides))


@functools.cache
def trained(method: str) -> str:
    """The workdir of a finished 2-round run of ``method``."""
    workdir = str(ROOT / f"run_{method}")
    with shared_compilation():
        train.run(run_config(method), workdir)
    return workdir


def batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded token rows ``[3, 12]`` over the 320-token vocabulary."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(12)[None] < np.array([12, 9, 5])[:, None]).astype(np.int32)
    return {"input_ids": rng.integers(3, 320, (3, 12)).astype(np.int32) * mask,
            "attention_mask": mask}  # fmt: skip


def project_logits(res: result.Result, client: int | None = None) -> np.ndarray:
    """``[3, 12, V]``: the run's model (global or ``client``'s) on :func:`batch`."""
    b = batch()
    adapters = result.trainable(res, client)["lora"]
    return np.asarray(decoder.logits(res.model.config, result.base(res), adapters,
                                     b["input_ids"], b["attention_mask"],
                                     lora_scale=res.model.lora_scale))  # fmt: skip


def torch_logits(model) -> np.ndarray:
    b = batch()
    with torch.no_grad():
        out = model(**{k: torch.as_tensor(v, dtype=torch.long) for k, v in b.items()})
    return out.logits.float().numpy()


def max_real_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Largest |difference| over the real (unpadded) positions of :func:`batch`."""
    return float(np.max(np.abs(ours - theirs)[batch()["attention_mask"] > 0]))
