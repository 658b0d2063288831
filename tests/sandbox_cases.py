"""Shared by the sandbox tests: who runs sandboxed programs now, and timing bounds."""

import os
import pathlib
import time

from floranna_jax import sandbox, sandbox_slots

TIMEOUT_S = 3.0
SLACK_S = 3.0  # killing, reaping and cleaning up on a loaded 2-core machine


def sandbox_uids() -> range:
    """The uids sandboxed programs run as (empty when we are not root)."""
    if os.geteuid() != 0:
        return range(0)
    return range(sandbox_slots.BASE_ID, sandbox_slots.BASE_ID + sandbox_slots.MAX_SLOTS)


def processes_of(uids) -> list[int]:
    """Pids of the live processes (zombies aside) whose real uid is in `uids`."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue  # gone meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields and not fields["State"].split()[0] == "Z":
            if int(fields["Uid"].split()[0]) in uids:
                found.append(int(entry.name))
    return found


def wait_for_no_more_than(count: int, uids, within_s: float = 5.0) -> int:
    """The number of processes of `uids` once it is <= `count` or `within_s` has passed."""
    deadline = time.monotonic() + within_s
    while (now := len(processes_of(uids))) > count and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


def assert_failed_in_time(result: sandbox.Result, reason: str = "") -> None:
    """Failed for `reason` within the wall-clock limit (plus slack)."""
    assert not result.passed, result
    assert reason in result.reason, result
    assert result.seconds < sandbox.WALL_FACTOR * TIMEOUT_S + SLACK_S, result
