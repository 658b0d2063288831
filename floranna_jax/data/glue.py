"""GLUE tasks: read them (Hugging Face hub or a local GLUE folder) and tokenize to numpy.

    batch = glue.load("sst2", tokenizer="/path/to/model", data_dir="/data/glue")
    batch["train"]["input_ids"]   # int32 [N, L]; L is a length bucket chosen from the data

Two sources give the same arrays and the same label ids (those of the hub, "nyu-mll/glue"):
  data_dir=None   datasets.load_dataset("nyu-mll/glue", <config>, split=...)
  data_dir=PATH   the layout of the GLUE download script: PATH/SST-2/train.tsv, PATH/CoLA/dev.tsv,
                  PATH/MNLI/dev_matched.tsv ... Files are read with csv.QUOTE_NONE (sentences hold
                  bare double quotes) and utf-8-sig (MRPC starts with a byte-order mark).

Every row is kept: a row with the wrong number of fields or an unreadable label raises, naming
the file and the line. Test splits are unlabeled; their labels are -1.
"""

import csv
import logging
import math
import os
import pathlib
from typing import Any, NamedTuple

import numpy as np

SPLITS = ("train", "validation", "test")


class TaskInfo(NamedTuple):
    """What the rest of the code needs to know about one GLUE task.

    name: canonical name (a key of TASKS). num_labels: classes, 1 for regression (stsb).
    main_metric: the key of metrics.compute that ranks runs. text_keys: hub columns fed to the
    tokenizer (one sentence or a pair). label_names: class names in id order (as on the hub).
    hub_config / hub_splits: "nyu-mll/glue" config and its split names for
    (train, validation, test). glue_folder / glue_files: local folder and file names for
    (train, validation, test). tsv_text / tsv_label: column names in those files.
    tsv_columns: names of the columns of the headerless train/dev files (CoLA only).
    """

    name: str
    num_labels: int
    is_regression: bool
    main_metric: str
    text_keys: tuple[str, ...]
    label_names: tuple[str, ...]
    hub_config: str
    hub_splits: tuple[str, str, str]
    glue_folder: str
    glue_files: tuple[str, str, str]
    tsv_text: tuple[str, ...]
    tsv_label: str
    tsv_columns: tuple[str, ...] = ()


_FILES = ("train.tsv", "dev.tsv", "test.tsv")
_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")


def _mnli(name: str, which: str) -> TaskInfo:
    return TaskInfo(
        name, 3, False, "accuracy", ("premise", "hypothesis"), _NLI3, "mnli",
        ("train", f"validation_{which}", f"test_{which}"), "MNLI",
        ("train.tsv", f"dev_{which}.tsv", f"test_{which}.tsv"), ("sentence1", "sentence2"),
        "gold_label",
    )  # fmt: skip


TASKS: dict[str, TaskInfo] = {
    "cola": TaskInfo(
        "cola", 2, False, "matthews_correlation", ("sentence",), ("unacceptable", "acceptable"),
        "cola", SPLITS, "CoLA", _FILES, ("sentence",), "label",
        tsv_columns=("source", "label", "original_label", "sentence"),
    ),
    "sst2": TaskInfo(
        "sst2", 2, False, "accuracy", ("sentence",), ("negative", "positive"),
        "sst2", SPLITS, "SST-2", _FILES, ("sentence",), "label",
    ),
    "mrpc": TaskInfo(
        "mrpc", 2, False, "f1", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
        "mrpc", SPLITS, "MRPC", _FILES, ("#1 String", "#2 String"), "Quality",
    ),
    "stsb": TaskInfo(
        "stsb", 1, True, "pearson", ("sentence1", "sentence2"), (),
        "stsb", SPLITS, "STS-B", _FILES, ("sentence1", "sentence2"), "score",
    ),
    "qqp": TaskInfo(
        "qqp", 2, False, "f1", ("question1", "question2"), ("not_duplicate", "duplicate"),
        "qqp", SPLITS, "QQP", _FILES, ("question1", "question2"), "is_duplicate",
    ),
    "mnli_matched": _mnli("mnli_matched", "matched"),
    "mnli_mismatched": _mnli("mnli_mismatched", "mismatched"),
    "qnli": TaskInfo(
        "qnli", 2, False, "accuracy", ("question", "sentence"), _NLI2,
        "qnli", SPLITS, "QNLI", _FILES, ("question", "sentence"), "label",
    ),
    "rte": TaskInfo(
        "rte", 2, False, "accuracy", ("sentence1", "sentence2"), _NLI2,
        "rte", SPLITS, "RTE", _FILES, ("sentence1", "sentence2"), "label",
    ),
}  # fmt: skip

