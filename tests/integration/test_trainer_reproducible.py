"""Reproducible mode: two runs with the same config and seed draw the same tasks at the
same steps, and apply each estimated mixture at the same step (the sketch point that
completed its anchor). Each run has its own real server and store on loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from gradmix.server.app import build_server
from gradmix.server.config import ServerConfig
from gradmix.trainer.runlog import log_path, read_log
from prometheus_client import CollectorRegistry
from test_trainer_run import write_config, write_data

pytestmark = pytest.mark.slow


def _run(root: Path) -> list[dict[str, Any]]:
    store = root / "store"
    config = ServerConfig(store=str(store), port=0, metrics_port=0, debounce_seconds=0.1,
                          insecure=True)
    running, port = build_server(config, registry=CollectorRegistry())
    try:
        data = write_data(root / "data")
        job = write_config(
            data, job="same", port=port, store=store,
            training="steps = 30\nreproducible = true",
            sketching="interval = 10\nreanchor_every = 10",
        )
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "gradmix.trainer.main", "--config", str(job)],
            cwd=data, env=env, capture_output=True, text=True, timeout=400,
        )
        assert done.returncode == 0, done.stderr[-4000:]
    finally:
        running.stop(grace=0)
    return read_log(log_path(data / "out", 0))


def test_two_runs_draw_the_same_tasks_at_the_same_steps(tmp_path: Path) -> None:
    first, second = _run(tmp_path / "one"), _run(tmp_path / "two")

    def draws(events: list[dict[str, Any]]) -> list[str]:
        return [e["task"] for e in sorted(
            (e for e in events if e["event"] == "step"), key=lambda e: e["step"])]

    def estimated(events: list[dict[str, Any]]) -> list[tuple[int, str, dict[str, float]]]:
        return [(e["step"], e["anchor"], e["weights"]) for e in events
                if e["event"] == "mixture" and e["anchor"]]

    a, b = estimated(first), estimated(second)
    def steps(estimated: list[tuple[int, str, dict[str, float]]]) -> list[tuple[int, str]]:
        return [(s, anchor.split("-anchor-")[-1]) for s, anchor, _ in estimated]

    # Each run names its anchors after itself; the steps they were taken at agree.
    assert steps(a) == [(0, "00000000"), (10, "00000010"), (20, "00000020")]
    assert steps(b) == steps(a)
    for (_, _, wa), (_, _, wb) in zip(a, b, strict=True):
        assert wa.keys() == wb.keys()
        assert all(wa[t] == pytest.approx(wb[t], rel=1e-6) for t in wa)
    assert len(draws(first)) == 30 and draws(first) == draws(second)
    assert len(set(draws(first))) > 1
