"""Reproducible mode: two runs with the same config and seed draw the same tasks at the
same steps, and apply each estimated mixture at the same step (the sketch point that
completed its anchor), also when one of them stops mid-run and resumes from its
checkpoint. Each run has its own real server and store on loopback.
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


def _run(root: Path, stop_at: int = 0) -> list[dict[str, Any]]:
    """One reproducible 30-step run; with `stop_at`, it first runs `stop_at` steps and
    stops (its final checkpoint is at that step), then is started again for 30 steps
    and resumes from that checkpoint, against the same server and store."""
    store = root / "store"
    config = ServerConfig(store=str(store), port=0, metrics_port=0, debounce_seconds=0.1,
                          insecure=True)
    running, port = build_server(config, registry=CollectorRegistry())
    try:
        data = write_data(root / "data")
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        for steps in [stop_at, 30] if stop_at else [30]:
            job = write_config(
                data, job="same", port=port, store=store,
                training=f"steps = {steps}\nreproducible = true",
                sketching="interval = 10\nreanchor_every = 10",
            )
            done = subprocess.run(
                [sys.executable, "-m", "gradmix.trainer.main", "--config", str(job)],
                cwd=data, env=env, capture_output=True, text=True, timeout=400,
            )
            assert done.returncode == 0, done.stderr[-4000:]
    finally:
        running.stop(grace=0)
    return read_log(log_path(data / "out", 0))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The run log of one uninterrupted run, shared by the tests."""
    return _run(tmp_path_factory.mktemp("uninterrupted"))


def draws(events: list[dict[str, Any]]) -> list[str]:
    """The task drawn at each step, by step."""
    return [e["task"] for e in sorted(
        (e for e in events if e["event"] == "step"), key=lambda e: e["step"])]


def estimated(events: list[dict[str, Any]]) -> list[tuple[int, str, dict[str, float]]]:
    """(step, anchor, weights) of each estimated mixture applied."""
    return [(e["step"], e["anchor"], e["weights"]) for e in events
            if e["event"] == "mixture" and e["anchor"]]


def steps(estimated: list[tuple[int, str, dict[str, float]]]) -> list[tuple[int, str]]:
    """(step, anchor step) of each estimated mixture: each run names its anchors after
    itself, so only the anchor's step is compared."""
    return [(s, anchor.split("-anchor-")[-1]) for s, anchor, _ in estimated]


def test_two_runs_draw_the_same_tasks_at_the_same_steps(
    tmp_path: Path, uninterrupted: list[dict[str, Any]]
) -> None:
    first, second = uninterrupted, _run(tmp_path / "two")
    a, b = estimated(first), estimated(second)

    # Each run names its anchors after itself; the steps they were taken at agree.
    assert steps(a) == [(0, "00000000"), (10, "00000010"), (20, "00000020")]
    assert steps(b) == steps(a)
    for (_, _, wa), (_, _, wb) in zip(a, b, strict=True):
        assert wa.keys() == wb.keys()
        assert all(wa[t] == pytest.approx(wb[t], rel=1e-6) for t in wa)
    assert len(draws(first)) == 30 and draws(first) == draws(second)
    assert len(set(draws(first))) > 1


def test_a_run_resumed_mid_run_draws_the_same_tasks_at_the_same_steps(
    tmp_path: Path, uninterrupted: list[dict[str, Any]]
) -> None:
    """Stopped at step 20 of 30 and resumed from its checkpoint, a run draws what the
    uninterrupted one drew at every step, and applies the same mixtures at the same
    steps (its resumed part runs the sketch point at 20 and waits there for that
    anchor's estimate).

    It stops at an anchor's step because the stop is a shorter run (`steps = 20`):
    stopped at 15, its anchor at 10 would plan 5 steps to the end of training instead
    of 10 to the next anchor, a different horizon and so a different estimate; that is
    a different job, not a resume."""
    resumed = _run(tmp_path / "resumed", stop_at=20)
    assert [e["step"] for e in resumed if e["event"] == "resume"] == [20]
    assert steps(estimated(resumed)) == steps(estimated(uninterrupted))
    for (_, _, wa), (_, _, wb) in zip(
        estimated(uninterrupted), estimated(resumed), strict=True
    ):
        assert wa.keys() == wb.keys()
        assert all(wa[t] == pytest.approx(wb[t], rel=1e-6) for t in wa), (wa, wb)
    assert len(draws(resumed)) == 30 and draws(resumed) == draws(uninterrupted)
