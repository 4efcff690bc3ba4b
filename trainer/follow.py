"""Following the server's mixture: rank 0 watches, every rank switches at one step.

Rank 0 runs a `ServerWatch` thread on the job's mixture stream. At every
step boundary `MixtureSync.boundary(step)` broadcasts rank 0's newest
version (if any) with torch.distributed and every rank schedules it on its
`MixtureSampler` for that very step (or, `at_step`, a later one: the Hugging
Face callback's `MixtureStream` is read ahead), so all ranks switch together; each
switch is logged ("mixture version V takes effect at step S") and kept in
`history` for the checkpoint. When the server is unreachable the trainer
keeps the mixture in force, the watch keeps reconnecting, and the log and
progress line say so.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from gradmix.client import Mixture, MixtureSampler, SelectionClient
from gradmix.client.errors import GradmixError
from gradmix.trainer.data import TaskPool
from gradmix.trainer.distributed import Dist
from gradmix.trainer.errors import describe, is_transient
from gradmix.trainer.runlog import RunLog


class ServerWatch:
    """Rank 0's background watch of a job's mixtures, with a reachability flag.

    Args:
        client: the job's server.
        job: the job.
        after_version: deliver versions after this one (a resumed run's version).
        give_up_after: seconds of failed reconnects before the server counts as unreachable.
        probe_every: seconds between reachability probes while it is unreachable.
    """

    def __init__(
        self,
        client: SelectionClient,
        job: str,
        *,
        after_version: int = 0,
        give_up_after: float = 3.0,
        probe_every: float = 1.0,
    ) -> None:
        self._client, self._job = client, job
        self._give_up_after, self._probe_every = give_up_after, probe_every
        self._lock = threading.Condition()
        self._latest: Mixture | None = None
        self._last_version = after_version
        self.reachable: bool | None = None
        """None until the first answer (or failure), then whether the server answers."""
        self.error = ""
        self.refused = ""
        """The last non-retryable refusal of the watch ("" once a mixture arrives)."""
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread = threading.Thread(target=self._run, name="gradmix-watch", daemon=True)

    def start(self) -> ServerWatch:
        """Start the thread; returns self."""
        self._thread.start()
        return self

    def latest(self) -> Mixture | None:
        """The newest version received (None before the first)."""
        with self._lock:
            return self._latest

    def wait_at_anchor(self, anchor: str, timeout: float) -> Mixture | None:
        """Block up to `timeout` seconds for a version estimated at `anchor` (None if none
        came)."""
        with self._lock:
            self._lock.wait_for(
                lambda: self._latest is not None and self._latest.anchor == anchor,
                timeout=timeout,
            )
            latest = self._latest
        return latest if latest is not None and latest.anchor == anchor else None

    def wait_first(self, timeout: float) -> Mixture | None:
        """Block up to `timeout` seconds for a first version."""
        with self._lock:
            self._lock.wait_for(lambda: self._latest is not None, timeout=timeout)
            return self._latest

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._client.get_job(self._job)  # known reachable even before a first mixture
                with self._lock:
                    self.reachable, self.error = True, ""
                self._watch = self._client.watch(
                    self._job, after_version=self._last_version, give_up_after=self._give_up_after
                )
                for mixture in self._watch:
                    with self._lock:
                        self._latest, self._last_version = mixture, mixture.version
                        self.reachable, self.error, self.refused = True, "", ""
                        self._lock.notify_all()
            except GradmixError as error:
                if not is_transient(error):  # refused: the trainer decides; ask again later
                    self.refused = describe(error)
                    self._stop.wait(self._probe_every * 5)
                    continue
                self.reachable, self.error = False, describe(error)  # keep the last mixture
                self._probe_until_back()

    def _probe_until_back(self) -> None:
        while not self._stop.wait(self._probe_every):
            try:
                self._client.get_job(self._job)
            except GradmixError as error:
                if is_transient(error):
                    self.error = describe(error)
                    continue
                # it answers, with a refusal: reachable; the watch reports the refusal
            self.reachable, self.error = True, ""
            return

    def close(self) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._watch is not None:
            self._watch.close()
        self._thread.join(timeout=10.0)


class Schedule(Protocol):
    """What MixtureSync schedules mixtures on: a `MixtureSampler`, or anything that
    switches at an optimizer step the same way."""

    def update(self, mixture: Mixture | dict[str, float], at_step: int) -> None:
        """Take effect from optimizer step `at_step` on."""
        ...


class MixtureSync:
    """Applies rank 0's newest mixture on every rank at the same step.

    Args:
        dist: the process group.
        sampler: this rank's task sampler (a `MixtureSampler` or another `Schedule`).
        log: this rank's run log.
        watch: rank 0's server watch (None on other ranks).
        pool: this rank's task data (learns the files of the mixture's tasks); None
            when the tasks' data is already in hand.
        locate: rank 0's lookup of a task's data file; tasks without one are left
            out of the applied weights (and logged).
    """

    def __init__(
        self,
        dist: Dist,
        sampler: MixtureSampler | Schedule,
        log: RunLog,
        watch: ServerWatch | None,
        pool: TaskPool | None,
        locate: Callable[[str], str | None],
    ) -> None:
        self.dist, self.sampler, self.log, self.watch = dist, sampler, log, watch
        self.pool, self.locate = pool, locate
        self.history: list[dict[str, Any]] = []
        self.reachable: bool | None = None
        """Rank 0's watch's view, the same on every rank: None until known."""
        self.refused = ""
        """The watch's last non-retryable refusal ("" if none)."""
        self.applied_version = 0
        self._seen_version = 0
        self.hold = False
        """Reproducible mode: new versions wait for `at_anchor` instead of `boundary`."""

    def boundary(self, step: int, at_step: int | None = None) -> None:
        """Collective: called by every rank before drawing step `step`'s task; a new
        mixture takes effect at `at_step` (default: this step)."""
        payload: tuple[Mixture | None, dict[str, str], bool | None, str, str] | None = None
        if self.dist.is_main and self.watch is not None:
            latest = None if self.hold else self.watch.latest()
            fresh = latest if latest and latest.version > self._seen_version else None
            self._seen_version = fresh.version if fresh else self._seen_version
            watch = self.watch
            payload = (*self._usable(fresh), watch.reachable, watch.error, watch.refused)
        if payload is None:
            payload = (None, {}, self.reachable, "", "")
        mixture, paths, reachable, error, self.refused = self.dist.broadcast(payload)
        self._learn(paths)
        if reachable is not None and reachable != self.reachable:
            was, self.reachable = self.reachable, reachable
            if reachable and was is False:
                self.log.event(
                    "server",
                    f"server reachable again; mixture version {self.applied_version} in force",
                    reachable=True,
                    step=step,
                    error="",
                )
            elif not reachable:
                self.log.event(
                    "server",
                    f"server unreachable ({error}); retrying, training on under mixture "
                    f"version {self.applied_version}, sketch points skipped meanwhile",
                    level=logging.WARNING,
                    reachable=False,
                    step=step,
                    error=error,
                )
        if mixture is not None:
            self.apply(mixture, step if at_step is None else at_step)

    def at_anchor(self, step: int, anchor: str, timeout: float) -> None:
        """Collective (reproducible mode): apply the server's mixture estimated at `anchor`,
        just completed at this sketch point, at `step`; rank 0 waits for it."""
        payload: tuple[Mixture | None, dict[str, str]] = (None, {})
        if self.dist.is_main and self.watch is not None:
            mixture = self.watch.wait_at_anchor(anchor, timeout)
            if mixture is None:
                self.log.event(
                    "mixture_timeout",
                    f"no mixture estimated at {anchor} within {timeout:.0f} s; this run's "
                    f"steps are no longer reproducible (mixture version {self.applied_version} "
                    "stays in force)",
                    level=logging.WARNING,
                    anchor=anchor,
                    step=step,
                )
            else:
                self._seen_version = max(self._seen_version, mixture.version)
                payload = self._usable(mixture)
        mixture, paths = self.dist.broadcast(payload)
        self._learn(paths)
        if mixture is not None:
            self.apply(mixture, step)

    def _learn(self, paths: dict[str, str]) -> None:
        if self.pool is not None:
            for task, path in paths.items():
                self.pool.add(task, path)

    def apply(self, mixture: Mixture | dict[str, float], step: int, version: int = 0) -> None:
        """Schedule a mixture at `step` on this rank and record it."""
        self.sampler.update(mixture, at_step=step)
        if isinstance(mixture, Mixture):
            version, weights, anchor = mixture.version, mixture.weights, mixture.anchor
        else:
            weights, anchor = dict(mixture), ""
        self.applied_version = version
        self._seen_version = max(self._seen_version, version)
        entry = {"version": version, "step": step, "anchor": anchor, "weights": dict(weights)}
        self.history.append(entry)
        self.log.event("mixture", f"mixture version {version} takes effect at step {step}", **entry)

    def _usable(self, mixture: Mixture | None) -> tuple[Mixture | None, dict[str, str]]:
        """The mixture restricted to tasks with data, and their files (rank 0)."""
        if mixture is None:
            return None, {}
        paths = {t: p for t, w in mixture.weights.items() if w > 0 and (p := self.locate(t))}
        dropped = sorted(t for t, w in mixture.weights.items() if w > 0 and t not in paths)
        if dropped:
            self.log.event(
                "mixture_tasks_without_data",
                f"mixture version {mixture.version}: no readable data for {dropped}; "
                "training leaves them out",
                level=logging.WARNING,
                version=mixture.version,
                tasks=dropped,
            )
        if not paths:
            return None, {}
        weights = {t: w for t, w in mixture.weights.items() if t in paths}
        return dataclasses.replace(mixture, weights=weights), paths
