"""Tasks: data, loss, evaluation and metrics of what a run trains for (task.py).

Kinds: ``classification`` (GLUE classification and regression, synthetic tokens) and
``generation`` (GSM8K and code, scored on generated text, for decoders).
"""

from floranna_jax.tasks.registry import KINDS, get, names
from floranna_jax.tasks.task import Evaluator, Program, Task

__all__ = ["KINDS", "Evaluator", "Program", "Task", "get", "names"]
