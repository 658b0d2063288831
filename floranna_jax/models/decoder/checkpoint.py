"""Raw decoder checkpoint keys -> the canonical names of :meth:`.families.Family.checkpoint_name`.

Canonical names are complete (``model.`` prefix and ``lm_head.`` included), so the
architecture's ``checkpoint_prefix`` is empty. Raw keys of a bare ``*Model`` checkpoint
(no ``model.``) are normalized; rotary ``inv_freq`` buffers, and ``lm_head.weight`` of a
tied model, are known and unused.
"""

from __future__ import annotations


def canonical_key(tied: bool, key: str) -> str | None:
    """Add the ``model.`` prefix a bare ``*Model`` lacks; None: a known unused key."""
    if key.endswith(".rotary_emb.inv_freq"):  # buffers some older checkpoints saved
        return None
    if key.startswith("lm_head."):
        return None if tied else key  # a tied head is the embedding
    return key if key.startswith("model.") else f"model.{key}"
