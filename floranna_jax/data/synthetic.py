"""A synthetic sequence-classification task for smoke runs: learnable by a tiny model.

    batch = synthetic.make(512, seq_len=32, vocab_size=1000, num_labels=2, seed=0)

Token ids: 0 = [PAD], 1 = [CLS] (always first), 2 .. 2+K-1 = one trigger token per class,
the rest are noise. Each example holds 1 to 3 copies of its class's trigger at random
positions among uniform noise tokens, and no other trigger, so the label is a function of
which trigger is present: a bag-of-tokens model (or a [CLS]-pooled encoder) reaches 100%.
Lengths vary (half to full seq_len) so the attention mask matters.
"""

import numpy as np

PAD_ID, CLS_ID, FIRST_TRIGGER_ID = 0, 1, 2


def make(
    num_examples: int,
    *,
    seq_len: int = 32,
    vocab_size: int = 1000,
    num_labels: int = 2,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Returns {"input_ids", "attention_mask", "token_type_ids": int32 [N, seq_len],
    "label": int32 [N]}, the same keys as glue.load; deterministic in `seed`.
    """
    noise_start = FIRST_TRIGGER_ID + num_labels
    if num_labels < 2:
        raise ValueError(f"num_labels must be >= 2, got {num_labels}")
    if vocab_size <= noise_start:
        raise ValueError(f"vocab_size must exceed {noise_start} (pad, cls, {num_labels} triggers)")
    if seq_len < 4:
        raise ValueError(f"seq_len must be >= 4, got {seq_len}")
    rng = np.random.default_rng(seed)
    n = num_examples
    labels = rng.integers(0, num_labels, n).astype(np.int32)
    lengths = rng.integers(max(seq_len // 2, 4), seq_len + 1, n)
    ids = rng.integers(noise_start, vocab_size, (n, seq_len)).astype(np.int32)
    ids[:, 0] = CLS_ID
    # Place 1-3 triggers in the first `length` positions (after [CLS]); repeats merge.
    slots = rng.random((n, seq_len - 1)).argsort(axis=1)[:, :3] + 1
    copies = rng.integers(1, 4, n)
    for j in range(3):
        row = np.nonzero(copies > j)[0]
        pos = 1 + (slots[row, j] - 1) % (lengths[row] - 1)
        ids[row, pos] = FIRST_TRIGGER_ID + labels[row]
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, PAD_ID).astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids),
        "label": labels,
    }
