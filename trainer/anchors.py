"""The anchor protocol: declare an anchor, sketch every source there, complete it.

At a sketch point (a collective call on every rank at the same step):

1. rank 0 makes the plan: the job exists on the server, a new anchor is
   declared if the re-anchor rule says so (`SketchingConfig`), and the
   sources still to sketch at the current anchor are listed: the target and
   every task known (configured, or registered with the server since) that
   has not been sketched there. The plan is broadcast.
2. every rank sketches its share of each source's seeded example draw
   (ids[rank::world]) and writes its own rows (writer "rank-<r>") through the
   store, committing them with the server;
3. the ranks' outcomes are gathered (this is also the barrier); rank 0
   completes the anchor once the target and every planned source are in
   (a task whose file cannot be read is set aside for this anchor instead).

Each anchor is declared with its horizon (`anchor_horizon`): the learning
rate, the steps until the next planned anchor, the optimizer and the number of
sketched parameters, from which the server sets the estimate's prior λ
(`gradmix.server.calibration`).

Anything that fails for a passing reason (the server or store away) leaves
the source unsketched and the anchor open: the next sketch point retries,
and training never stops. Rows are keyed by example id, so a retry never
duplicates them. The server keeps the old anchor's mixture until the new
anchor is complete.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from gradmix.client import Horizon, SketchWriter
from gradmix.client.errors import GradmixError, InvalidArgument
from gradmix.store import SketchStore, StoreError
from gradmix.trainer.config import SketchingConfig, TrainConfig
from gradmix.trainer.data import TaskPool
from gradmix.trainer.distributed import Dist
from gradmix.trainer.errors import ConfigError, DataError, TrainerError, describe, is_transient
from gradmix.trainer.job_setup import JobSetup
from gradmix.trainer.sharded import lockstep_batches, sharded
from gradmix.trainer.sketch import sketch_examples
from gradmix.trainer.task_files import TaskFiles
from gradmix.trainer.train_state import AnchorState, TrainState
from gradmix.trainer.values import untrained_loss
from gradmix.vocabulary import TARGET
from torch import nn

#: How the target is named in plans, logs and the sketched list.
TARGET_KEY = TARGET
#: Seconds sketch points are skipped after one found the server unavailable (the
#: watch's reachability, when it notices first, skips them too).
QUIET_AFTER_FAILURE = 10.0


def new_run() -> str:
    """A fresh run name: the UTC start time and a random suffix (a valid store name)."""
    return f"run-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


class AnchorProtocol:
    """Runs sketch points. Every rank constructs one, complete, before the first.

    Args:
        job: the job (its config, projector, server client and this rank's run log);
            rank 0 sets it up again at a sketch point if the server was away before.
        dist: the process group.
        module: the model being trained (DeepSpeed: `engine.module`).
        pool: task data.
        store: the sketch store (each rank writes its own rows); None: rows go to the
            server over gRPC (upload mode).
        files: rank 0's task file directory.
        state: this rank's run state; the protocol keeps its `anchor`.
        reachable: rank 0's view of whether the server is reachable (None: not known).
        learning_rate: the optimizer's current learning rate (None, or a callable
            returning None or 0: the configured one), for anchor horizons.
    """

    def __init__(
        self,
        job: JobSetup,
        dist: Dist,
        module: nn.Module,
        pool: TaskPool,
        store: SketchStore | None,
        files: TaskFiles,
        state: TrainState,
        reachable: Callable[[], bool | None],
        learning_rate: Callable[[], float | None] | None = None,
    ) -> None:
        self.job, self.files, self.reachable = job, files, reachable
        self.learning_rate = learning_rate
        self.config, self.cfg = job.config, job.config.sketching
        self.dist, self.module, self.projector, self.pool = dist, module, job.projector, pool
        self.client, self.store, self.log = job.client, store, job.log
        self._run = state
        self._reference: dict[str, torch.Tensor] = {}
        # what the end-of-run summary reports (see trainer.summary)
        self.refused = ""
        """The server's last refusal of a sketch point (same on every rank; "" if none)."""
        self.completed: list[tuple[str, int]] = []
        self.sketched_ever: set[str] = set()
        self.known_tasks: set[str] = set(self.config.data.tasks)
        self.problems: dict[str, str] = {}
        """Why a source is not sketched (latest reason; cleared when it is)."""
        self.sketch_seconds = 0.0
        self.server_seconds = 0.0
        self._quiet_until = 0.0
        self.reported_failed: set[str] = set()
        self._complete_refused = ""

    @property
    def state(self) -> AnchorState:
        """The current anchor (kept in the run state, so checkpoints hold it)."""
        return self._run.anchor

    @state.setter
    def state(self, value: AnchorState) -> None:
        self._run.anchor = value

    # ------------------------------------------------------------ schedule

    def due(self, step: int) -> bool:
        """Whether `step` is a sketch point (interval 0: only until the first anchor
        is complete)."""
        since = step - self.cfg.first_anchor
        if since < 0:
            return False
        if self.cfg.interval == 0:
            return not self.state.complete
        return since % self.cfg.interval == 0

    # ------------------------------------------------------------ the protocol

    def sketch_point(self, step: int) -> None:
        """Collective: run one sketch point at `step` on every rank."""
        started = time.monotonic()
        plan = self._plan(step) if self.dist.is_main else None
        plan = self.dist.broadcast(plan)
        if plan is None:
            return
        if "refused" in plan:
            self.refused = plan["refused"]
            return
        self.state = AnchorState(**plan["state"])
        for task, path in plan["paths"].items():
            self.pool.add(task, path)
        outcomes: dict[str, str] = {}
        sources = plan["sources"]
        for number, src in enumerate(sources, start=1):
            outcomes[src] = self._sketch_source(src, self.state.name, number, len(sources))
        gathered = self.dist.all_gather(outcomes)
        done = [s for s in plan["sources"] if all(o[s] == "done" for o in gathered)]
        bad = [s for s in plan["sources"] if any(o[s] == "bad data" for o in gathered)]
        refusals = [o[s] for o in gathered for s in plan["sources"] if o[s].startswith("refused")]
        self.state.sketched += done
        self.state.unusable += [s for s in bad if s != TARGET_KEY]
        self.sketched_ever.update(done)
        if self.dist.is_main:
            for source in bad:
                self._report_failure(source, self.problems.get(source, "data cannot be loaded"))
            for source in done:
                if source in self.reported_failed:
                    self._report_failure(source, "")
        finished = len(done) + len(bad) == len(plan["sources"]) and TARGET_KEY in done
        refused = refusals[0].removeprefix("refused: ") if refusals else ""
        if self.dist.is_main and finished and not self.state.complete:
            self.state.complete = self._complete(self.state.name)
            refused = refused or self._complete_refused
        state, self.refused = self.dist.broadcast((self.state.to_dict(), refused))
        self.state = AnchorState(**state)
        if self.state.complete and self.state.name not in (n for n, _ in self.completed):
            self.completed.append((self.state.name, self.state.step))
        self.sketch_seconds += time.monotonic() - started

    def _plan(self, step: int) -> dict[str, Any] | None:
        """Rank 0: what this sketch point does (None: nothing, or the server is away;
        {"refused": message}: the server refused a call no retry can change)."""
        if self.reachable() is False or time.monotonic() < self._quiet_until:
            return None  # do not stall training on calls bound to fail
        started = time.monotonic()
        try:
            self.job.ensure()
            tasks = self.client.list_tasks(self.config.job)
            if self._needs_new_anchor(step):
                run = self.state.run or new_run()
                name = f"{run}-anchor-{step:08d}"
                horizon = self._horizon(step)
                self.client.declare_anchor(self.config.job, name, step, horizon=horizon, run=run,
                                           untrained_loss=untrained_loss(self.module))
                self.state = AnchorState(name=name, step=step, run=run)
                self._reference = self._snapshot()
                self.log.event(
                    "anchor",
                    f"declared anchor {name} at step {step}",
                    anchor=name,
                    run=run,
                    step=step,
                    horizon=asdict(horizon) if horizon is not None else None,
                )
        except ConfigError as error:  # the job is missing and this token may not create it
            self.server_seconds += time.monotonic() - started
            self.log.event("sketch_point_refused", str(error), level=logging.ERROR, step=step)
            return {"refused": str(error)}
        except GradmixError as error:
            self.server_seconds += time.monotonic() - started
            if not is_transient(error):
                self.log.event(
                    "sketch_point_refused",
                    f"the server refused the sketch point at step {step}: {describe(error)}",
                    level=logging.ERROR,
                    step=step,
                    error=describe(error),
                )
                return {"refused": describe(error)}
            self._quiet_until = time.monotonic() + QUIET_AFTER_FAILURE
            self.log.event(
                "sketch_point_skipped",
                f"sketch point at step {step} skipped: server unavailable ({describe(error)})",
                level=logging.WARNING,
                step=step,
                error=describe(error),
            )
            return None
        self.server_seconds += time.monotonic() - started
        self.files.remember(tasks)
        self.known_tasks.update(t.name for t in tasks)
        paths = {t.name: p for t in tasks if (p := self.files.path(t.name)) is not None}
        for t in tasks:
            if t.name not in paths and t.name not in self.problems:
                self.problems[t.name] = (
                    "no data file found (registration metadata path=, [data].tasks "
                    "or <task_dir>/<task>.jsonl)"
                )
                self.log.event(
                    "task_without_data",
                    f"task {t.name}: {self.problems[t.name]}; it cannot be sketched and "
                    "leaves the mixture",
                    level=logging.WARNING,
                    task=t.name,
                    metadata=dict(t.metadata),
                )
                self._report_failure(t.name, self.problems[t.name])
        sources = [TARGET_KEY] + [t.name for t in tasks if t.name in paths]
        skip = set(self.state.sketched) | set(self.state.unusable)
        todo = [s for s in sources if s not in skip]
        if not todo and self.state.complete:
            return None
        return {"state": self.state.to_dict(), "sources": todo, "paths": paths}

    def _horizon(self, step: int) -> Horizon | None:
        """Rank 0: the horizon to declare an anchor at `step` with (None if it cannot be
        made: the anchor is declared without one)."""
        current = None
        if self.learning_rate is not None:
            try:
                current = self.learning_rate()
            except Exception as error:  # an engine without an lr: use the configured one
                self.log.event("horizon_lr_unavailable", step=step, error=f"{error}")
        try:
            return anchor_horizon(self.config, step, self.projector.manifest.numel, current)
        except InvalidArgument as error:
            self.log.event("horizon_invalid", step=step, error=f"{error}")
            return None

    def _needs_new_anchor(self, step: int) -> bool:
        if not self.state.name:
            return True
        if not self.state.complete:
            return False  # finish the open anchor first
        if self.cfg.reanchor_every and step - self.state.step >= self.cfg.reanchor_every:
            return True
        if self.cfg.drift_bound and not self._reference:
            self._reference = self._snapshot()  # resumed run: measure from the resume point
        return bool(self.cfg.drift_bound) and self.drift() > self.cfg.drift_bound

    def drift(self) -> float:
        """‖θ − θ_anchor‖₂ / ‖θ_anchor‖₂ over the sketched parameters (rank 0)."""
        if not self._reference:
            return 0.0
        now = self._snapshot()
        num = sum(float((now[n] - ref).pow(2).sum()) for n, ref in self._reference.items())
        den = sum(float(ref.pow(2).sum()) for ref in self._reference.values())
        return math.sqrt(num / max(den, 1e-30))

    def _snapshot(self) -> dict[str, torch.Tensor]:
        if not self.cfg.drift_bound:
            return {}
        params = dict(self.module.named_parameters())
        return {n: params[n].detach().float().cpu().clone() for n in self.projector.manifest.names}

    def _sketch_source(self, source: str, anchor: str, number: int = 1, total: int = 1) -> str:
        """Sketch this rank's share of one source and write it.

        Returns:
            "done"; "bad data" (the task's file is unreadable or malformed); or
            "failed" (server, store or sketching trouble: retried at the next point).
        """
        task = None if source == TARGET_KEY else source
        began = time.monotonic()
        try:
            ids = self._draw(task)
            mine = ids[self.dist.rank :: self.dist.world_size]
            if mine or sharded(self.module):
                self._write_rows(task, anchor, mine, ids)
        except DataError as error:
            self.problems[source] = f"data cannot be loaded: {describe(error)}"
            self.log.event(
                "sketch_failed",
                f"{source}: data cannot be loaded ({describe(error)}); not sketched",
                level=logging.ERROR,
                anchor=anchor,
                source=source,
                error=describe(error),
            )
            return "bad data"
        except (GradmixError, StoreError, TrainerError, OSError) as error:
            transient = not isinstance(error, GradmixError) or is_transient(error)
            self.problems[source] = f"sketch failed: {describe(error)}"
            self.log.event(
                "sketch_failed",
                f"could not sketch {source} at {anchor}: {describe(error)}"
                + ("; retried at the next sketch point" if transient else ""),
                level=logging.WARNING if transient else logging.ERROR,
                anchor=anchor,
                source=source,
                error=describe(error),
            )
            return "failed" if transient else f"refused: {describe(error)}"
        self.problems.pop(source, None)
        seconds = time.monotonic() - began
        self.log.event(
            "sketch",
            f"sketched {len(mine)} rows of {source} at {anchor} ({number}/{total} sources, "
            f"{seconds:.1f} s; eta {seconds * (total - number):.0f} s)",
            anchor=anchor,
            source=source,
            rows=len(mine),
        )
        return "done"

    def _draw(self, task: str | None) -> list[int]:
        """The source's seeded sketch draw. On a ZeRO-3 model (sketching is collective)
        the ranks first agree that every one of them could load it.

        Raises:
            DataError: the data cannot be loaded here, or on another rank.
        """
        # The draw follows the step, not the run: a rerun sketches the same examples.
        problem: DataError | None = None
        try:
            ids = self.pool.sketch_draw(task, f"anchor-{self.state.step:08d}",
                                        self.cfg.examples_per_task)
        except DataError as error:
            problem = error
        if sharded(self.module):
            loaded = self.dist.all_gather(problem is None)
            if problem is None and not all(loaded):
                problem = DataError(f"cannot be loaded on rank {loaded.index(False)}")
        if problem is not None:
            raise problem
        return ids

    def _write_rows(self, task: str | None, anchor: str, ids: list[int],
                    drawn: list[int]) -> None:
        """Sketch and write this rank's rows `ids` of the source's draw `drawn`. On a
        ZeRO-3 model every rank runs as many sketch batches as the busiest one."""
        examples = self.pool.examples(task)
        lockstep = sharded(self.module)
        grads, values = sketch_examples(
            self.module,
            self.projector,
            [examples[i] for i in ids],
            batch_size=self.cfg.batch_size,
            pad_id=self.pool.tokenizer.pad_id,
            value_kind=self.cfg.value_kind,
            min_batches=lockstep_batches(len(drawn), self.dist.world_size, self.cfg.batch_size)
            if lockstep else 0,
            filler=examples[drawn[0]] if drawn else None,
        )
        if not ids:
            return
        writer = SketchWriter(
            self.client, self.config.job, anchor, task, f"rank-{self.dist.rank}", store=self.store
        )
        writer.write(grads.numpy(), values.double().numpy(), np.asarray(ids, np.int64))

    def _report_failure(self, task: str, reason: str) -> None:
        """Rank 0: tell the server a task's data cannot be loaded (it leaves the mixture),
        or, with an empty reason, that it can again."""
        if task == TARGET_KEY:
            return
        try:
            self.client.report_task_failure(self.config.job, task, reason)
        except GradmixError as error:
            self.log.event("task_failure_unreported", task=task, error=describe(error))
            return
        if reason:
            self.reported_failed.add(task)
            self.log.event("task_failed", task=task, reason=reason)
        else:
            self.reported_failed.discard(task)
            self.log.event("task_recovered", f"task {task}: data loads again", task=task)

    def _complete(self, anchor: str) -> bool:
        self._complete_refused = ""
        started = time.monotonic()
        try:
            self.client.complete_anchor(self.config.job, anchor)
        except GradmixError as error:
            if not is_transient(error):
                self._complete_refused = describe(error)
            self.log.event(
                "anchor_complete_failed",
                f"anchor {anchor} could not be completed: {describe(error)}",
                level=logging.WARNING,
                anchor=anchor,
                error=describe(error),
            )
            return False
        finally:
            self.server_seconds += time.monotonic() - started
        self.log.event("anchor_complete", f"anchor {anchor} complete", anchor=anchor)
        return True


