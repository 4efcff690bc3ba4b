"""What the server knows of one job, and the re-estimate that keeps it current.

`JobState.refresh` runs on an estimation worker thread, never on the event
loop: it reads newly committed rows from the store into the current anchor's
`SubsetEstimator` (incrementally, along per-source read cursors), composes the
mixture, and, if the weights changed, persists the next version with
`store.append_mixture` before returning it for publication.

The estimator keeps the tasks' statistics, not their rows: the exact mode
and the bootstrap read a task's rows back from the store (`_read_back`, up to
the read cursor its statistics were built to), so a job's memory is
O(tasks·d²) plus its target rows, however many rows are uploaded.

The current anchor is the latest complete one (greatest step; on a tie, the
later declared). When it changes the estimator is rebuilt from the new
anchor's rows; tasks without rows there become pending again.

Each anchor's mixture is smoothed towards the mixture that was in force when
the anchor arrived (the last version estimated at an earlier anchor; policy
setting `smoothing`), so that one anchor's sampling noise cannot swing it.

Each anchor's mixture is estimated with a calibrated λ = λ₀·c
(`gradmix.server.calibration`): λ₀ from the anchor's declared horizon, c
corrected by comparing that same earlier version's predicted loss change with
the change the run realised. The policy handed to `compose_mixture` is the
job's with `regularization` replaced by it; the estimator's own default λ
stays the job's setting, which queries (EstimateSubsets, SelectTasks) use.

An estimate whose predicted loss is implausibly far from the anchor's own,
or one at an anchor taken on an untrained model (`gradmix.server.sanity`), is
held back: the previous weights stay in force and are published again as a
version that says so (`held`, `held_reason`, and the L̂ the held-back
estimate predicted) once, when the hold begins or a new anchor arrives,
with their own estimated loss there (`kept_composition`), so that the next
anchor's calibration still learns from the interval: holding back would
otherwise repeat at every anchor of a run whose λ starts far off.

A task pending for too long gets a decaying weight and is flagged stale
(`gradmix.server.staleness`); the time-based decay also asks for a
re-estimate when it next moves (`Refreshed.next_change`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from gradmix.server.calibration import calibrated_policy, interval_scale
from gradmix.server.compose import (
    Composition,
    compose_mixture,
    kept_composition,
    mixture_changed,
)
from gradmix.server.convert import ACTIVE, PENDING, policy_config
from gradmix.server.errors import PreconditionError
from gradmix.server.estimator import SubsetEstimator
from gradmix.server.lifecycle import operated
from gradmix.server.limits import Limits
from gradmix.server.rows import row_problems
from gradmix.server.sanity import implausible
from gradmix.server.staleness import (
    MAX_EXTRA_ANCHORS,
    StalePolicy,
    Streak,
    decayed,
    next_change,
    pending_streaks,
    run_order,
)
from gradmix.store import (
    AnchorInfo,
    CalibrationRecord,
    JobInfo,
    MixtureRecord,
    ReadCursor,
    RecordNotFoundError,
    SketchStore,
    TaskInfo,
)
from gradmix.vocabulary import AnchorState
from gradmix.vocabulary.policy_settings import PolicyConfig

log = logging.getLogger(__name__)

#: A source of rows at an anchor: a task name, or None for the target.
Source = str | None


def current_anchor(anchors: Sequence[AnchorInfo]) -> str:
    """The job's current anchor: the latest complete anchor of the latest run ("" if none).

    Runs are ordered by when their first anchor was declared, anchors within a
    run by step; so a second run of a job takes over at its first complete
    anchor, whatever the step the previous run had reached.
    """
    complete = [a for a in anchors if a.state == AnchorState.COMPLETE]
    if not complete:
        return ""
    return max(complete, key=run_order(anchors)).name


@dataclass
class AnchorRows:
    """One anchor's rows as ingested so far."""

    name: str
    estimator: SubsetEstimator
    cursors: dict[Source, ReadCursor | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Refreshed:
    """The outcome of one re-estimate."""

    record: MixtureRecord | None   # the new version, or None if nothing changed
    subsets_estimated: int
    pending: int                   # tasks by state after the re-estimate
    active: int
    open_anchors: dict[str, float] = field(default_factory=dict)   # name -> declared_at
    pending_since: dict[str, float] = field(default_factory=dict)  # task -> waiting since
    implausible: str = ""          # why the estimate is implausible ("" = it is not)
    held: bool = False             # whether it was held back (the previous mixture stays)
    stale: tuple[str, ...] = ()    # pending tasks whose weight decays
    next_change: float | None = None  # when a stale weight next decays by time (None: never)


#: σ is bootstrapped again once the rows grew by more than this factor (or λ moved by it).
ERROR_REUSE_GROWTH = 1.25


@dataclass(frozen=True)
class ScoreError:
    """The scores' bootstrap standard error σ and the rows it was computed on.

    The bootstrap costs several scorings, while σ, one number of the rows'
    spread, hardly moves when a commit adds a few rows. A re-estimate at the
    same anchor, with the same active tasks, fewer than `ERROR_REUSE_GROWTH`
    times the rows and about the same λ reuses it.
    """

    anchor: str
    tasks: frozenset[str]
    rows: int
    regularization: float
    error: float
    #: Each task's own σ_t (empty: σ for all).
    errors: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, anchor: str, estimator: SubsetEstimator, regularization: float,
           error: float, errors: Mapping[str, float] | None = None) -> ScoreError:
        rows = estimator.statistics(None).rows + sum(estimator.task_rows(t)
                                                    for t in estimator.tasks)
        return cls(anchor, frozenset(estimator.tasks), rows, regularization, error,
                   dict(errors or {}))

    @property
    def known(self) -> float | Mapping[str, float]:
        """What `compose_mixture` takes as its `error`."""
        return self.errors or self.error


