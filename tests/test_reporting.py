"""Tests of run reporting (floranna_jax/reporting.py): a row torn by a kill, a corrupt row,
a killed then resumed run whose TensorBoard events hold each round once, the task's
continuous metric in the summary, and the generations files."""

import collections
import json
import logging
import re
import struct

import pytest
from tensorboardX.proto import event_pb2

from floranna_jax import reporting


def _row(r: int) -> dict:
    return {"round": r, "train/loss": 1.0 / r, "server/rho_rel": 0.1 * r}


def _reporter(workdir, start_round: int) -> reporting.Reporter:
    return reporting.Reporter(
        str(workdir), start_round=start_round, num_rounds=6, main_metric="accuracy"
    )


def _kill(reporter: reporting.Reporter) -> None:
    """What a killed process leaves: flushed files, no summary."""
    reporter.writer.close()
    reporter.bar.close()


def _scalar_events(logdir) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in every event file under ``logdir``.

    TFRecord framing: uint64 length, uint32 crc, payload, uint32 crc (neither crc checked).
    """
    out = []
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_torn_last_row_is_dropped_and_resume_proceeds(tmp_path, caplog):
    path = tmp_path / reporting.METRICS_FILE
    rows = [_row(r) for r in (1, 2, 3)]
    torn = '{"round": 4, "tr'  # killed mid-write: no closing brace, no newline
    path.write_text("".join(f"{json.dumps(r)}\n" for r in rows) + torn)
    with caplog.at_level(logging.WARNING):
        assert reporting.read_rows(path) == rows
    assert f"{path}:4" in caplog.text

    reporter = _reporter(tmp_path, start_round=3)
    assert path.read_text() == "".join(f"{json.dumps(r)}\n" for r in rows)
    reporter.write(_row(4))
    _kill(reporter)
    assert path.read_text().splitlines()[-1].startswith('{"round": 4, "train/loss"')
    assert [r["round"] for r in reporting.read_rows(path)] == [1, 2, 3, 4]


def test_corrupt_middle_row_raises_naming_file_and_line(tmp_path):
    path = tmp_path / reporting.METRICS_FILE
    lines = [json.dumps(_row(1)), '{"round": 2, "tr', json.dumps(_row(3))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: "):
        reporting.read_rows(path)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: "):
        _reporter(tmp_path, start_round=3)


def test_resumed_run_writes_each_round_once_to_tensorboard(tmp_path):
    first = _reporter(tmp_path, start_round=0)
    for r in range(1, 6):
        first.write(_row(r))
    _kill(first)  # the checkpoint is at round 3: rounds 4 and 5 are redone
    resumed = _reporter(tmp_path, start_round=3)
    for r in range(4, 7):
        resumed.write(_row(r))
    resumed.finish("resumed")

    events = _scalar_events(tmp_path / "tensorboard")
    counts = collections.Counter((tag, step) for tag, step, _ in events)
    # The old code either shows rounds 4-5 twice (a second file) or loses 1-3 (same-second
    # file name, overwritten).
    assert counts == {(tag, r): 1 for tag in ("train/loss", "server/rho_rel") for r in range(1, 7)}
    rows = {r["round"]: r for r in reporting.read_rows(tmp_path / reporting.METRICS_FILE)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for tag, step, value in events:
        assert value == pytest.approx(rows[step][tag], rel=1e-6), (tag, step)  # float32 events


def test_summary_shows_the_loss_metric_before_and_after():
    rows = [
        {"round": 0, "eval/global/accuracy": 0.1, "eval/global/answer_loss": 2.5},
        {"round": 1, "eval/global/accuracy": 0.2, "eval/global/answer_loss": 1.25,
         "eval/local/answer_loss": 1.5, "eval/gap/answer_loss": 0.25},
    ]  # fmt: skip
    lines = reporting.summary_table(rows, "accuracy", "t", loss_metric="answer_loss")
    lines = [line.replace(" ", "") for line in lines.splitlines()]
    for want in ("|globalanswer_lossbeforeround1|2.5|", "|globalanswer_loss|1.25|",
                 "|localanswer_loss(meanoverclients)|1.5|", "|globalaccuracy|0.2|"):  # fmt: skip
        assert want in lines, want
    plain = reporting.summary_table(rows, "accuracy", "t")
    assert "answer_loss" not in plain


def test_generations_are_written_per_round_and_rewritten_on_resume(tmp_path):
    reporter = _reporter(tmp_path, start_round=0)
    reporter.write_generations(1, [{"output": "a"}, {"output": "b"}])
    reporter.write_generations(1, [{"output": "c"}])  # the resumed run's evaluation of round 1
    path = tmp_path / reporting.GENERATIONS_DIR / "round_1.jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"output": "c"}]
    _kill(reporter)
    quiet = reporting.Reporter(str(tmp_path / "other"), start_round=0, num_rounds=1,
                               main_metric="accuracy", primary=False)  # fmt: skip
    quiet.write_generations(1, [{"output": "a"}])
    assert not (tmp_path / "other").exists()  # only process 0 writes
