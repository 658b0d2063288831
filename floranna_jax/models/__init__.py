"""Models with LoRA: frozen base and trainable (LoRA + head) as separate pytrees.

    spec = models.LoraSpec(rank=16, alpha=16.0, targets=("query", "value"))
    model = models.load_pretrained(folder_or_hub_id, num_labels=2, lora=spec, key=key)
    logits = model.apply(model.base, model.trainable, batch)      # [b, num_labels] f32

``model.trainable = {"lora": {layer_name: {"A": [r, d_in], "B": [d_out, r]}}, "head": ...}``
with the adapter tree of :mod:`floranna_jax.lora` (METHOD.md orientation), so server
estimators consume ``trainable["lora"]`` unchanged. ``layer_name`` is the "/"-joined
path of the adapted kernel in ``model.base`` (``"layer_0/attention/query"``), sorted.
``apply`` is pure: jit it, and vmap it over a stacked ``trainable`` with ``base`` shared.

Families are listed in :data:`FAMILIES` (model_type -> ``make`` returning an
:class:`~floranna_jax.models.architecture.Architecture`); a decoder family is one more
subpackage and one more entry.

Modules: ``model`` (:class:`LoraSpec`, :class:`Model`, ``FAMILIES``; build, load, save,
merge), ``architecture`` (what a family provides), ``loading`` (Hugging Face folders <->
parameter trees, strictly), and the ``encoder`` subpackage (BERT/RoBERTa).
"""

from floranna_jax.models.model import (
    FAMILIES,
    TARGETS,
    LoraSpec,
    Model,
    architecture,
    build_random,
    check_lora,
    load_pretrained,
    merge_into_base,
    save_pretrained,
    tiny_config,
)

__all__ = [
    "FAMILIES",
    "TARGETS",
    "LoraSpec",
    "Model",
    "architecture",
    "build_random",
    "check_lora",
    "load_pretrained",
    "merge_into_base",
    "save_pretrained",
    "tiny_config",
]
