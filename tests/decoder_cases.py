"""Tiny random decoders, their batches, and their PyTorch references, shared by the
decoder tests (torch and transformers are imported only by the reference helpers)."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floranna_jax import models
from floranna_jax.models import decoder

ALL_TARGETS = decoder.get_family("llama").targets


def tiny_config(model_type: str = "llama", **kw) -> dict:
    """``models.tiny_config`` with larger weights: logits of order 1, so tolerances bite."""
    return dict(models.tiny_config(model_type), initializer_range=0.1, **kw)


def tiny_model(config: dict | None = None, **kw) -> models.Model:
    """A random model of ``config`` (default :func:`tiny_config`), LoRA r=4 on every
    projection of its family unless ``lora`` says otherwise; the same call returns the
    same model."""
    config = config or tiny_config()
    targets = decoder.get_family(config["model_type"]).targets
    kw.setdefault("lora", models.LoraSpec(rank=4, alpha=8.0, targets=targets))
    config_json = json.dumps(config, sort_keys=True)
    return _build(config_json, tuple(sorted(kw.items())))


@functools.cache  # one random tiny model per setting keeps the suite fast on 2 cores
def _build(config_json: str, kw: tuple) -> models.Model:
    return models.build_random(json.loads(config_json), key=jax.random.key(0), **dict(kw))


def randomize_B(trainable: dict, seed: int, std: float = 0.5) -> dict:
    """Nonzero B everywhere so the adapters change the output (numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    adapters = {
        n: {"A": a["A"], "B": jnp.asarray(rng.normal(0.0, std, a["B"].shape), jnp.float32)}
        for n, a in sorted(trainable["lora"].items())
    }
    return {"lora": adapters, "head": trainable["head"]}


def random_batch(b: int = 4, L: int = 16, vocab: int = 512, seed: int = 0, lengths=None) -> dict:
    """Right-padded rows of ``lengths`` tokens (default ``L - 3 i``); the second half of
    each row is completion (``loss_mask``)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(b, L)).astype(np.int32)
    mask = np.ones((b, L), np.int32)
    loss_mask = np.zeros((b, L), np.int32)
    for i in range(b):
        n = L - 3 * i if lengths is None else lengths[i]
        ids[i, n:], mask[i, n:] = 0, 0
        loss_mask[i, n // 2 : n] = 1
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def left_padded_prompts(vocab: int, lengths=(7, 4, 2), seed: int = 11):
    """``(ids, mask)`` ``[len(lengths), max(lengths)]``: prompts padded on the left."""
    rng = np.random.default_rng(seed)
    P = max(lengths)
    ids = np.zeros((len(lengths), P), np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, P - n :] = rng.integers(3, vocab, n)
        mask[i, P - n :] = 1
    return ids, mask


def jitted(model: models.Model):
    """``model.apply`` under jit (one compilation cache per apply, shared by tests)."""
    return jax.jit(model.apply, static_argnames="deterministic")


def max_diff(x, y) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))


# ------------------------------------------------------------- PyTorch references


def torch_or_skip():
    torch = pytest.importorskip("torch", reason="torch not installed: no PyTorch reference")
    pytest.importorskip("transformers", reason="transformers not installed")
    return torch


def torch_model(config: dict, seed: int = 0, vector_noise: float = 0.0):
    """transformers' ``*ForCausalLM`` of ``config`` with random weights (eager attention).

    ``vector_noise``: add ``N(0, noise^2)`` to every 1-D parameter (norm weights, biases),
    which transformers initializes to constants that would hide a misread offset or bias.
    """
    torch = torch_or_skip()
    import transformers

    torch.manual_seed(seed)
    kw = {k: v for k, v in config.items() if k != "model_type"}
    hf = transformers.AutoConfig.for_model(config["model_type"], **kw)
    hf._attn_implementation = "eager"
    ref = transformers.AutoModelForCausalLM.from_config(hf).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1 and vector_noise:
                p.add_(vector_noise * torch.randn_like(p))
    return ref


def torch_logits(ref, batch) -> np.ndarray:
    torch = torch_or_skip()
    with torch.no_grad():
        return ref(
            input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=torch.as_tensor(batch["attention_mask"], dtype=torch.long),
        ).logits.numpy()


def torch_generate(ref, ids, mask, max_new, eos, pad) -> np.ndarray:
    """transformers' greedy ``generate``: ``[b, max_new]`` new tokens, ``pad`` after a stop."""
    torch = torch_or_skip()
    with torch.no_grad():
        out = ref.generate(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_new_tokens=max_new, do_sample=False, eos_token_id=list(eos), pad_token_id=pad,
        )  # fmt: skip
    new = out[:, ids.shape[1] :].numpy()
    return np.pad(new, ((0, 0), (0, max_new - new.shape[1])), constant_values=pad)