class JobState:
    """One job's ingested rows, estimator and latest mixture version."""

    def __init__(self, store: SketchStore, info: JobInfo, last: MixtureRecord | None,
                 *, tolerance: float, max_loss_ratio: float = 0.0,
                 limits: Limits | None = None, stale: StalePolicy | None = None,
                 untrained_fraction: float = 0.0) -> None:
        self.store = store
        self.limits = limits or Limits()
        self.name = info.name
        self.info = info
        self.policy = policy_config(info.settings)
        self.tolerance = tolerance
        #: The sanity bound on L̂ / L̂(∅) either way (`gradmix.server.sanity`; 0: none).
        self.max_loss_ratio = max_loss_ratio
        #: L̂(∅) ≥ this × an anchor's declared untrained loss holds its estimate (0: never).
        self.untrained_fraction = untrained_fraction
        #: When a pending task is stale (None: never).
        self.stale = stale
        self.last = last
        #: Held while the estimator is read or extended (worker and query threads).
        self.lock = threading.Lock()
        self._rows: AnchorRows | None = None
        #: Rows per task at the current anchor as of the last refresh (read lock-free).
        self.task_rows: dict[str, int] = {}
        #: The last bootstrap's σ, reused while it describes the rows.
        self._error: ScoreError | None = None
        #: (anchor, the last version at an earlier anchor): smoothing and calibration.
        self._before: tuple[str, MixtureRecord | None] | None = None
        #: (anchor, reason) of the last implausible estimate logged, to log each once.
        self._flagged: tuple[str, str] | None = None
        #: Tasks retired by an operator: their rows are not ingested.
        self._retired: frozenset[str] = frozenset()
        #: Tasks with rows at earlier anchors (read once each, for pending streaks).
        self._sourced: dict[str, frozenset[str]] = {}
        #: The stale tasks of the last refresh (to log each change once).
        self._stale: frozenset[str] = frozenset()

    @property
    def anchor(self) -> str:
        rows = self._rows
        return rows.name if rows else ""

    def _anchor_rows(self, anchor: str) -> AnchorRows:
        """An empty `AnchorRows` for `anchor` whose estimator reads task rows back
        from the store instead of keeping them."""
        rows = AnchorRows(anchor, SubsetEstimator(self.info.spec.dim,
                                                  regularization=self.policy.regularization))
        rows.estimator.rows = lambda task: self._read_back(rows, task)
        return rows

    def _read_back(self, rows: AnchorRows, task: str) -> tuple[np.ndarray, np.ndarray]:
        """The rows of `task` that `rows` ingested, read again from the store.

        Called by the estimator (exact mode, bootstrap) under `lock`, so the
        cursor is the one its statistics were built to.
        """
        cursor = rows.cursors.get(task)
        if cursor is None:
            empty = np.zeros((0, self.info.spec.dim), np.float32)
            return empty, np.zeros(0)
        read, _ = self.store.read_rows(self.name, rows.name, task, until=cursor)
        return self._within_limits(rows.name, task, read.grads, read.values, quiet=True)

    def refresh(self, dirty: Collection[tuple[str, Source]], full: bool) -> Refreshed:
        """Ingest new rows and publish-worthy changes; runs on a worker thread.

        Args:
            dirty: (anchor, source) pairs a commit reported since the last run.
            full: read every source of the current anchor, not only `dirty`.
        """
        with self.lock:
            infos = self.store.list_tasks(self.name)
            tasks = [t.name for t in infos]
            retired = frozenset(t.name for t in infos if t.retired_at)
            pin = self.store.job_control(self.name).pin
            anchors = self.store.list_anchors(self.name)
            anchor = current_anchor(anchors)
            if anchor != self.anchor or retired != self._retired:
                self._rows = self._anchor_rows(anchor) if anchor else None
                self._retired = retired  # their rows leave the estimator with them
                full = True
            if self._rows is not None:
                self._ingest(self._rows, dirty, full)
            estimator = self._rows.estimator if self._rows else None
            before = self._record_before(anchor)
            policy, calibration = self._calibrated(anchors, anchor, estimator, before)
            previous = dict(before.weights) if before is not None else None
            known = self._known_error(anchor, estimator, policy.regularization)
            composition = compose_mixture([t for t in tasks if t not in retired], estimator,
                                          policy, previous=previous,
                                          error=known.known if known else None,
                                          failed={t.name for t in infos if t.failure})
            if known is None and estimator is not None and composition.subsets_estimated:
                self._error = ScoreError.of(anchor, estimator, policy.regularization,
                                            composition.score_error, composition.score_errors)
            streaks = self._streaks(infos, anchors, anchor, composition, estimator)
            now = time.time()
            if self.stale is not None:
                composition = decayed(composition, streaks, self.stale, now)
            estimated = composition  # what the sanity check judges (before pins)
            composition = operated(composition, tasks, retired, pin, estimator,
                                   policy.regularization)
            self.task_rows = {t: estimator.task_rows(t) for t in estimator.tasks} \
                if estimator else {}
        self._log_stale(composition, streaks)
        active = sum(state == ACTIVE for state in composition.states.values())
        pending = sum(state == PENDING for state in composition.states.values())
        outcome = Refreshed(None, composition.subsets_estimated, pending, active,
                            open_anchors={a.name: a.declared_at for a in anchors
                                          if a.state == "open"},
                            pending_since={t: s.since for t, s in streaks.items()},
                            stale=composition.stale,
                            next_change=next_change(streaks, self.stale, now)
                            if self.stale is not None and active else None)
        pinned = pin is not None
        if estimated.subsets_estimated and not pinned:  # a pin is the operator's call
            outcome = self._checked(outcome, anchor, estimated,
                                    next((a.untrained_loss for a in anchors if a.name == anchor),
                                         0.0))
        if outcome.held and self.last is not None and estimator is not None:
            with self.lock:
                composition = kept_composition(self.last.weights, composition, estimator,
                                               policy.regularization)
        held = (outcome.implausible, estimated.estimated_loss) if outcome.held else None
        last = self.last
        flags = (pinned, held is not None, held[0] if held else "")
        flags_changed = last is not None and (last.pinned, last.held, last.held_reason) != flags
        if not (mixture_changed(last, anchor, composition, self.tolerance) or flags_changed):
            return outcome
        record = self._record(anchor, composition, calibration, pinned, held)
        self.store.append_mixture(self.name, record)
        self.last = record
        return dataclasses.replace(outcome, record=record)

    def _checked(self, outcome: Refreshed, anchor: str, composition: Composition,
                 untrained_loss: float) -> Refreshed:
        """`outcome` with the sanity check's verdict on `composition` (`gradmix.server.sanity`).

        An implausible estimate is held back while there is a previous mixture to keep.
        """
        reason = implausible(composition.anchor_loss, composition.estimated_loss,
                             self.max_loss_ratio, untrained_loss, self.untrained_fraction)
        if not reason:
            self._flagged = None
            return outcome
        held = self.last is not None
        if self._flagged != (anchor, reason):
            self._flagged = (anchor, reason)
            log.warning(
                "job %r: implausible estimate at anchor %r (%s; bound a factor %g, untrained "
                "level %.4g): anchor loss %.4g, estimated loss %.4g; %s", self.name, anchor,
                reason, self.max_loss_ratio, untrained_loss, composition.anchor_loss,
                composition.estimated_loss,
                f"the weights of version {self.last.version} stay in force"
                if self.last is not None else "published: no earlier mixture to keep")
        return dataclasses.replace(outcome, implausible=reason, held=held)

    def _known_error(self, anchor: str, estimator: SubsetEstimator | None,
                     regularization: float) -> ScoreError | None:
        """The last bootstrap's σ if it still describes `estimator`'s rows (see `ScoreError`)."""
        known = self._error
        if known is None or estimator is None or not estimator.has_target:
            return None
        current = ScoreError.of(anchor, estimator, regularization, known.error)
        if (current.anchor != known.anchor or current.tasks != known.tasks
                or current.rows > ERROR_REUSE_GROWTH * known.rows
                or abs(math.log(current.regularization / known.regularization))
                > math.log(ERROR_REUSE_GROWTH)):
            return None
        return known

    def _record_before(self, anchor: str) -> MixtureRecord | None:
        """The last version estimated at an anchor other than `anchor` (None: none).

        It is the mixture that was in force when `anchor` arrived.
        """
        if self._before is None or self._before[0] != anchor:
            last = self.last
            if last is not None and last.anchor == anchor:
                earlier = [r for r in self.store.read_mixtures(self.name)
                           if r.anchor not in ("", anchor)]
                last = earlier[-1] if earlier else None
            self._before = (anchor, last if last is not None and last.anchor else None)
        return self._before[1]

    def _calibrated(self, anchors: Sequence[AnchorInfo], anchor: str,
                    estimator: SubsetEstimator | None, before: MixtureRecord | None
                    ) -> tuple[PolicyConfig, CalibrationRecord | None]:
        """The policy with λ calibrated for the current anchor, from its horizon and the
        interval since `before` (recomputed on every refresh: a pure function of them).
        The job's own policy and None while no anchor is complete."""
        if not anchor:
            return self.policy, None
        infos = {a.name: a for a in anchors}
        here = infos[anchor]
        scale = 1.0
        there = infos.get(before.anchor) if before is not None else None
        if there is not None and there.run != here.run:
            before, there = None, None  # another run: its interval says nothing about this one
        if there is not None and there.horizon is not None:
            scale = interval_scale(there.horizon.steps, here.step - there.step)
        return calibrated_policy(self.policy, horizon=here.horizon, estimator=estimator,
                                 previous=before, scale=scale)

    def _ingest(self, rows: AnchorRows, dirty: Collection[tuple[str, Source]],
                full: bool) -> None:
        if full:
            sources: list[Source] = [None, *self.store.sources(self.name, rows.name)]
        else:
            sources = list(dict.fromkeys(src for anchor, src in dirty if anchor == rows.name))
        sources = [source for source in sources if source not in self._retired]
        for source in sources:
            new, cursor = self.store.read_rows(self.name, rows.name, source,
                                               rows.cursors.get(source))
            grads, values = self._within_limits(rows.name, source, new.grads, new.values)
            if len(values):
                if source is None:
                    rows.estimator.add_target_rows(grads, values)
                else:
                    rows.estimator.add_task_rows(source, grads, values)
            rows.cursors[source] = cursor

    def _within_limits(self, anchor: str, source: Source, grads: np.ndarray,
                       values: np.ndarray, *, quiet: bool = False
                       ) -> tuple[np.ndarray, np.ndarray]:
        """The rows a writer committed to the store that pass `row_problems`; the rest
        are left out of every estimate (and logged unless `quiet`: read back, they
        were logged when ingested), so one bad row cannot break a job."""
        if not len(values):
            return grads, values
        bad, problem = row_problems(grads, values, self.limits)
        if not bad.any():
            return grads, values
        if quiet:
            return grads[~bad], values[~bad]
        what = "the target" if source is None else f"task {source!r}"
        log.warning("job %r: left out %d committed row(s) of %s at anchor %r that %s",
                    self.name, int(bad.sum()), what, anchor, problem)
        return grads[~bad], values[~bad]

    def _record(self, anchor: str, composition: Composition,
                calibration: CalibrationRecord | None, pinned: bool,
                held: tuple[str, float] | None) -> MixtureRecord:
        """The next version; `held`: (why, the held-back L̂) when the weights were kept."""
        version = (self.last.version if self.last else 0) + 1
        pending = {t: n for t, n in composition.pending_anchors.items()
                   if composition.states.get(t) == PENDING}
        return MixtureRecord(
            version=version, created_at=time.time(), anchor=anchor,
            policy=self.policy.policy, weights=composition.weights,
            scores=composition.scores, states=composition.states,
            anchor_loss=composition.anchor_loss, estimated_loss=composition.estimated_loss,
            score_error=composition.score_error, calibration=calibration, pinned=pinned,
            held=held is not None, held_reason=held[0] if held else "",
            held_estimated_loss=held[1] if held else 0.0, pending_anchors=pending,
            stale=tuple(t for t in composition.stale if composition.states.get(t) == PENDING))

    def _streaks(self, tasks: Sequence[TaskInfo], anchors: Sequence[AnchorInfo], anchor: str,
                 composition: Composition, estimator: SubsetEstimator | None
                 ) -> dict[str, Streak]:
        """Each pending task's streak (`gradmix.server.staleness`); call with `lock` held."""
        present = frozenset(estimator.tasks) if estimator is not None else frozenset()

        def sourced(name: str) -> frozenset[str]:
            if name == anchor:
                return present
            if name not in self._sourced:  # an earlier anchor: its rows rarely change
                self._sourced[name] = frozenset(self.store.sources(self.name, name))
            return self._sourced[name]

        pending = {t for t, s in composition.states.items() if s == PENDING}
        limit = (self.stale.anchors if self.stale else 0) + MAX_EXTRA_ANCHORS
        return pending_streaks(tasks, pending, anchors, anchor, sourced, limit)

    def _log_stale(self, composition: Composition, streaks: dict[str, Streak]) -> None:
        """Log each task that turns stale, and each that stops being stale."""
        stale = frozenset(composition.stale)
        for task in sorted(stale - self._stale):
            log.warning("job %r: task %r is stale: pending at %d complete anchor(s) in a row, "
                        "%.0f s; its weight decays (now %.4g) until it is sketched, retired "
                        "or reported failed", self.name, task, streaks[task].anchors,
                        time.time() - streaks[task].since, composition.weights.get(task, 0.0))
        for task in sorted(self._stale - stale):
            log.info("job %r: task %r is no longer stale (%s)", self.name, task,
                     composition.states.get(task, "gone"))
        self._stale = stale

    def estimator_at(self, anchor: str) -> tuple[str, SubsetEstimator]:
        """The estimator at `anchor` ("" = current), for queries; call with `lock` held.

        A non-current anchor's estimator is built from its rows for this query.

        Raises:
            PreconditionError: no complete anchor, the anchor is open, or it
                has no target rows.
            RecordNotFoundError: (store) no such anchor.
        """
        anchors = self.store.list_anchors(self.name)
        name = anchor or current_anchor(anchors)
        if not name:
            raise PreconditionError(
                f"job {self.name!r} has no complete anchor yet: declare one, sketch the "
                "target and tasks there, then complete it")
        info = next((a for a in anchors if a.name == name), None)
        if info is None:
            raise RecordNotFoundError(f"job {self.name!r} has no anchor {name!r}")
        if info.state != "complete":
            raise PreconditionError(
                f"anchor {name!r} of job {self.name!r} is not complete: complete it first")
        if self._rows is not None and self._rows.name == name:
            estimator = self._rows.estimator
        else:
            rows = self._anchor_rows(name)
            self._ingest(rows, (), full=True)
            estimator = rows.estimator
        if not estimator.has_target:
            raise PreconditionError(
                f"anchor {name!r} of job {self.name!r} has no target rows yet: sketch the "
                "target there and commit it")
        return name, estimator

