"""`make demo`: the whole product on one machine, in about five minutes on 2 CPU cores.

    python -m gradmix.demo [--steps N] [--no-baseline] [--out DIR]

What it does, as a user would:

1. writes the built-in tasks (`gradmix.demo.tasks`) as JSONL files;
2. starts a selection server on an embedded sketch store (``<out>/store``);
3. runs `gradmix-train` on a tiny GPT-2 (built from a config, nothing
   downloaded): it sketches the target and the tasks at anchors and follows
   the mixtures the server pushes, while this process shows them live;
4. part-way through, registers two more tasks through `SelectionClient` (one
   helpful, one noisy); the trainer sketches them at its next sketch point and
   the server weighs them in;
5. runs the same job again with a uniform mixture (skip with ``--no-baseline``)
   and both runs' trainers measure the target loss as they go;
6. prints a summary and writes ``<out>/weights.png`` and ``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gradmix.client import Mixture, SelectionClient, errors
from gradmix.demo.report import (
    LiveTable,
    RunHistory,
    WeightPoint,
    plot_runs,
    progress_line,
    summarize,
)
from gradmix.demo.run import RunSettings, TrainerRun, write_job
from gradmix.demo.tasks import TASKS, WrittenTasks, initial_tasks, late_tasks, write_tasks
from gradmix.server.app import build_server
from gradmix.server.config import ServerConfig
from prometheus_client import CollectorRegistry

GRADMIX_JOB = "demo-gradmix"
UNIFORM_JOB = "demo-uniform"


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoConfig:
    """Everything the demo can be told."""

    out: Path = Path("demo-out")
    """Output folder; the demo's own subfolders in it are replaced."""
    run: RunSettings = field(default_factory=lambda: RunSettings(steps=1500))
    """The training runs' settings (both runs share them)."""
    late_at: int = 600
    """Step after which the two late tasks are registered."""
    baseline: bool = True
    """Also run the uniform-mixture baseline."""
    examples: int = 3000
    """Examples written per task."""
    target_examples: int = 256
    """Target (validation) examples."""
    policy: dict[str, Any] = field(default_factory=dict)
    """PolicySettings of the gradmix run's job (empty: the server's defaults)."""
    interactive: bool | None = None
    """Redraw the table in place (default: when stdout is a terminal)."""

    def __post_init__(self) -> None:
        if not 0 <= self.late_at < self.run.steps:
            raise ValueError(f"late_at must be in [0, steps), got {self.late_at}")
        if self.examples < 1 or self.target_examples < 1:
            raise ValueError("examples and target_examples must be >= 1")


@dataclass(frozen=True, kw_only=True)
class DemoResult:
    """What the demo measured."""

    gradmix: RunHistory
    uniform: RunHistory | None
    final: Mixture
    """The gradmix job's last mixture."""
    entered: dict[str, int]
    """Mixture version at which each task first appeared."""
    late_registered_at: int
    """Trainer step at which the late tasks were registered."""
    plot: Path
    summary: str


