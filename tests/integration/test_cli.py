"""The `gradmix` CLI as a subprocess against the real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from client_support import Served, create_job, mixture_or_none, serve, sketch_job, wait_for
from gradmix.client.cli import build_parser

GRADMIX = str(Path(sys.executable).parent / "gradmix")


@pytest.fixture(autouse=True)
def ctrl_c_reaches_the_cli() -> Iterator[None]:
    """SIGINT handled here, so that the CLI processes these tests start get it at
    its default (Ctrl-C at a terminal) even where the test runner was started with
    SIGINT ignored (a background job of a shell without job control): an ignored
    signal stays ignored across exec, a handled one goes back to its default."""
    before = signal.getsignal(signal.SIGINT)
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


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


CONNECTION = {"--server", "--tls", "--ca-cert", "--client-cert", "--client-key", "--token",
              "--token-file", "--timeout", "--json"}
#: Every command with its positionals and its own flags (connection options aside).
SURFACE = {
    "jobs": ([], ["--archived"]),
    "create-job": (
        ["job"],
        ["--dim", "--dtype", "--floor", "--manifest-hash", "--policy", "--policy-seed",
         "--prior-weight", "--projector", "--regularization", "--seed", "--smoothing",
         "--subset-count", "--subset-fraction", "--target", "--temperature", "--value-kind"],
    ),
    "tasks": (["job"], []),
    "anchors": (["job"], []),
    "register-task": (["job", "name"], ["--meta"]),
    "mixture": (["job"], ["--version", "--watch"]),
    "history": (["job"], ["--after", "--limit"]),
    "estimate": (["job"], ["--anchor", "--mode", "--subset"]),
    "select": (["job"], ["--anchor", "--k", "--method", "--mode", "--threshold"]),
    "retire-task": (["job", "name"], ["--actor"]),
    "activate-task": (["job", "name"], ["--actor"]),
    "update-task": (["job", "name"], ["--actor", "--meta", "--remove-meta"]),
    "pin": (["job"], ["--actor", "--reason", "--weight"]),
    "unpin": (["job"], ["--actor", "--reason"]),
    "delete-job": (["name"], ["--actor", "--keep-data", "--reason"]),
    "archive-job": (["name"], ["--actor", "--reason"]),
    "unarchive-job": (["name"], ["--actor", "--reason"]),
    "events": (["job"], ["--after"]),
}


def test_command_surface_is_frozen() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    seen = {}
    for name, sub in commands.choices.items():  # type: ignore[union-attr]
        flags = {o for a in sub._actions for o in a.option_strings if o.startswith("--")}
        assert flags >= CONNECTION, name
        positionals = [a.dest for a in sub._actions if not a.option_strings]
        seen[name] = (positionals, sorted(flags - CONNECTION - {"--help"}))
    assert seen == SURFACE
    top = {o for a in parser._actions for o in a.option_strings}
    assert top >= CONNECTION


@pytest.mark.parametrize("command", [None, *SURFACE])
def test_every_help_prints_and_exits_zero(command: str | None, capsys: Any) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: gradmix") and "GRADMIX_SERVER" in text


def test_create_job_takes_the_spec_fields(served: Served) -> None:
    job = run_json(
        served, "create-job", "made", "--dim", "16", "--projector", "dense", "--seed", "3",
        "--target", "t.jsonl", "--policy", "uniform", "--temperature", "0.7",
    )
    assert job["name"] == "made" and job["spec"]["sketch"]["dim"] == 16
    assert job["spec"]["sketch"]["projector"] == "dense" and job["spec"]["sketch"]["seed"] == 3
    assert job["spec"]["policy"]["policy"] == "uniform"
    assert job["spec"]["policy"]["temperature"] == pytest.approx(0.7)
    assert job["spec"]["target"] == "t.jsonl"
    again = run_json(served, "create-job", "made", "--dim", "16", "--projector", "dense",
                     "--seed", "3", "--policy", "uniform")
    assert again["created_at"] == job["created_at"]
    clash = run(served, "create-job", "made", "--dim", "32", ok=False)
    assert clash.returncode != 0
    assert clash.stderr.count("\n") == 1 and "ALREADY_EXISTS" in clash.stderr
    bad = run(served, "create-job", "other", "--dim", "8", "--smoothing", "2", ok=False)
    assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr
    assert run_json(served, "register-task", "made", "x")["name"] == "x"


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
        if mixture_or_none(served.client) is None:  # the first version is yet to come
            return None
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
    def help_active() -> bool | None:
        mixture = mixture_or_none(served.client)
        return (mixture is not None and mixture.states.get("help") == "active") or None

    wait_for(help_active, "help to become active")
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
        assert next(lines).startswith("anchor_loss ")  # the header's second line
        rows = [next(lines), next(lines), next(lines)]
        assert rows[0].split() == ["TASK", "WEIGHT", "SCORE", "STATE"]
        assert {r.split()[0] for r in rows[1:]} == {"a", "b"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_server_help_describes_every_setting_with_its_default() -> None:
    import dataclasses

    from gradmix.server.config import ServerConfig, field_docs

    server = str(Path(sys.executable).parent / "gradmix-server")
    done = subprocess.run([server, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    docs = field_docs()
    for field in dataclasses.fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in text and " ".join(docs[field.name].split()[:4]) in text, field.name
        shown = "the estimator's own" if field.default is None else repr(field.default)
        assert f"(default {shown}; env GRADMIX_{field.name.upper()})" in text, field.name


def _own_line(stream: Any) -> str:
    """The next line the CLI wrote itself (grpc's C core may log to stderr too)."""
    for _ in range(200):
        line = str(stream.readline())
        if not line or line.startswith("gradmix:"):
            return line
    return ""


# WATCH RACE (known, not fixed): a WatchMixture stream opened while the server is
# stopping can block in grpc's `next()` with no error (in about 1 of 9 tries when the
# server stopped right after the CLI printed its first version), so the watch never
# sees the outage. The two tests below stop the server only once a version has come
# over the stream.


@pytest.mark.timeout(180)
def test_mixture_watch_says_when_it_is_disconnected_and_back(served: Served) -> None:
    from client_support import start_server

    create_job(served.client)
    served.client.register_task("job", "a")
    first = wait_for(lambda: served.client.get_job("job").mixture_version or None, "version 1")
    env = {**os.environ, "GRADMIX_SERVER": served.address}
    proc = subprocess.Popen([GRADMIX, "mixture", "job", "--watch", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    again = None
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert json.loads(proc.stdout.readline())["version"] == first
        # A version received over the stream: the watch is open before the server stops
        # (a stream opened while the server shuts down can hang: WATCH RACE, above).
        served.client.register_task("job", "b")
        assert json.loads(proc.stdout.readline())["version"] == first + 1
        served.server.stop(0)
        assert _own_line(proc.stderr).startswith(f"gradmix: disconnected from {served.address}")
        again, _ = start_server(served.store, served.port)
        assert _own_line(proc.stderr).startswith(f"gradmix: reconnected to {served.address}")
        served.client.register_task("job", "c")
        assert json.loads(proc.stdout.readline())["version"] == first + 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
        if again is not None:
            again.stop(0)


def _read_screen(fd: int, needle: str, seen: list[str], timeout: float = 60.0) -> str:
    """Read a pseudo-terminal until `needle` shows (bounded); the text so far, without
    colour or cursor codes, is kept in `seen`."""
    import re
    import select

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            seen.append(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", chunk.decode(errors="replace")))
        screen = "".join(seen)
        if needle in screen:
            return screen
    raise AssertionError(f"{needle!r} never shown; the terminal showed:\n{''.join(seen)[-3000:]}")


@pytest.mark.timeout(180)
def test_mixture_watch_on_a_terminal_redraws_and_marks_the_disconnection(
    served: Served, tmp_path: Path
) -> None:
    """On an 80-column terminal (a pseudo-terminal) `--watch` is a live view: the table is
    redrawn in place, marked DISCONNECTED while the server is away, and no line is wider
    than the window."""
    import fcntl
    import pty
    import struct
    import termios

    from client_support import start_server

    create_job(served.client)
    served.client.register_task("job", "a")
    first = wait_for(lambda: served.client.get_job("job").mixture_version or None, "version 1")
    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(GRADMIX_SERVER=served.address, TERM="xterm-256color")
    with (tmp_path / "stderr").open("w") as errors:
        proc = subprocess.Popen([GRADMIX, "mixture", "job", "--watch"], env=env,
                                stdin=child_fd, stdout=child_fd, stderr=errors)
    os.close(child_fd)
    again = None
    seen: list[str] = []
    try:
        _read_screen(main_fd, f"version {first} ", seen)
        served.client.register_task("job", "b")  # the watch is open (WATCH RACE)
        _read_screen(main_fd, f"version {first + 1} ", seen)
        served.server.stop(0)
        _read_screen(main_fd, "DISCONNECTED since ", seen)
        again, _ = start_server(served.store, served.port)
        served.client.register_task("job", "c")
        screen = _read_screen(main_fd, f"version {first + 2} ", seen)
        after = screen[screen.rindex(f"version {first + 2} "):]
        assert "DISCONNECTED" not in after  # the mark is gone once it is back
        lines = [ln for part in screen.split("\n") for ln in part.split("\r")]
        assert all(len(line.rstrip()) <= 80 for line in lines), max(lines, key=len)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
        os.close(main_fd)
        if again is not None:
            again.stop(0)


def test_the_mixture_header_fits_80_columns() -> None:
    from gradmix.client.render import mixture_table, text
    from gradmix.client.types import Mixture

    mixture = Mixture(
        job="arith", version=12, anchor="anchor-00000300", policy="gradient_similarity",
        weights={"add": 0.5, "mul": 0.5}, scores={"add": -0.1, "mul": 0.1},
        states={"add": "active", "mul": "active"}, pending_tasks=(), anchor_loss=1.2345,
        estimated_loss=1.1,
        created_at=1.7e9,
    )
    for since in (None, 1.7e9):
        shown = text(mixture_table(mixture, since))  # unfolded: as wide as it is
        assert all(len(line) <= 80 for line in shown.splitlines()), shown
    assert text(mixture_table(mixture, 1.7e9)).startswith("DISCONNECTED since ")


def test_a_busy_metrics_port_is_named(tmp_path: Path) -> None:
    import socket

    server = str(Path(sys.executable).parent / "gradmix-server")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [server, "--store", str(tmp_path / "store"), "--port", "0",
             "--metrics-port", str(port), "--insecure"],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1
    assert f"cannot serve /metrics on 127.0.0.1:{port}" in done.stderr, done.stderr
