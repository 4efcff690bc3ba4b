"""The end-of-run summary and the piped progress lines, without a training run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from gradmix.trainer.console import Progress
from gradmix.trainer.runlog import RunLog, log_path, read_log
from gradmix.trainer.summary import RunSummary


def test_a_run_that_never_estimated_says_so_plainly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    summary = RunSummary(
        steps=30,
        versions=[(1, 0, "")],
        open_anchor="anchor-00000000",
        never_sketched={"<target>": "sketch failed: NOT_FOUND: job 'x' not found"},
        sketch_seconds=1.5,
        server_seconds=12.0,
    )
    log = RunLog(tmp_path, 0)
    with caplog.at_level(logging.INFO, logger="gradmix.trainer"):
        summary.report(log, logging.getLogger("gradmix.trainer"))
    log.close()
    text = caplog.text
    assert "v1@0 (not estimated)" in text and "anchor-00000000 never completed" in text
    assert "never sketched: <target>: sketch failed: NOT_FOUND" in text
    assert "gradmix never produced an estimated mixture" in text
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    (event,) = [e for e in read_log(log_path(tmp_path, 0)) if e["event"] == "summary"]
    assert event["estimated"] is False and event["server_seconds"] == 12.0


def test_an_estimated_run_reports_its_versions_and_anchors() -> None:
    summary = RunSummary(
        steps=60,
        versions=[(1, 0, ""), (2, 1, "anchor-00000000"), (3, 31, "anchor-00000030")],
        anchors_completed=[("anchor-00000000", 0), ("anchor-00000030", 30)],
    )
    lines = summary.lines()
    assert summary.estimated
    assert lines[0].endswith("v1@0 (not estimated), v2@1, v3@31")
    assert "anchor-00000030 (step 30)" in lines[1]
    assert not any("never produced" in line for line in lines)


def test_piped_progress_prints_compact_lines(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gradmix.trainer"), Progress(
        3, tty=False, every=0.0
    ) as progress:
        for _ in range(3):
            progress.update("server=ok", "v2 anchor=@0 loss=1.000 target=2.000")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4  # one per update (every=0), and the last again at the end
    assert lines[-1].startswith("step 3/3 ") and "eta 0s server=ok v2" in lines[-1]
    assert all("\r" not in line for line in lines)
