"""Reading JSON records from local files: JSON lines (.jsonl, .jsonl.gz) and JSON lists.

    rows = jsonl.read("/data/gsm8k/test.jsonl", required={"question": str, "answer": str})

Every record is kept and checked: a line that is not a JSON object, lacks a required
field, holds one of another type, holds a lone UTF-16 surrogate (``"\\ud800"``: valid JSON,
but no text), or fails the caller's `check`, raises one ValueError naming the file and the
line (the item, for a JSON list). A file without records raises ValueError naming it. A
missing file raises FileNotFoundError naming it.
"""

import gzip
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[dict[str, Any]], None]


def _check(record: Any, where: str, required: Mapping[str, type], check: Check | None) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    _check_text(record, where)
    missing = [k for k in required if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; it has {sorted(record)}")
    for key, kind in required.items():
        if not isinstance(record[key], kind) or (kind is int and isinstance(record[key], bool)):
            got = type(record[key]).__name__
            raise ValueError(f"{where}: field {key!r} should be {kind.__name__}, got {got}")
    if check is not None:
        try:
            check(record)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
    return record


def _check_text(record: dict, where: str) -> None:
    """JSON escapes can spell half a surrogate pair, which no text encoding takes: name
    the field here rather than fail in the tokenizer."""
    for key, value in record.items():
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            bad = e.object[e.start : e.end]
            raise ValueError(
                f"{where}: field {key!r} holds {bad!r}, half of a UTF-16 surrogate pair and no "
                "text; fix or remove this record"
            ) from None


def _nonempty(rows: list[dict[str, Any]], path: pathlib.Path) -> list[dict[str, Any]]:
    if not rows:
        raise ValueError(f"{path}: no records (an empty file); give a file with the data")
    return rows


def _open(path: pathlib.Path):
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read(
    path: str | os.PathLike, *, required: Mapping[str, type] = {}, check: Check | None = None
) -> list[dict[str, Any]]:
    """Records of a JSON-lines file, one object per non-blank line; gzip if it ends in .gz.

    required: {field: type} every record must have. check: raises ValueError (its message
    then gets the file and line) for a record that is unusable.
    """
    path = pathlib.Path(path)
    rows = []
    with _open(path) as f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: malformed JSON line: {e}") from e
                rows.append(_check(record, f"{path}:{number}", required, check))
        except (UnicodeDecodeError, OSError, EOFError) as e:  # bad UTF-8, corrupt gzip
            raise ValueError(f"{path}: unreadable: {type(e).__name__}: {e}") from e
    return _nonempty(rows, path)


def read_list(
    path: str | os.PathLike, *, required: Mapping[str, type] = {}, check: Check | None = None
) -> list[dict[str, Any]]:
    """Records of a file holding one JSON list of objects (e.g. sanitized-mbpp.json); see
    `read` for `required` and `check`."""
    path = pathlib.Path(path)
    with _open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    rows = [_check(r, f"{path}: item {i}", required, check) for i, r in enumerate(data)]
    return _nonempty(rows, path)
