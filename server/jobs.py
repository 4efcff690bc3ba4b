"""The server's jobs: registry, creation, and debounced re-estimation.

`JobRegistry` holds one `JobRuntime` per job, rebuilt from the store at
start-up (latest version from the mixture history, rows re-read into the
estimator by a first full re-estimate) and loaded lazily when a job created
elsewhere is named. `JobRuntime` debounces re-estimate requests: the first
request of a burst schedules one run `debounce_seconds` later, requests that
arrive while a run is in flight schedule exactly one more. A failed run (a
store outage, an estimator error) is retried with exponential backoff, re-reading
every source.

An operator's archive or delete (`gradmix.server.lifecycle`) takes a job off
the registry (`remove`); an archived job is not loaded again (NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Executor, Future, wait
from typing import Any

from gradmix.server.config import ServerConfig
from gradmix.server.convert import full_policy, job_settings, mixture_to_pb
from gradmix.server.errors import AlreadyExistsError
from gradmix.server.jobstate import JobState, Refreshed, Source
from gradmix.server.metrics import TARGET_LABEL, ServerMetrics
from gradmix.server.publisher import MixturePublisher
from gradmix.server.queries import QueryPool
from gradmix.store import (
    JobInfo,
    MixtureRecord,
    NotFoundError,
    SketchSpec,
    SketchStore,
    StoreUnavailableError,
)

log = logging.getLogger(__name__)

#: A failed re-estimate is retried after this many seconds, doubling up to the max.
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
#: A decay re-estimate runs this long after the decay is due (clocks are not exact).
DECAY_SLACK_SECONDS = 0.5


class JobRuntime:
    """One job on this server: its state and its re-estimate scheduler."""

    def __init__(self, state: JobState, *, publisher: MixturePublisher, metrics: ServerMetrics,
                 executor: Executor, debounce: float) -> None:
        self.state = state
        self.name = state.name
        self._publisher = publisher
        self._metrics = metrics
        self._executor = executor
        self._debounce = debounce
        self._wake = asyncio.Event()
        self._dirty: set[tuple[str, Source]] = set()
        self._full = True
        self._first_commit_at: float | None = None
        self._totals: dict[tuple[str, Source], int] = {}
        self._failures = 0
        #: Why the last re-estimate failed ("" after a success): shown by GetJob.
        self.estimation_error = ""
        self.idle = asyncio.Event()
        #: The re-estimate running on the executor (close waits for it).
        self._inflight: Future[tuple[Refreshed, float]] | None = None
        #: The re-estimate scheduled for a stale weight's next decay (None: none).
        self._decay_timer: asyncio.TimerHandle | None = None
        self._task = asyncio.create_task(self._run(), name=f"reestimate-{self.name}")

    def request(self, *, anchor: str = "", source: Source = None, full: bool = False,
                committed_at: float | None = None) -> None:
        """Ask for a re-estimate (debounced). Call on the event loop.

        Args:
            anchor: with `source`, the rows a commit reported ("" = none).
            source: the task (None: the target) those rows belong to.
            full: re-read every source (anchors or tasks changed).
            committed_at: `time.monotonic()` of the commit, for commit-to-publish.
        """
        if anchor:
            self._dirty.add((anchor, source))
        self._full = self._full or full
        if committed_at is not None and self._first_commit_at is None:
            self._first_commit_at = committed_at
        self.idle.clear()
        self._wake.set()

    def count_committed(self, anchor: str, source: Source, total: int) -> None:
        """Count rows committed to a source since this server last saw its total.

        The first total seen for a source after start-up counts in full.
        """
        key = (anchor, source)
        previous = self._totals.get(key, 0)
        if total > previous:
            self._totals[key] = total
            label = TARGET_LABEL if source is None else source
            self._metrics.sketch_rows_committed.labels(self.name, label).inc(total - previous)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._wake.is_set():
                self.idle.set()
            await self._wake.wait()
            if self._debounce > 0:
                await asyncio.sleep(self._debounce)
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            full, self._full = self._full, False
            committed_at, self._first_commit_at = self._first_commit_at, None
            try:
                if self._failures:
                    await self._catch_up(loop)
                self._inflight = self._executor.submit(_timed_refresh, self.state, dirty, full)
                outcome, seconds = await asyncio.wrap_future(self._inflight)
            except Exception as exc:
                # The job keeps serving its last version; new input wakes a retry at once.
                self._failures += 1
                delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (self._failures - 1))
                self.estimation_error = echo_error(exc)
                log.exception("re-estimate of job %r failed (%d in a row); still serving "
                              "version %d, retrying in %.1f s", self.name, self._failures,
                              self._publisher.latest_version(self.name), delay)
                self._metrics.estimation_failures.labels(self.name).inc()
                self._full = True
                loop.call_later(delay, self._wake.set)
                continue
            self._failures = 0
            self.estimation_error = ""
            self._finish(outcome, seconds, committed_at)

    async def _catch_up(self, loop: asyncio.AbstractEventLoop) -> None:
        """After a failed run, publish versions the store has beyond the last one known here.

        A failed write may have landed (an object-store PUT whose reply was
        lost): the version is in the store, and writing its number again would
        be refused on every retry.
        """
        last = self.state.last
        after = last.version if last is not None else 0
        records = await loop.run_in_executor(self._executor, self.state.store.read_mixtures,
                                             self.name, after)
        for record in records:
            self.state.last = record
            self._publish(record)
            log.warning("job %r: mixture version %d was written before the failure; published",
                        self.name, record.version)

    def _wake_at(self, when: float | None) -> None:
        """Re-estimate at Unix time `when` (a stale task's weight decays by time then)."""
        if self._decay_timer is not None:
            self._decay_timer.cancel()
            self._decay_timer = None
        if when is not None:
            delay = max(0.0, when - time.time()) + DECAY_SLACK_SECONDS
            self._decay_timer = asyncio.get_running_loop().call_later(delay, self.request)

    def _publish(self, record: MixtureRecord) -> None:
        self._publisher.publish(self.name, mixture_to_pb(self.name, record))
        set_record(self._metrics, self.name, record)

    def _finish(self, outcome: Refreshed, seconds: float, committed_at: float | None) -> None:
        metrics = self._metrics
        metrics.estimation_duration.labels(self.name).observe(seconds)
        metrics.subsets_estimated.labels(self.name).inc(outcome.subsets_estimated)
        metrics.set_task_counts(self.name, outcome.pending, outcome.active)
        metrics.set_estimate(self.name, finished_at=time.time(),
                             open_anchors=outcome.open_anchors,
                             pending_since=outcome.pending_since,
                             implausible=outcome.implausible, held=outcome.held,
                             stale=len(outcome.stale))
        self._wake_at(outcome.next_change)
        record = outcome.record
        if record is None:
            return
        self._publish(record)
        if committed_at is not None:
            metrics.commit_to_publish.labels(self.name).observe(time.monotonic() - committed_at)
        log.info("job %r: published mixture version %d at anchor %r", self.name,
                 record.version, record.anchor)

    async def close(self, *, drain: bool = False) -> None:
        """Stop re-estimating; with `drain`, return only once no re-estimate of the job
        is running (one in flight can no longer publish or write to the store)."""
        self._wake_at(None)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        inflight = self._inflight
        if drain and inflight is not None and not inflight.done():
            await asyncio.to_thread(wait, [inflight])


def echo_error(exc: BaseException) -> str:
    """`exc` in one line of at most a few hundred characters, for GetJob."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= 300 else text[:300] + "…"


def _timed_refresh(state: JobState, dirty: set[tuple[str, Source]],
                   full: bool) -> tuple[Refreshed, float]:
    start = time.perf_counter()
    outcome = state.refresh(dirty, full)
    return outcome, time.perf_counter() - start


class JobRegistry:
    """Every job this server serves, by name."""

    def __init__(self, store: SketchStore, config: ServerConfig, metrics: ServerMetrics,
                 publisher: MixturePublisher, executor: Executor) -> None:
        self.store = store
        self._config = config
        self._metrics = metrics
        self._publisher = publisher
        self._executor = executor
        self._jobs: dict[str, JobRuntime] = {}
        self._store_down = False
        store.backend.on_health(self._store_health)
        self.limits = config.limits()
        self.max_message_bytes = config.max_message_bytes
        #: Where EstimateSubsets and SelectTasks run (apart from re-estimates and cheap calls).
        self.queries = QueryPool(self.limits)

    def _store_health(self, error: StoreUnavailableError | None) -> None:
        """Metrics, and a log line when the store stops or starts taking writes."""
        if error is not None:
            self._metrics.store_write_failures.inc()
            self._metrics.store_writable.set(0)
            if not self._store_down:
                self._store_down = True
                log.error("%s; writes answer UNAVAILABLE, reads and watches go on", error)
        elif self._store_down:
            self._store_down = False
            self._metrics.store_writable.set(1)
            log.warning("sketch store takes writes again")

    async def load_all(self) -> None:
        """Rebuild every job in the store (at start-up)."""
        for info in await asyncio.to_thread(self.store.list_jobs):
            if not await asyncio.to_thread(self._archived, info.name):
                await self._attach(info)

    async def get(self, name: str) -> JobRuntime:
        """The job `name`, loaded from the store if this server has not seen it.

        Raises:
            NotFoundError: (store) no such job, or it is archived; InvalidNameError:
                a bad name.
        """
        runtime = self._jobs.get(name)
        if runtime is not None:
            return runtime
        self.limits.check_name(name, "job")
        info = await asyncio.to_thread(self.store.get_job, name)
        if await asyncio.to_thread(self._archived, name):
            raise NotFoundError(f"job {name!r} is archived: its data is kept in the store, "
                                "it is no longer served")
        return await self._attach(info)

    async def remove(self, name: str) -> None:
        """Stop serving `name`: no more re-estimates (returns once none runs), its
        watch streams end with NOT_FOUND, its metric series go. A later `get`
        loads it again from the store unless it is archived or deleted there."""
        runtime = self._jobs.pop(name, None)
        if runtime is not None:
            await runtime.close(drain=True)
        self._publisher.remove_job(name)
        self._metrics.remove_job(name)

    def _archived(self, name: str) -> bool:
        return bool(self.store.job_control(name).archived_at)

    async def create(self, name: str, spec: SketchSpec, policy: Mapping[str, Any],
                     target: str) -> JobRuntime:
        """Create `name`, or return it if it exists with the same settings.

        Zero policy fields and an empty target match any stored value.

        Raises:
            AlreadyExistsError: the job exists with a different value of a field.
            InvalidArgumentError: a name, dim or target past the server's limits.
            LimitExceededError: the server holds `max_jobs` jobs already.
        """
        self.limits.check_name(name, "job")
        self.limits.check_dim(spec.dim)
        self.limits.check_target(target)
        existing = await asyncio.to_thread(self._find, name)
        if existing is not None and await asyncio.to_thread(self._archived, name):
            raise AlreadyExistsError(f"job {name!r} is archived: delete it (DeleteJob without "
                                     "keep_data) to reuse the name, or choose another")
        if existing is not None:
            _check_same(existing, spec, policy, target)
            return await self._attach(existing)
        self.limits.check_new_job(len(await asyncio.to_thread(self.store.list_jobs)))
        settings = job_settings(full_policy(policy, self._config.policy_defaults()), target)
        info = await asyncio.to_thread(self.store.create_job, name, spec, settings)
        return await self._attach(info)

    def _find(self, name: str) -> JobInfo | None:
        try:
            return self.store.get_job(name)
        except NotFoundError:
            return None

    async def _attach(self, info: JobInfo) -> JobRuntime:
        records = await asyncio.to_thread(self.store.read_mixtures, info.name)
        runtime = self._jobs.get(info.name)
        if runtime is not None:  # attached meanwhile
            return runtime
        last = records[-1] if records else None
        state = JobState(self.store, info, last, tolerance=self._config.weight_tolerance,
                         max_loss_ratio=self._config.max_estimated_loss_ratio,
                         limits=self._config.limits(), stale=self._config.stale_policy(),
                         untrained_fraction=self._config.untrained_loss_fraction)
        self._metrics.add_job(info.name)
        self._publisher.add_job(info.name, [mixture_to_pb(info.name, r) for r in records])
        runtime = JobRuntime(state, publisher=self._publisher, metrics=self._metrics,
                             executor=self._executor, debounce=self._config.debounce_seconds)
        self._jobs[info.name] = runtime
        if last is not None:
            set_record(self._metrics, info.name, last)
        runtime.request(full=True)
        return runtime

    async def close(self) -> None:
        self.queries.close()
        for runtime in list(self._jobs.values()):
            await runtime.close()


def set_record(metrics: ServerMetrics, job: str, record: MixtureRecord) -> None:
    """The mixture, pin and calibration gauges from a published version."""
    metrics.stale_tasks.labels(job).set(len(record.stale))
    metrics.set_mixture(job, record.version, record.created_at, record.weights,
                        anchor_loss=record.anchor_loss, estimated_loss=record.estimated_loss)
    metrics.mixture_pinned.labels(job).set(1 if record.pinned else 0)
    calibration = record.calibration
    if calibration is None:
        return
    metrics.set_calibration(job, regularization=calibration.regularization,
                            factor=calibration.factor, observations=calibration.observations,
                            ratio=calibration.ratio if calibration.ratio else None)


def _check_same(info: JobInfo, spec: SketchSpec, policy: Mapping[str, Any], target: str) -> None:
    def differs(field: str, stored: Any, requested: Any) -> AlreadyExistsError:
        return AlreadyExistsError(
            f"job {info.name!r} already exists with a different {field}: stored {stored!r}, "
            f"requested {requested!r}; use the stored value or another job name")

    for field in dataclasses.fields(SketchSpec):
        stored, requested = getattr(info.spec, field.name), getattr(spec, field.name)
        if stored != requested:
            raise differs(f"spec.sketch.{field.name}", stored, requested)
    stored_policy = info.settings.get("policy", {})
    for key, value in policy.items():
        if stored_policy.get(key) != value:
            raise differs(f"spec.policy.{key}", stored_policy.get(key), value)
    stored_target = info.settings.get("target", "")
    if target and target != stored_target:
        raise differs("spec.target", stored_target, target)