def optimizer_name(kind: str) -> str:
    """The horizon's optimizer name for a DeepSpeed/torch optimizer type: "adamw", "adam"
    (any Adam variant: FusedAdam, OneBitAdam, ...), "sgd", else the type in lower case."""
    name = kind.lower()
    if "adamw" in name:
        return "adamw"
    if "adam" in name:
        return "adam"
    if "sgd" in name:
        return "sgd"
    return name


def planned_steps(cfg: SketchingConfig, step: int, total_steps: int) -> int:
    """Steps from an anchor declared at `step` to the next planned one: the first sketch
    point at least `reanchor_every` steps later, or the end of training if none is
    planned (a drift-triggered anchor may come earlier; the server rescales)."""
    remaining = max(total_steps - step, 1)
    if not cfg.reanchor_every or not cfg.interval:
        return remaining
    due = step + cfg.reanchor_every
    late = (due - cfg.first_anchor) % cfg.interval
    if late:
        due += cfg.interval - late
    return max(1, min(due - step, remaining))


def anchor_horizon(
    config: TrainConfig, step: int, parameters: int, current_lr: float | None = None
) -> Horizon:
    """The horizon of an anchor declared at `step`.

    The learning rate is the optimizer's current one when given and positive
    (a schedule's value at the anchor), else the configured one (the DeepSpeed
    config's optimizer lr, else [training].lr). The optimizer is the DeepSpeed
    config's, else AdamW (what `trainer.setup` builds).

    Raises:
        InvalidArgument: the configured learning rate is not positive.
    """
    named = config.deepspeed.get("optimizer") or {}
    optimizer = optimizer_name(str(named.get("type", "adamw")))
    configured = float((named.get("params") or {}).get("lr", config.training.lr))
    usable = current_lr is not None and math.isfinite(current_lr) and current_lr > 0
    lr = float(current_lr) if usable and current_lr is not None else configured
    return Horizon(
        learning_rate=lr,
        steps=planned_steps(config.sketching, step, config.training.steps),
        optimizer=optimizer,
        parameters=parameters,
    )
