"""floranna_jax: federated LoRA aggregation (FLoRA-NA and its baselines) in JAX/Flax."""

__version__ = "0.1.0"
