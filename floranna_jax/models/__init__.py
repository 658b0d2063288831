"""Models with LoRA: frozen base and trainable (LoRA + head) as separate pytrees.

    spec = models.LoraSpec(rank=16, alpha=16.0, targets=("query", "value"))
    model = models.load_pretrained(folder_or_hub_id, num_labels=2, lora=spec, key=key)
    logits = model.apply(model.base, model.trainable, batch)      # [b, num_labels] f32

``model.trainable = {"lora": {layer_name: {"A": [r, d_in], "B": [d_out, r]}}, "head": ...}``
with the adapter tree of :mod:`floranna_jax.lora` (METHOD.md orientation), so server
estimators consume ``trainable["lora"]`` unchanged. ``layer_name`` is the "/"-joined
path of the adapted kernel in ``model.base`` (``"layer_0/attention/query"``), sorted.
``apply`` is pure: jit it, and vmap it over a stacked ``trainable`` with ``base`` shared.

Decoders (``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma2``, ``gemma3_text``,
``phi3``; one record each in :data:`decoder.FAMILIES`) keep ``trainable["head"] = {}``
and their ``apply`` returns the per-example causal-LM sums ``(nll [b], tokens [b])`` of
batches with a ``loss_mask``; their layers are stacked under ``base["layers"]`` and their
layer names read ``"layers_3/attn/q_proj"`` (see :mod:`floranna_jax.models.decoder`).

Families are listed in :data:`FAMILIES` (model_type -> ``make`` returning an
:class:`~floranna_jax.models.architecture.Architecture`); a family is one subpackage and
one entry.

Modules: ``model`` (:class:`LoraSpec`, :class:`Model`, ``FAMILIES``; build, load, save,
merge), ``architecture`` (what a family provides), ``loading`` (Hugging Face folders <->
parameter trees, strictly), the ``encoder`` subpackage (BERT/RoBERTa) and the ``decoder``
subpackage (every decoder family: logits, generation).
"""

from floranna_jax.models.model import (
    BASE_DTYPES,
    DEFAULT_TARGETS,
    FAMILIES,
    TARGETS,
    LoraSpec,
    Model,
    architecture,
    build_abstract,
    build_random,
    check_lora,
    load_pretrained,
    merge_into_base,
    merged_kernel_paths,
    merged_kernels,
    resolve_base_dtype,
    save_pretrained,
    tiny_config,
)

__all__ = [
    "BASE_DTYPES",
    "DEFAULT_TARGETS",
    "FAMILIES",
    "TARGETS",
    "LoraSpec",
    "Model",
    "architecture",
    "build_abstract",
    "build_random",
    "check_lora",
    "load_pretrained",
    "merge_into_base",
    "merged_kernel_paths",
    "merged_kernels",
    "resolve_base_dtype",
    "save_pretrained",
    "tiny_config",
]
