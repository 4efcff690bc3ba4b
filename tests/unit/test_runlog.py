"""The run log is readable while its run writes it, and survives a run killed mid-write."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from gradmix.trainer.runlog import RunLog, log_path, read_log


def test_an_event_being_written_is_not_read_until_its_newline(tmp_path: Path) -> None:
    log = RunLog(tmp_path, 0)
    log.event("step", step=1)
    with log.path.open("a", encoding="utf-8") as f:  # a second event, half written
        f.write('{"event": "st')
    assert [e["step"] for e in read_log(log.path)] == [1]
    with log.path.open("a", encoding="utf-8") as f:
        f.write('ep", "step": 2}\n')
    assert [e["step"] for e in read_log(log.path)] == [1, 2]
    log.close()


def test_a_torn_event_left_by_a_killed_run_is_cut_before_appending(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = log_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"event": "step", "step": 1}) + '\n{"event": "st')
    with caplog.at_level(logging.WARNING, logger="gradmix.trainer"):
        log = RunLog(tmp_path, 0)
    log.event("resume", step=1)
    log.close()
    assert [e["event"] for e in read_log(path)] == ["step", "resume"]
    assert "dropping 13 bytes" in caplog.text
    for line in path.read_text().splitlines():
        json.loads(line)  # every line whole


def test_an_empty_or_missing_log_starts_clean(tmp_path: Path) -> None:
    log = RunLog(tmp_path, 3)
    log.close()
    assert read_log(log.path) == []
