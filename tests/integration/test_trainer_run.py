"""The trainer end to end on CPU: real DeepSpeed, real server, real store.

- 2-rank torchrun run of a tiny GPT-2: sketches of the target and the tasks
  land in the store under the job's recorded spec, the server publishes
  mixtures, both ranks apply each version at the same step, and a task
  registered mid-run is sketched and shows up, active, in a later version.
- The server going away mid-run: training goes on under the last mixture,
  the log says so, and the trainer reconnects when the server is back.
- Resume: a run resumed from a mid-run checkpoint draws the same tasks (and
  sees the same losses) as the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gradmix.client import SelectionClient
from gradmix.server.app import RunningServer, build_server
from gradmix.server.config import ServerConfig
from gradmix.store import SketchStore
from gradmix.trainer.runlog import log_path, read_log
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TASKS = {
    "target": lambda a, b: (f"{a}+{b}=", str(a + b)),
    "add": lambda a, b: (f"{b}+{a}=", str(a + b)),
    "mul": lambda a, b: (f"{a}*{b}=", str(a * b)),
    "rev": lambda a, b: (f"rev {a}{b}=", f"{a}{b}"[::-1]),
}


def write_data(root: Path) -> Path:
    """Arithmetic JSONL files: the target (addition) and three tasks."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for name, make in TASKS.items():
        rows = [make(rng.randint(0, 99), rng.randint(0, 99)) for _ in range(48)]
        lines = [json.dumps({"prompt": p, "completion": c}) for p, c in rows]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_config(root: Path, *, job: str, port: int, store: Path, **sections: str) -> Path:
    """A job TOML for a 2-layer GPT-2 with the character tokenizer."""
    text = f"""
job = "{job}"
output_dir = "out"
server = "127.0.0.1:{port}"
store = "{store}"
[model]
[model.config]
model_type = "gpt2"
n_embd = 32
n_layer = 2
n_head = 2
n_positions = 48
resid_pdrop = 0.0
embd_pdrop = 0.0
attn_pdrop = 0.0
[tokenizer]
alphabet = "0123456789+*=rev "
[data]
target = "target.jsonl"
tasks = {{ add = "add.jsonl", mul = "mul.jsonl" }}
max_length = 24
[deepspeed]
zero_optimization = {{ stage = {sections.get("stage", "1")} }}
[training]
{sections.get("training", "")}
lr = 0.003
batch_size = 4
eval_every = 5
[sketching]
dim = 32
projector = "structured"
examples_per_task = 8
batch_size = 4
{sections.get("sketching", "")}
"""
    path = root / f"{job}.toml"
    path.write_text(text)
    return path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A real selection server on a loopback port, over a store in tmp_path."""
    store = tmp_path / "store"
    config = ServerConfig(
        store=str(store), port=0, metrics_port=0, debounce_seconds=0.1, insecure=True
    )
    running, port = build_server(config, registry=CollectorRegistry())
    yield port, store
    running.stop(grace=1.0)


def _env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _steps(out: Path, rank: int) -> dict[int, dict]:
    return {e["step"]: e for e in read_log(log_path(out, rank)) if e["event"] == "step"}


def _switches(out: Path, rank: int) -> list[tuple[int, int]]:
    events = read_log(log_path(out, rank))
    return [(e["version"], e["step"]) for e in events if e["event"] == "mixture"]


def _wait_for_event(path: Path, event: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and any(e["event"] == event for e in read_log(path)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no {event!r} event in {path} (trainer exit code {proc.poll()})")


def test_two_ranks_sketch_follow_mixtures_and_take_a_new_task(
    tmp_path: Path, server: tuple[int, Path]
) -> None:
    port, store_path = server
    data = write_data(tmp_path / "data")
    config = write_config(
        data,
        job="arith",
        port=port,
        store=store_path,
        training="steps = 60\ncheckpoint_every = 30",
        sketching='interval = 5\nreanchor_every = 30\nvalue_kind = "geometric_log_odds"',
    )
    out = data / "out"
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "gradmix.trainer.main",
        "--config",
        str(config),
    ]
    proc = subprocess.Popen(
        cmd, cwd=data, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # Register a task while the run trains (after the first anchor is complete).
        _wait_for_event(log_path(out, 0), "anchor_complete", proc, timeout=180)
        with SelectionClient(f"127.0.0.1:{port}") as client:
            client.register_task("arith", "rev", {"path": str(data / "rev.jsonl")})
        output, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-4000:]

    # Sketches in the store, under the spec the trainer recorded.
    store = SketchStore.open(str(store_path))
    spec = store.get_job("arith").spec
    job_event = next(e for e in read_log(log_path(out, 0)) if e["event"] == "job")
    assert (spec.dim, spec.projector, spec.manifest_hash, spec.value_kind) == (
        32,
        "structured",
        job_event["manifest_hash"],
        "geometric_log_odds",
    )
    anchors = store.list_anchors("arith")
    assert [a.step for a in anchors] == [0, 30] and all(a.state == "complete" for a in anchors)
    # Each anchor was declared with its horizon: AdamW at the configured lr (no
    # schedule), 30 steps to the next anchor (and from 30, to the end), p sketched.
    for anchor in anchors:
        assert anchor.horizon is not None
        assert (anchor.horizon.optimizer, anchor.horizon.steps) == ("adamw", 30)
        assert anchor.horizon.learning_rate == pytest.approx(0.003)
        assert anchor.horizon.parameters > 0
        # ... and the untrained level of its model: log V, V = 17 characters + 3 specials.
        assert anchor.untrained_loss == pytest.approx(math.log(20))
    first = anchors[0].name
    for source in (None, "add", "mul"):
        assert store.committed_rows("arith", first, source) == 8  # de-duplicated, all writers
        assert store.committed_rows("arith", first, source, writer="rank-0") == 4
        assert store.committed_rows("arith", first, source, writer="rank-1") == 4
    assert store.committed_rows("arith", anchors[1].name, "rev") == 8  # re-anchor: all tasks

    # The server published mixtures; the new task became active in a later version.
    with SelectionClient(f"127.0.0.1:{port}") as client:
        mixtures = client.list_mixtures("arith")
    rev_active = [m.version for m in mixtures if m.states.get("rev") == "active"]
    assert rev_active, [m.states for m in mixtures]
    # The step-0 anchor is of an untrained model (its target loss near log V): held back.
    at_start = [m for m in mixtures if m.anchor == first]
    assert at_start and at_start[0].held_reason == "untrained", [
        (m.anchor, m.anchor_loss, m.held_reason) for m in mixtures]
    # Their λ came from the Adam horizon prior (times the calibration factor).
    calibrated = [m.calibration for m in mixtures
                  if m.calibration is not None and "active" in m.states.values()]
    assert calibrated and all(c.prior_source == "adam" for c in calibrated)
    assert all(c.regularization == pytest.approx(c.prior_regularization * c.factor)
               for c in calibrated)

    # Both ranks switched to each version at the same step; the rev version was applied.
    switches = _switches(out, 0)
    assert switches == _switches(out, 1)
    assert len(switches) >= 3 and switches[0][1] == 0
    assert any(v >= rev_active[0] for v, _ in switches), (switches, rev_active)
    steps0, steps1 = _steps(out, 0), _steps(out, 1)
    assert sorted(steps0) == sorted(steps1) == list(range(60))
    assert all(steps0[s]["version"] == steps1[s]["version"] for s in steps0)
    assert {s["task"] for s in steps0.values()} | {s["task"] for s in steps1.values()} >= {
        "add",
        "mul",
    }

    # Rank 0 logged the target loss before training and every eval_every (5) steps.
    evals = [e for e in read_log(log_path(out, 0)) if e["event"] == "eval"]
    assert [e["step"] for e in evals] == list(range(0, 61, 5))
    assert all(e["target_loss"] > 0 and e["examples"] == 32 for e in evals)
    assert evals[-1]["target_loss"] < evals[0]["target_loss"]
    assert not [e for e in read_log(log_path(out, 1)) if e["event"] == "eval"]


def test_resume_continues_the_same_task_draws(tmp_path: Path, server: tuple[int, Path]) -> None:
    port, store_path = server
    data = write_data(tmp_path / "data")
    # No sketch point within the run: the mixture stays the server's first version,
    # so the uninterrupted run and the resumed one see the same mixture schedule.
    config = write_config(
        data,
        job="resume",
        port=port,
        store=store_path,
        stage="2",
        training="steps = 10\ncheckpoint_every = 5",
        sketching="first_anchor = 1000",
    )
    main = [sys.executable, "-m", "gradmix.trainer.main", "--config", str(config)]
    subprocess.run(
        [*main, "--output-dir", "full"],
        cwd=data,
        env=_env(),
        check=True,
        capture_output=True,
        timeout=240,
    )
    full = data / "full"
    assert _switches(full, 0) == [(1, 0)]

    # A second run from the step-5 checkpoint of the first.
    resumed = data / "resumed"
    shutil.copytree(full / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "step-00000010")
    (resumed / "checkpoints" / "latest").write_text("step-00000005")
    subprocess.run(
        [*main, "--output-dir", "resumed"],
        cwd=data,
        env=_env(),
        check=True,
        capture_output=True,
        timeout=240,
    )

    before, after = _steps(full, 0), _steps(resumed, 0)
    assert sorted(after) == [5, 6, 7, 8, 9]
    assert [after[s]["task"] for s in after] == [before[s]["task"] for s in after]
    assert [after[s]["version"] for s in after] == [1] * 5
    for s in after:
        assert after[s]["loss"] == pytest.approx(before[s]["loss"], rel=1e-4)
    resume_event = next(e for e in read_log(log_path(resumed, 0)) if e["event"] == "resume")
    assert resume_event["step"] == 5


def _events(out: Path, event: str) -> list[dict]:
    path = log_path(out, 0)
    return [e for e in read_log(path) if e["event"] == event] if path.exists() else []


def _wait_until(
    check: Callable[[], object], proc: subprocess.Popen, timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (trainer exit code {proc.poll()})")


def test_training_goes_on_while_the_server_is_away(tmp_path: Path) -> None:
    store_path = tmp_path / "store"

    def start(port: int) -> tuple[RunningServer, int]:
        config = ServerConfig(
            store=str(store_path), port=port, metrics_port=0, debounce_seconds=0.1, insecure=True
        )
        return build_server(config, registry=CollectorRegistry())

    first, port = start(0)
    data = write_data(tmp_path / "data")
    config = write_config(
        data,
        job="away",
        port=port,
        store=store_path,
        training="steps = 1000000",
        sketching="interval = 20",
    )
    out = data / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradmix.trainer.main", "--config", str(config)],
        cwd=data,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    second = None
    try:
        _wait_until(
            lambda: any(e["version"] >= 2 for e in _events(out, "mixture")),
            proc,
            180,
            "a mixture from the first anchor",
        )
        first.stop(grace=0)
        _wait_until(lambda: _events(out, "server"), proc, 60, "the trainer to notice")
        down = _events(out, "server")[0]
        second, _ = start(port)  # same store, same port: the trainer reconnects
        _wait_until(lambda: len(_events(out, "server")) >= 2, proc, 60, "the reconnect")
        back = _events(out, "server")[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if second is not None:
            second.stop(grace=0)

    assert not down["reachable"] and "retrying" in down["message"]
    assert back["reachable"] and "reachable again" in back["message"]
    outage = [s for s in _steps(out, 0).values() if down["step"] <= s["step"] < back["step"]]
    assert len(outage) >= 2, "training must go on while the server is away"
    versions = {s["version"] for s in outage}
    assert len(versions) == 1 and versions.pop() >= 2  # the last mixture stays in force


def test_a_second_run_of_a_job_declares_anchors_of_its_own(
    tmp_path: Path, server: tuple[int, Path]
) -> None:
    """The same job run twice on one store and server: the second run's anchors carry
    its own run, none of the first run's is reused, and it becomes the job's current."""
    port, store_path = server
    data = write_data(tmp_path / "data")
    config = write_config(
        data, job="twice", port=port, store=store_path,
        training="steps = 4",
        sketching="first_anchor = 0\ninterval = 2\nreanchor_every = 2",
    )
    main = [sys.executable, "-m", "gradmix.trainer.main", "--config", str(config)]
    for out in ("first", "second"):
        subprocess.run([*main, "--output-dir", out], cwd=data, env=_env(), check=True,
                       capture_output=True, timeout=240)
    with SelectionClient(f"127.0.0.1:{port}") as client:
        anchors = client.list_anchors("twice")
        current = client.get_job("twice").current_anchor
    runs = {a.run for a in anchors}
    assert len(runs) == 2 and all(r.startswith("run-") for r in runs)
    assert all(a.name.startswith(a.run + "-anchor-") for a in anchors)
    second = [e["run"] for e in _events(data / "second", "anchor")]
    assert second and set(second) <= runs
    assert next(a for a in anchors if a.name == current).run == second[0]
