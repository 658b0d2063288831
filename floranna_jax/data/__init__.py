"""Data: GLUE tasks to tokenized fixed-shape numpy arrays, their official metrics, and a
synthetic task for smoke runs.

    from floranna_jax.data import glue, metrics, synthetic
"""
