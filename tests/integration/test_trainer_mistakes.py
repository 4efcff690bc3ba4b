"""A newcomer's mistakes fail loudly: one line and exit 2 before the model is built, or
a console warning and an end-of-run summary that says what gradmix did not do.

Each test runs `gradmix-train` as a subprocess against a real server on a
loopback port over a real store in tmp_path:

- the trainer's store is not the server's store;
- a typo in the policy name;
- the server is not running;
- a task file with a bad line;
- the server refusing the job after set-up (it came back on another store):
  the run stops with one line, exit 1, or trains on with
  `on_server_error = "continue"`;
- a task registered without a `path=` the trainer can read (the README once
  showed `uri=`): warned on the console, listed in the summary, reported to
  the server, which gives it weight 0 (state failed).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradmix.client import SelectionClient
from gradmix.server.app import RunningServer, build_server
from gradmix.server.config import ServerConfig
from gradmix.trainer.runlog import log_path, read_log
from prometheus_client import CollectorRegistry
from test_trainer_run import server, write_config, write_data  # noqa: F401 (fixture)

MAIN = [sys.executable, "-m", "gradmix.trainer.main", "--config"]


def _env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _run(config: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MAIN, str(config)],
        cwd=config.parent,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line_exit_2(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("gradmix-train: ")
    return lines[0]


def test_a_store_other_than_the_servers_stops_naming_both(
    tmp_path: Path, server: tuple[int, Path]  # noqa: F811
) -> None:
    port, store = server
    data = write_data(tmp_path / "data")
    elsewhere = tmp_path / "job-dir" / "gradmix-store"
    config = write_config(data, job="where", port=port, store=elsewhere)
    line = _one_line_exit_2(_run(config))
    assert str(elsewhere) in line and str(store.resolve()) in line, line
    assert not elsewhere.exists(), "the check must not create the wrong store"


def test_a_policy_name_typo_stops_at_once(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")
    config = write_config(data, job="typo", port=1, store=tmp_path / "store")
    config.write_text(config.read_text() + '\n[policy]\npolicy = "ensembel"\n')
    line = _one_line_exit_2(_run(config))
    assert "[policy]" in line and "'ensembel'" in line and "ensemble" in line, line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_server_that_is_not_running_stops_at_once(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")
    port = _free_port()
    config = write_config(data, job="nobody", port=port, store=tmp_path / "store")
    line = _one_line_exit_2(_run(config))
    assert f"127.0.0.1:{port}" in line and "UNAVAILABLE" in line, line


def test_a_task_file_with_a_bad_line_stops_naming_the_line(
    tmp_path: Path, server: tuple[int, Path]  # noqa: F811
) -> None:
    port, store = server
    data = write_data(tmp_path / "data")
    with (data / "mul.jsonl").open("a") as f:
        f.write('{"prompt": "1*1=", "completion": 1}\n')
    config = write_config(data, job="bad", port=port, store=store)
    line = _one_line_exit_2(_run(config))
    lines = len((data / "mul.jsonl").read_text().splitlines())
    assert f"[data].tasks.mul: {data / 'mul.jsonl'}:{lines}: bad example" in line, line


def test_the_job_existing_with_another_spec_stops_before_training(
    tmp_path: Path, server: tuple[int, Path]  # noqa: F811
) -> None:
    from gradmix.client import SketchSpec

    port, store = server
    with SelectionClient(f"127.0.0.1:{port}") as client:
        client.create_job("taken", sketch=SketchSpec(dim=8))
    data = write_data(tmp_path / "data")
    config = write_config(data, job="taken", port=port, store=store)
    line = _one_line_exit_2(_run(config))
    assert "'taken' exists with another spec" in line and "ALREADY_EXISTS" in line, line
    assert not (data / "out" / "checkpoints").exists()


@pytest.mark.slow
def test_a_task_without_a_readable_path_is_warned_and_summarised(
    tmp_path: Path, server: tuple[int, Path]  # noqa: F811
) -> None:
    port, store = server
    data = write_data(tmp_path / "data")
    config = write_config(
        data,
        job="meta",
        port=port,
        store=store,
        training="steps = 30",
        sketching="interval = 10",
    )
    proc = subprocess.Popen(
        [*MAIN, str(config)], cwd=data, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        rank0 = log_path(data / "out", 0)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if rank0.exists() and any(e["event"] == "job" for e in read_log(rank0)):
                break
            time.sleep(0.2)
        with SelectionClient(f"127.0.0.1:{port}") as client:
            client.register_task("meta", "web", {"uri": "s3://data/web.jsonl"})
        _, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    assert "WARNING" in stderr and "task web: no data file found" in stderr, stderr[-4000:]
    assert "never sketched: web: no data file found" in stderr, stderr[-4000:]
    events = read_log(log_path(data / "out", 0))
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 30 and all(e["task"] != "web" for e in steps)
    summary = next(e for e in events if e["event"] == "summary")
    assert summary["estimated"] is True and "web" in summary["never_sketched"]
    assert summary["anchors_completed"] and summary["versions"][0][1] == 0
    assert summary["sketch_seconds"] > 0
    assert json.dumps(summary)  # the run log keeps it whole
    # The server was told: the task left the mixture, so no data loader draws it.
    with SelectionClient(f"127.0.0.1:{port}") as client:
        web = next(t for t in client.list_tasks("meta") if t.name == "web")
        mixture = client.get_mixture("meta")
    assert web.state == "failed" and "no data file found" in web.failure
    assert mixture.weights["web"] == 0.0 and mixture.states["web"] == "failed"


def _start(store: Path, port: int = 0) -> tuple[RunningServer, int]:
    config = ServerConfig(store=str(store), port=port, metrics_port=0, debounce_seconds=0.1,
                          insecure=True)
    return build_server(config, registry=CollectorRegistry())


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_a_refusal_after_set_up_ends_the_run_unless_told_to_continue(
    tmp_path: Path, policy: str
) -> None:
    """The server comes back on another (empty) store: the job is NOT_FOUND there."""
    first, port = _start(tmp_path / "store")
    data = write_data(tmp_path / "data")
    # Enough steps that the run outlives the switch of servers by many seconds
    # on a fast machine: the trainer learns of the refusal from its watch, which
    # reconnects for up to 3 s and then probes every second while the server is
    # away. At 40 steps/s 50 steps once ended first, and at 100 steps/s 300 did;
    # a stopped run ends at the refusal, the other trains on (~15-40 s).
    steps = 1500
    config = write_config(
        data, job="gone", port=port, store=tmp_path / "store",
        training=f"steps = {steps}", sketching="interval = 10",
    )
    config.write_text(f'on_server_error = "{policy}"\n' + config.read_text())
    proc = subprocess.Popen(
        [*MAIN, str(config)], cwd=data, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    rank0 = log_path(data / "out", 0)
    second = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            events = read_log(rank0) if rank0.exists() else []
            if any(e["event"] == "mixture" and e["version"] >= 2 for e in events):
                break
            time.sleep(0.2)
        first.stop(grace=0)
        second, _ = _start(tmp_path / "other-store", port)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
        if second is not None:
            second.stop(grace=0)
    events = read_log(rank0)
    done = [e["step"] for e in events if e["event"] == "step"]
    if policy == "stop":
        assert proc.returncode == 1, stderr[-3000:]
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("gradmix-train: stopped at step") and "NOT_FOUND" in last, last
        assert len(done) < steps
        summary = next(e for e in events if e["event"] == "summary")
        assert "NOT_FOUND" in summary["stopped_by"]
    else:
        assert proc.returncode == 0, stderr[-3000:]
        assert "ERROR" in stderr and "no longer being estimated" in stderr, stderr[-3000:]
        assert len(done) == steps
