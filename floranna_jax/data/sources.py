"""Where a task's records come from: a file found in a local folder, or the Hugging Face hub.

    path = sources.find_file(data_dir, "gsm8k", ["test.jsonl"], "GSM8K split 'test'")
    rows = sources.load_hub("openai/gsm8k", "main", "test", "GSM8K", hint="<folder ...>")

Both fail with one message that says what was tried and what to pass instead.
"""

import os
import pathlib
from collections.abc import Sequence
from typing import Any


def find_file(
    data_dir: str | os.PathLike, folder: str, names: Sequence[str], what: str
) -> pathlib.Path:
    """The first of `names` found in `data_dir` or in `data_dir/folder` (the layout of
    shared/data). Raises FileNotFoundError naming every path tried."""
    root = pathlib.Path(data_dir)
    tried = [base / name for base in (root, root / folder) for name in names]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{what}: no file at {' or '.join(map(str, tried))} "
        f"(pass data_dir=<folder holding {names[0]}>)"
    )


def load_hub(path: str, config: str | None, split: str, what: str, *, hint: str) -> Any:
    """datasets.load_dataset(path, config, split=split); any failure (offline, hub down, no
    cache) raises RuntimeError saying to pass data_dir=`hint` instead."""
    try:
        import datasets  # slow import, only for the hub path

        return datasets.load_dataset(path, config, split=split)
    except Exception as e:  # every failure means the same to the user: use local files
        raise RuntimeError(
            f"could not load {what} from the Hugging Face hub ({path}, config {config!r}, "
            f"split {split!r}): {type(e).__name__}: {e}. Pass data_dir={hint}."
        ) from e
