"""floranna_jax: federated LoRA aggregation (FLoRA-NA and its baselines) in JAX/Flax."""

import os
import sys
import warnings

# jaxlib's CPU eigh / svd call OpenBLAS (through scipy) from inside XLA's own thread pool.
# With OpenBLAS's threads on top, a federated run hung forever (0% CPU) in the server's
# eigh: seen here in a round of the reviewers study, and before in the estimator
# benchmark. One OpenBLAS thread avoids it and costs nothing (XLA parallelizes the batch).
# OpenBLAS reads this when it loads, which `import jax` does: it must come first.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if "jax" in sys.modules and os.environ["OPENBLAS_NUM_THREADS"] != "1":
    warnings.warn(
        "jax was imported before floranna_jax with OPENBLAS_NUM_THREADS unset or > 1: "
        "CPU eigh/svd may deadlock; import floranna_jax first or export OPENBLAS_NUM_THREADS=1",
        stacklevel=2,
    )

__version__ = "0.1.0"
