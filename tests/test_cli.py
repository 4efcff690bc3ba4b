"""The `gradmix` CLI as a subprocess against the real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gradmix.client.cli import build_parser
from test_client_support import Served, create_job, serve, sketch_job, wait_for

GRADMIX = str(Path(sys.executable).parent / "gradmix")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve(tmp_path)


def run(served: Served, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GRADMIX_SERVER": served.address}
    done = subprocess.run([GRADMIX, *args], env=env, capture_output=True, text=True, timeout=60)
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def run_json(served: Served, *args: str) -> Any:
    return json.loads(run(served, *args, "--json").stdout)


def test_command_surface_is_frozen() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    assert sorted(commands.choices) == sorted(  # type: ignore[arg-type]
        ["jobs", "tasks", "anchors", "register-task", "mixture", "history", "estimate", "select",
         "retire-task", "activate-task", "update-task", "pin", "unpin", "delete-job",
         "archive-job", "events"]
    )
    top = {o for a in parser._actions for o in a.option_strings}
    assert {"--server", "--tls", "--ca-cert", "--token", "--timeout", "--json"} <= top


def test_jobs_tasks_register_and_mixture(served: Served) -> None:
    create_job(served.client)
    task = run_json(served, "register-task", "job", "docs", "--meta", "uri=s3://d", "--meta", "n=5")
    assert task["name"] == "docs" and task["metadata"] == {"uri": "s3://d", "n": "5"}
    run(served, "register-task", "job", "code")
    jobs = run_json(served, "jobs")
    assert [j["name"] for j in jobs] == ["job"]
    assert jobs[0]["spec"]["sketch"]["dim"] == 8
    assert [t["name"] for t in run_json(served, "tasks", "job")] == ["docs", "code"]
    assert "TASK" in run(served, "tasks", "job").stdout

    def over_both() -> Any:
        mixture = run_json(served, "--json", "mixture", "job")  # --json before the command too
        return mixture if set(mixture["weights"]) == {"docs", "code"} else None

    mixture = wait_for(over_both, "a mixture over both tasks")
    assert sum(mixture["weights"].values()) == pytest.approx(1.0)
    text = run(served, "mixture", "job").stdout
    assert f"version {mixture['version']}" in text and "docs" in text and "WEIGHT" in text
    history = run_json(served, "history", "job")
    assert [m["version"] for m in history] == list(range(1, mixture["version"] + 1))
    assert "VERSION" in run(served, "history", "job").stdout


def test_estimate_select_and_anchors(served: Served) -> None:
    create_job(served.client)
    sketch_job(served.client)
    wait_for(lambda: served.client.get_mixture("job").states.get("help") == "active" or None,
             "help to become active")
    anchors = run_json(served, "anchors", "job")
    assert [(a["name"], a["state"]) for a in anchors] == [("a0", "complete")]
    estimate = run_json(served, "estimate", "job", "--subset", "help", "--subset", "help,harm",
                        "--subset", "", "--mode", "exact")
    assert estimate["subsets"] == [["help"], ["help", "harm"], []]
    assert len(estimate["losses"]) == 3
    assert estimate["losses"][0] < estimate["anchor_loss"]
    assert "VS_ANCHOR" in run(served, "estimate", "job", "--subset", "harm").stdout
    top = run_json(served, "select", "job", "--method", "top_k", "--k", "1")
    assert top["selected"] == ["help"]
    forward = run_json(served, "select", "job", "--method", "forward")
    assert forward["selected"] == ["help"]
    assert "SELECTED" in run(served, "select", "job", "--threshold", "0").stdout


def test_errors_exit_non_zero_with_one_line(served: Served) -> None:
    missing = run(served, "tasks", "nope", ok=False)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("gradmix: error: NOT_FOUND: ")
    create_job(served.client)
    bad = run(served, "register-task", "job", "x", "--meta", "novalue", ok=False)
    assert bad.returncode == 1
    assert bad.stderr.startswith("gradmix: error: INVALID_ARGUMENT: ")
    down = run(served, "--server", "127.0.0.1:1", "--timeout", "0.2", "jobs", ok=False)
    assert down.returncode == 1 and down.stderr.startswith("gradmix: error: UNAVAILABLE: ")
    assert down.stderr.count("\n") == 1


@pytest.mark.timeout(120)
def test_mixture_watch_prints_new_versions_and_exits_zero_on_ctrl_c(served: Served) -> None:
    create_job(served.client)
    served.client.register_task("job", "a")
    first = wait_for(lambda: served.client.get_job("job").mixture_version or None, "version 1")
    env = {**os.environ, "GRADMIX_SERVER": served.address}
    proc = subprocess.Popen([GRADMIX, "mixture", "job", "--watch", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["version"] == first
        served.client.register_task("job", "b")
        update = json.loads(proc.stdout.readline())
        assert update["version"] == first + 1 and set(update["weights"]) == {"a", "b"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(120)
def test_mixture_watch_refreshes_the_table(served: Served) -> None:
    create_job(served.client)
    served.client.register_task("job", "a")
    first = wait_for(lambda: served.client.get_job("job").mixture_version or None, "version 1")
    env = {**os.environ, "GRADMIX_SERVER": served.address}
    proc = subprocess.Popen([GRADMIX, "mixture", "job", "--watch"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert f"version {first} " in proc.stdout.readline()
        served.client.register_task("job", "b")
        lines = iter(proc.stdout.readline, "")
        header = next(line for line in lines if line.startswith("job job"))
        assert f"version {first + 1} " in header
        rows = [next(lines), next(lines), next(lines)]
        assert rows[0].split() == ["TASK", "WEIGHT", "SCORE", "STATE"]
        assert {r.split()[0] for r in rows[1:]} == {"a", "b"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
