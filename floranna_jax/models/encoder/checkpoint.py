"""Encoder parameter paths <-> Hugging Face checkpoint names, for BERT and RoBERTa alike.

Our paths are tuples such as ``("layer_0", "attention", "query", "kernel")``; the
canonical checkpoint name is the unprefixed PyTorch one,
``"encoder.layer.0.attention.self.query.weight"``. Raw checkpoint keys are normalized
first (``bert.``/``roberta.`` prefix, LayerNorm ``gamma``/``beta``) so prefixed and
unprefixed checkpoints both load; :mod:`floranna_jax.models.loading` does the matching.
"""

from __future__ import annotations

from floranna_jax.models.architecture import table_name

_MODULE_NAMES = {
    "embeddings/word": "embeddings.word_embeddings",
    "embeddings/position": "embeddings.position_embeddings",
    "embeddings/token_type": "embeddings.token_type_embeddings",
    "embeddings/ln": "embeddings.LayerNorm",
    "layer_{i}/attention/query": "encoder.layer.{i}.attention.self.query",
    "layer_{i}/attention/key": "encoder.layer.{i}.attention.self.key",
    "layer_{i}/attention/value": "encoder.layer.{i}.attention.self.value",
    "layer_{i}/attention/attn_out": "encoder.layer.{i}.attention.output.dense",
    "layer_{i}/attn_ln": "encoder.layer.{i}.attention.output.LayerNorm",
    "layer_{i}/mlp/mlp_up": "encoder.layer.{i}.intermediate.dense",
    "layer_{i}/mlp/mlp_down": "encoder.layer.{i}.output.dense",
    "layer_{i}/mlp_ln": "encoder.layer.{i}.output.LayerNorm",
    "pooler": "pooler.dense",
    "head/classifier": "classifier",
    "head/dense": "classifier.dense",
    "head/out_proj": "classifier.out_proj",
}
_LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


def checkpoint_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> the unprefixed Hugging Face name (``encoder.layer.0....``)."""
    return table_name(path, _MODULE_NAMES, _LEAF_NAMES, "layer")


def canonical_key(model_type: str, key: str) -> str | None:
    """Strip the ``bert.``/``roberta.`` prefix, rename LayerNorm gamma/beta; None: unused."""
    key = key.removeprefix(f"{model_type}.")
    if key.endswith("LayerNorm.gamma"):
        key = key.removesuffix("gamma") + "weight"
    elif key.endswith("LayerNorm.beta"):
        key = key.removesuffix("beta") + "bias"
    buffers = ("embeddings.position_ids", "embeddings.token_type_ids")
    pretraining_heads = ("cls.", "lm_head.")  # MLM / NSP heads of pre-training checkpoints
    if key in buffers or key.startswith(pretraining_heads):
        return None
    if model_type == "roberta" and key.startswith("pooler."):  # RoBERTa's head skips it
        return None
    return key