_ALIASES = {"mnli": "mnli_matched", "mnli_m": "mnli_matched", "mnli_mm": "mnli_mismatched"}
_SPLIT_ALIASES = {"dev": "validation", "val": "validation", "eval": "validation"}


class Examples(NamedTuple):
    """Raw examples of one split: texts[k][i] is text k (one or two) of example i.

    labels: int32 [N] class ids, or float32 [N] for stsb; -1 where unlabeled (test splits).
    """

    texts: tuple[list[str], ...]
    labels: np.ndarray


def _normalize(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def get_task(task: str) -> TaskInfo:
    """Returns the TaskInfo of `task`; case, "-", "_" and spaces are ignored ("SST-2", "STS_B",
    "mnli-mismatched"), and "mnli" / "mnli_m" / "mnli_mm" name the matched / mismatched tasks.
    """
    names = {_normalize(n): n for n in TASKS} | {_normalize(a): n for a, n in _ALIASES.items()}
    key = _normalize(task)
    if key not in names:
        valid = sorted([*TASKS, *_ALIASES])
        raise ValueError(f"unknown GLUE task {task!r}; valid tasks: {', '.join(valid)}")
    return TASKS[names[key]]


def _split_name(split: str) -> str:
    name = _SPLIT_ALIASES.get(split, split)
    if name not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return name


def task_dir(task: str, data_dir: str | os.PathLike) -> pathlib.Path:
    """Finds the task's folder under `data_dir` (GLUE layout), also under `data_dir/glue`.

    Raises FileNotFoundError naming every path tried.
    """
    info = get_task(task)
    root = pathlib.Path(data_dir)
    tried = []
    for base in (root, root / "glue"):
        exact = base / info.glue_folder
        tried.append(str(exact))
        if exact.is_dir():
            return exact
        if base.is_dir():  # tolerate another case or "SST2" for "SST-2"
            want = info.glue_folder.lower().replace("-", "")
            for child in sorted(base.iterdir()):
                if child.is_dir() and child.name.lower().replace("-", "") == want:
                    return child
    raise FileNotFoundError(
        f"GLUE task {info.name!r}: no folder {info.glue_folder!r} found; looked at "
        f"{', '.join(tried)} (pass data_dir=<folder holding {info.glue_folder}/train.tsv ...>)"
    )


def _parse_label(info: TaskInfo, value: str) -> float:
    """One label string -> class id (or score). Raises ValueError on anything unexpected."""
    value = value.strip()
    if info.is_regression:
        score = float(value)
        if not math.isfinite(score):
            raise ValueError(f"score {value!r} is not finite")
        return score
    if value in info.label_names:
        return info.label_names.index(value)
    if value.isdigit() and int(value) < info.num_labels:
        return int(value)
    names = ", ".join(info.label_names)
    raise ValueError(
        f"label {value!r} is neither a class id 0..{info.num_labels - 1} nor in {names}"
    )


def read_tsv(path: str | os.PathLike, task: str, split: str = "train") -> Examples:
    """Reads one GLUE-distribution TSV file of `task` into Examples (no row is dropped).

    The header names the columns (CoLA train/dev have none; TaskInfo.tsv_columns names them).
    A file without the label column is taken as unlabeled (labels -1), as test files are.
    Raises ValueError naming the file (and line) for an empty file, a file without
    examples, and a row with the wrong field count or label.
    """
    info, split, path = get_task(task), _split_name(split), pathlib.Path(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        headerless = bool(info.tsv_columns) and split != "test"
        header = list(info.tsv_columns) if headerless else next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header line")
        missing = [c for c in info.tsv_text if c not in header]
        if missing:
            raise ValueError(f"{path}:1: header {header} lacks column(s) {missing}")
        if info.tsv_label not in header and split != "test":
            raise ValueError(f"{path}:1: header {header} lacks label column {info.tsv_label!r}")
        text_cols = [header.index(c) for c in info.tsv_text]
        label_col = header.index(info.tsv_label) if info.tsv_label in header else None
        texts: tuple[list[str], ...] = tuple([] for _ in text_cols)
        labels = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if len(row) != len(header):
                raise ValueError(
                    f"{where}: malformed row, {len(row)} tab-separated fields where the header "
                    f"has {len(header)} ({header}): {chr(9).join(row)[:200]!r}"
                )
            for out, col in zip(texts, text_cols, strict=True):
                out.append(row[col])
            if label_col is not None:
                try:
                    labels.append(_parse_label(info, row[label_col]))
                except ValueError as e:
                    raise ValueError(f"{where}: bad label in column {info.tsv_label!r}: {e}") from e
    dtype = np.float32 if info.is_regression else np.int32
    n = len(texts[0])
    if n == 0:
        raise ValueError(f"{path}: no examples" + ("" if headerless else " after the header line"))
    return Examples(
        texts, np.asarray(labels, dtype) if label_col is not None else np.full(n, -1, dtype)
    )


def _read_local(info: TaskInfo, split: str, data_dir: str | os.PathLike) -> Examples:
    folder = task_dir(info.name, data_dir)
    path = folder / info.glue_files[SPLITS.index(split)]
    if not path.is_file():
        raise FileNotFoundError(f"GLUE task {info.name!r}, split {split!r}: no file at {path}")
    return read_tsv(path, info.name, split)


def _read_hub(info: TaskInfo, split: str) -> Examples:
    hub_split = info.hub_splits[SPLITS.index(split)]
    try:
        import datasets  # slow import, only for the hub path

        ds = datasets.load_dataset("nyu-mll/glue", info.hub_config, split=hub_split)
    except Exception as e:  # offline, hub down, no cache: all mean "use a local folder"
        raise RuntimeError(
            f"could not load GLUE {info.name!r} split {hub_split!r} from the Hugging Face hub "
            f"(nyu-mll/glue, config {info.hub_config!r}): {type(e).__name__}: {e}. "
            "Pass data_dir=<GLUE folder> (GLUE download layout: <folder>/SST-2/train.tsv ...)."
        ) from e
    texts = tuple(list(ds[k]) for k in info.text_keys)
    dtype = np.float32 if info.is_regression else np.int32
    return Examples(texts, np.asarray(ds["label"], dtype))


def read_examples(task: str, split: str, *, data_dir: str | os.PathLike | None = None) -> Examples:
    """Raw texts and labels of one split ("train", "validation" or "test"; "dev" accepted).

    data_dir None reads the hub, a path reads the local GLUE layout. Labels: int32 [N]
    (float32 [N] for stsb), -1 for unlabeled test rows.
    """
    info, split = get_task(task), _split_name(split)
    return _read_hub(info, split) if data_dir is None else _read_local(info, split, data_dir)


def bucket_length(lengths: np.ndarray, max_length: int, *, quantile: float = 1.0) -> int:
    """Padded length for token counts `lengths` [N]: the `quantile` of them rounded up to a
    multiple of 16 (to a power of two below 16), capped at `max_length`.
    """
    if len(lengths) == 0:
        return min(16, max_length)
    need = int(math.ceil(np.quantile(np.asarray(lengths), quantile)))
    bucket = 1 << max(need - 1, 0).bit_length() if need < 16 else -(-need // 16) * 16
    return int(min(bucket, max_length))


def _pad(rows: list[list[int]], length: int, value: int, left: bool) -> np.ndarray:
    """Ragged int lists -> int32 [N, length], padded with `value` on the right (or left)."""
    out = np.full((len(rows), length), value, np.int32)
    for i, row in enumerate(rows):
        row = row[:length]
        if row:
            if left:
                out[i, length - len(row) :] = row
            else:
                out[i, : len(row)] = row
    return out


def _encode(tokenizer: Any, texts: tuple[list[str], ...], max_length: int) -> dict[str, Any]:
    return tokenizer(*texts, truncation=True, max_length=max_length, padding=False)


def _to_arrays(tokenizer: Any, enc: dict[str, Any], length: int) -> dict[str, np.ndarray]:
    """Pads a tokenizer's ragged output to int32 [N, length] arrays (always token_type_ids)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # decoder tokenizers often have no pad token; the mask hides it anyway
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    ids = enc["input_ids"]
    masks = enc.get("attention_mask") or [[1] * len(r) for r in ids]
    types = enc.get("token_type_ids") or [[0] * len(r) for r in ids]
    return {
        "input_ids": _pad(ids, length, pad_id, left),
        "attention_mask": _pad(masks, length, 0, left),
        "token_type_ids": _pad(types, length, 0, left),
    }


def tokenize(
    examples: dict[str, Examples], tokenizer: Any, *, max_length: int = 128, quantile: float = 1.0
) -> dict[str, dict[str, np.ndarray]]:
    """Tokenizes each split with one shared length bucket L (see bucket_length).

    Returns {split: {"input_ids", "attention_mask", "token_type_ids": int32 [N, L],
    "label": int32 [N] (float32 for stsb)}}. Pairs are truncated longest-first to L.
    """
    encs = {s: _encode(tokenizer, ex.texts, max_length) for s, ex in examples.items()}
    lengths = np.concatenate([[len(r) for r in e["input_ids"]] for e in encs.values()] or [[]])
    length = bucket_length(lengths.astype(np.int64), max_length, quantile=quantile)
    out = {}
    for split, ex in examples.items():
        enc = encs[split]
        if length < max(map(len, enc["input_ids"]), default=0):  # re-encode: keeps [SEP] etc.
            enc = _encode(tokenizer, ex.texts, length)
        out[split] = {**_to_arrays(tokenizer, enc, length), "label": ex.labels}
    return out


def _no_torch_notice(record: logging.LogRecord) -> bool:
    """transformers announces at import that it found no PyTorch; tokenizers need none."""
    return "PyTorch was not found" not in record.getMessage()


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The model's own tokenizer from its folder (transformers AutoTokenizer)."""
    # A filter, not a level: transformers resets its logger's level when it loads.
    logging.getLogger("transformers").addFilter(_no_torch_notice)
    from transformers import AutoTokenizer  # slow import

    return AutoTokenizer.from_pretrained(str(path))


def load(
    task: str,
    *,
    tokenizer: Any,
    data_dir: str | os.PathLike | None = None,
    splits: tuple[str, ...] = ("train", "validation"),
    max_length: int = 128,
    length_quantile: float = 1.0,
) -> dict[str, dict[str, np.ndarray]]:
    """Reads and tokenizes `splits` of `task`.

    tokenizer: a Hugging Face tokenizer, or the path of a model folder holding one.
    data_dir: None for the hub ("nyu-mll/glue"), else a local folder in the GLUE layout.
    Returns {split: {"input_ids", "attention_mask", "token_type_ids": int32 [N, L],
    "label": int32 [N] or float32 [N] for stsb}}, L the bucket covering `length_quantile`
    of all requested splits' token counts, capped at max_length.
    """
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = load_tokenizer(tokenizer)
    names = [_split_name(s) for s in splits]
    examples = {s: read_examples(task, s, data_dir=data_dir) for s in names}
    return tokenize(examples, tokenizer, max_length=max_length, quantile=length_quantile)
