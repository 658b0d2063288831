"""Reading JSON records: gzip, blank lines, and one clear error naming the file and line."""

import gzip

import pytest

from floranna_jax.data import jsonl


def test_reads_plain_and_gzip_and_skips_blank_lines(tmp_path):
    text = '{"a": 1, "b": "x"}\n\n{"a": 2, "b": "y"}\n'
    (tmp_path / "rows.jsonl").write_text(text)
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt") as f:
        f.write(text)
    for name in ("rows.jsonl", "rows.jsonl.gz"):
        rows = jsonl.read(tmp_path / name, required={"a": int, "b": str})
        assert rows == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1}\n{"a": 2,\n', r":2: malformed JSON line"),
        ('{"a": 1}\n\n[1, 2]\n', r":3: expected a JSON object, got list"),
        ('{"a": 1}\n{"b": 2}\n', r":2: missing field\(s\) \['a'\]; it has \['b'\]"),
        ('{"a": "1"}\n', r":1: field 'a' should be int, got str"),
        ('{"a": true}\n', r":1: field 'a' should be int, got bool"),
        ('{"a": -1}\n', r":1: a must be positive"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(text)

    def positive(row):
        if row["a"] < 0:
            raise ValueError("a must be positive")

    with pytest.raises(ValueError, match=f"^{path}{message}"):
        jsonl.read(path, required={"a": int}, check=positive)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no file at {tmp_path / 'absent.jsonl'}"):
        jsonl.read(tmp_path / "absent.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"a": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="latin1.jsonl: unreadable: UnicodeDecodeError"):
        jsonl.read(tmp_path / "latin1.jsonl")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="broken.jsonl.gz: unreadable: BadGzipFile"):
        jsonl.read(tmp_path / "broken.jsonl.gz")


def test_json_list(tmp_path):
    path = tmp_path / "items.json"
    path.write_text('[{"a": 1}, {"a": 2}]')
    assert jsonl.read_list(path, required={"a": int}) == [{"a": 1}, {"a": 2}]
    path.write_text('[{"a": 1},\n {"a": 2},\n {"a" 3}]')
    with pytest.raises(ValueError, match=f"^{path}:3: malformed JSON"):
        jsonl.read_list(path)
    path.write_text('[{"a": 1}, {"c": 2}]')
    with pytest.raises(ValueError, match=f"^{path}: item 1: missing field"):
        jsonl.read_list(path, required={"a": int})
    path.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="expected a JSON list of objects, got dict"):
        jsonl.read_list(path)


def test_lone_surrogate_and_empty_file(tmp_path):
    # Valid JSON escapes, but half of a UTF-16 pair is no text: named, not a tokenizer crash.
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1, "b": "ok"}\n{"a": 2, "b": "x\\ud800"}\n')
    with pytest.raises(ValueError, match=f"^{path}:2: field 'b' holds .*surrogate"):
        jsonl.read(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match=f"^{path}: no records"):
        jsonl.read(path)
    (tmp_path / "items.json").write_text("[]")
    with pytest.raises(ValueError, match="items.json: no records"):
        jsonl.read_list(tmp_path / "items.json")