class _MixtureWatcher:
    """Feeds every mixture version of a job to the live table, from a thread."""

    def __init__(self, client: SelectionClient, job: str, table: LiveTable) -> None:
        self._watch = client.watch(job)
        self._table = table
        self._thread = threading.Thread(target=self._run, name="demo-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for mixture in self._watch:
                self._table.on_mixture(mixture)
        except errors.GradmixError:  # closed, or the server stopped: nothing more to show
            return

    def close(self) -> None:
        self._watch.close()
        self._thread.join(timeout=5.0)


@dataclass(kw_only=True)
class _Follow:
    """What the demo has seen of a run so far."""

    step: int = 0
    loss: float | None = None
    version: int = 0
    registered_at: int = -1
    weights: list[WeightPoint] = field(default_factory=list)
    target_loss: list[tuple[int, float]] = field(default_factory=list)

    def take(self, event: dict[str, Any]) -> None:
        if event["event"] == "step":
            self.step = int(event["step"]) + 1
            loss = float(event["loss"])
            self.loss = loss if self.loss is None else 0.95 * self.loss + 0.05 * loss
            self.version = int(event["version"])
        elif event["event"] == "mixture":
            self.weights.append(
                WeightPoint(
                    step=int(event["step"]), version=int(event["version"]), weights=event["weights"]
                )
            )
        elif event["event"] == "eval":
            self.target_loss.append((int(event["step"]), float(event["target_loss"])))


def _train(
    cfg: DemoConfig,
    client: SelectionClient,
    files: WrittenTasks,
    *,
    job: str,
    policy: dict[str, Any],
    table: LiveTable,
    watch: bool,
) -> tuple[RunHistory, int]:
    """Run one job to the end; returns its history and the late-registration step."""
    runs = cfg.out / "runs"
    config = write_job(
        runs / f"{job}.toml",
        job=job,
        settings=cfg.run,
        files=files,
        initial=initial_tasks(),
        server=client.target,
        store=str(cfg.out / "store"),
        policy=policy,
    )
    run = TrainerRun(runs / f"{job}.toml", config, console=runs / f"{job}.console.log")
    seen = _Follow()
    watcher: list[_MixtureWatcher] = []
    try:
        _follow(
            cfg,
            client,
            files,
            run,
            seen,
            job=job,
            table=table,
            on_job=(lambda: watcher.append(_MixtureWatcher(client, job, table))) if watch else None,
        )
        run.finish()
    except BaseException:
        run.stop()
        raise
    finally:
        if watcher:
            _settle(client, job)
            watcher[0].close()
        table.close()
    name = "gradmix" if job == GRADMIX_JOB else "uniform"
    history = RunHistory(name=name, target_loss=seen.target_loss, weights=seen.weights)
    return history, seen.registered_at


def _follow(
    cfg: DemoConfig,
    client: SelectionClient,
    files: WrittenTasks,
    run: TrainerRun,
    seen: _Follow,
    *,
    job: str,
    table: LiveTable,
    on_job: Callable[[], None] | None,
) -> None:
    """Until the trainer exits: read its log, register the late tasks, show progress."""
    started = time.monotonic()
    while True:
        alive = run.running()
        for event in run.events():
            seen.take(event)
            if event["event"] == "job" and on_job is not None:
                on_job()  # the job exists now: its mixtures can be watched
                on_job = None
        if seen.registered_at < 0 and seen.step >= cfg.late_at:
            for name in late_tasks():  # as a user would, through the client
                client.register_task(job, name, {"path": str(files.tasks[name])})
            seen.registered_at = seen.step
        table.on_progress(
            progress_line(
                run=job.removeprefix("demo-"),
                step=seen.step,
                total=cfg.run.steps,
                loss=seen.loss,
                version=seen.version,
                elapsed=time.monotonic() - started,
            )
        )
        if not alive:
            return
        time.sleep(0.25)


def _settle(client: SelectionClient, job: str, timeout: float = 5.0) -> None:
    """Give the server a moment to publish the estimate of the last sketches."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not client.get_mixture(job).pending_tasks:
            return
        time.sleep(0.25)


def _prepare(out: Path) -> None:
    """Remove what an earlier demo left (its runs would otherwise resume)."""
    for name in ("store", "runs", "tasks"):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def run_demo(cfg: DemoConfig, *, stream: TextIO | None = None) -> DemoResult:
    """Run the demo end to end (see the module docstring)."""
    out_stream = stream if stream is not None else sys.stdout
    # The job TOML resolves relative paths against its own folder (<out>/runs),
    # so everything the demo writes into it must be absolute.
    cfg = dataclasses.replace(cfg, out=cfg.out.resolve())
    _prepare(cfg.out)
    files = write_tasks(
        cfg.out / "tasks", count=cfg.examples, target_count=cfg.target_examples, seed=cfg.run.seed
    )
    labels = {name: task.label for name, task in TASKS.items()}
    server, port = build_server(
        ServerConfig(store=str(cfg.out / "store"), port=0, metrics_port=0, log_level="WARNING",
                     insecure=True),  # loopback only
        CollectorRegistry(),
    )
    try:
        with SelectionClient(f"127.0.0.1:{port}") as client:
            table = LiveTable(labels=labels, stream=out_stream, interactive=cfg.interactive)
            print(
                f"gradmix demo: server on 127.0.0.1:{port}, store {cfg.out / 'store'}",
                file=out_stream,
                flush=True,
            )
            gradmix, registered_at = _train(
                cfg, client, files, job=GRADMIX_JOB, policy=cfg.policy, table=table, watch=True
            )
            final = client.get_mixture(GRADMIX_JOB)
            uniform = None
            if cfg.baseline:
                print("\nthe same run with a uniform mixture (baseline):", file=out_stream)
                plain = LiveTable(stream=out_stream, interactive=cfg.interactive, show_table=False)
                uniform, _ = _train(
                    cfg,
                    client,
                    files,
                    job=UNIFORM_JOB,
                    policy={"policy": "uniform"},
                    table=plain,
                    watch=False,
                )
    finally:
        server.stop()
    return _conclude(cfg, labels, gradmix, uniform, final, table.entered, registered_at, out_stream)


def _conclude(
    cfg: DemoConfig,
    labels: dict[str, str],
    gradmix: RunHistory,
    uniform: RunHistory | None,
    final: Mixture,
    entered: dict[str, int],
    registered_at: int,
    out: TextIO,
) -> DemoResult:
    """Summary, plot and summary.json."""
    summary = summarize(
        final,
        labels=labels,
        gradmix_loss=gradmix.final_target_loss(),
        uniform_loss=uniform.final_target_loss() if uniform else None,
    )
    plot = plot_runs(
        cfg.out / "weights.png",
        gradmix=gradmix,
        uniform=uniform,
        labels=labels,
        total_steps=cfg.run.steps,
    )
    record = {
        "steps": cfg.run.steps,
        "late_registered_at": registered_at,
        "final_mixture": {
            "version": final.version,
            "anchor": final.anchor,
            "weights": final.weights,
            "states": final.states,
        },
        "labels": labels,
        "entered": entered,
        "target_loss": {
            "gradmix": gradmix.target_loss,
            "uniform": uniform.target_loss if uniform else None,
        },
    }
    (cfg.out / "summary.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(f"\n{summary}\nplot: {plot}\nruns and logs: {cfg.out / 'runs'}", file=out, flush=True)
    return DemoResult(
        gradmix=gradmix,
        uniform=uniform,
        final=final,
        entered=entered,
        late_registered_at=registered_at,
        plot=plot,
        summary=summary,
    )


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m gradmix.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per run")
    parser.add_argument(
        "--late-at", type=int, help="step to register the late tasks (default: 40%% of the steps)"
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the uniform-mixture run (halves the time)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-embd", type=int, default=96, help="model width")
    parser.add_argument("--n-layer", type=int, default=3, help="transformer blocks")
    parser.add_argument("--plain", action="store_true", help="never redraw in place")
    args = parser.parse_args(argv)
    steps = args.steps
    run = RunSettings(
        steps=steps,
        seed=args.seed,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        first_anchor=max(1, steps // 10),
        interval=max(1, steps // 30),
        reanchor_every=max(1, steps // 5),
        eval_every=max(1, steps // 10),
    )
    late_at = args.late_at if args.late_at is not None else (steps * 2) // 5
    return DemoConfig(
        out=args.out,
        run=run,
        late_at=late_at,
        baseline=not args.no_baseline,
        interactive=False if args.plain else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `make demo`."""
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    run_demo(cfg)
    print(f"demo finished in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
