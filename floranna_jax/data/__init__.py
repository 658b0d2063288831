"""Data: GLUE tasks to tokenized fixed-shape numpy arrays and their official metrics; GSM8K,
MBPP and HumanEval problems and their generation-scored metrics (exact match, pass@k); a
synthetic task for smoke runs.

    from floranna_jax.data import code, glue, gsm8k, metrics, synthetic

jsonl and sources are their shared readers (local files, the hub).
"""
