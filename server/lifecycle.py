"""Operator changes to a running job, and the job's event log that records them.

An operator can retire a task, activate it again, change its metadata, pin
the job's mixture to given weights and unpin it, and delete or archive the
job. Where each change lives, and what it does:

- A task's metadata and retirement are its registry document in the store
  (`SketchStore.update_task`). A retired task stays registered, keeps its rows
  and its place in the history; its rows leave the estimator, and from the
  next version it is listed with weight 0 and state `retired`, until it is
  activated again. Excluding a task is retiring it: one concept, not two.
- A pin is the job's control document (`SketchStore.set_job_control`). While
  it is set every version publishes the pinned weights (normalised over the
  named tasks, every other task 0) with `pinned` true; re-estimates go on
  underneath, and EstimateSubsets and SelectTasks answer from them.
- Archiving marks the control document: the server stops serving the job
  (NOT_FOUND), its store data stays where it is, and the name stays taken.
  ListJobs lists it with `include_archived`, its event log stays readable,
  and unarchiving clears the mark: the job is served again as it was left.
  Deleting removes the job's whole tree from the store. Either way its watch
  streams end with NOT_FOUND and its metric series go.

Every change appends a `JobEvent` (when, who, what) to the job's log
(ListJobEvents); a change to the mixture also shows as its next version.
Who: the caller's `x-gradmix-actor` metadata, else its peer address (once
requests are authenticated, the token's name is the one to record).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server.auth import authenticated_caller
from gradmix.server.compose import Composition, _estimated_loss
from gradmix.server.errors import InvalidArgumentError, NotFoundError, PreconditionError
from gradmix.server.estimator import SubsetEstimator
from gradmix.store import JobEvent, TaskInfo, validate_name
from gradmix.vocabulary import TaskState
from grpc import aio

if TYPE_CHECKING:
    from gradmix.server.jobs import JobRegistry

log = logging.getLogger(__name__)

#: The request metadata key naming who makes a change.
ACTOR_METADATA = "x-gradmix-actor"
#: Longer actor names are cut to this many characters.
MAX_ACTOR = 200


def actor_of(context: aio.ServicerContext) -> str:
    """Who makes a change: the name of the caller's token where the server checks
    tokens (`token:<name>`); else the `x-gradmix-actor` metadata, else the caller's peer."""
    caller = authenticated_caller()
    if caller is not None:
        return f"token:{caller}"
    for key, value in context.invocation_metadata() or ():
        if key == ACTOR_METADATA and value:
            return str(value)[:MAX_ACTOR]
    return str(context.peer() or "unknown")


def operated(composition: Composition, tasks: Sequence[str], retired: Collection[str],
             pin: Mapping[str, float] | None, estimator: SubsetEstimator | None,
             regularization: float) -> Composition:
    """The mixture to publish: `composition` (estimated over the tasks not retired)
    with the retired tasks at weight 0 and, if pinned, the pinned weights.

    A pinned version's estimated loss is L̂ of the pinned weights over the
    active tasks (the anchor loss when none of them is active and weighted).
    """
    weights = {t: 0.0 if t in retired else composition.weights.get(t, 0.0) for t in tasks}
    scores = {t: 0.0 if t in retired else composition.scores.get(t, 0.0) for t in tasks}
    states = {t: TaskState.RETIRED.value if t in retired else composition.states[t]
              for t in tasks}
    estimated = composition.estimated_loss
    if pin is not None:
        raw = {t: 0.0 if t in retired else pin.get(t, 0.0) for t in tasks}
        total = sum(raw.values())
        if total > 0:  # the RPCs keep a pin on some task that is not retired
            weights = {t: w / total for t, w in raw.items()}
            estimated = _pinned_loss(composition, weights, states, estimator, regularization)
    return dataclasses.replace(composition, weights=weights, scores=scores, states=states,
                               estimated_loss=estimated)


def _pinned_loss(composition: Composition, weights: Mapping[str, float],
                 states: Mapping[str, str], estimator: SubsetEstimator | None,
                 regularization: float) -> float:
    active = [t for t, w in weights.items() if w > 0 and states[t] == TaskState.ACTIVE]
    if estimator is None or not estimator.has_target or not active:
        return composition.anchor_loss
    total = sum(weights[t] for t in active)
    return _estimated_loss(estimator, active, {t: weights[t] / total for t in active},
                           regularization)


def pin_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Requested pin weights, normalised to sum to 1.

    Raises:
        InvalidArgumentError: none given, a weight negative or not finite, or all 0.
    """
    if not weights:
        raise InvalidArgumentError("a pin needs at least one task=weight")
    bad = {t: w for t, w in weights.items() if not math.isfinite(w) or w < 0}
    if bad:
        raise InvalidArgumentError(f"pinned weights must be finite and >= 0; got {bad}")
    total = sum(weights.values())
    if total <= 0:
        raise InvalidArgumentError("pinned weights are all 0: give some task a positive weight")
    return {t: w / total for t, w in sorted(weights.items())}


class Lifecycle:
    """The operator changes, on the jobs of one registry (called by the servicer)."""

    def __init__(self, registry: JobRegistry) -> None:
        self._registry = registry
        self._store = registry.store

    async def update_task(self, request: pb.UpdateTaskRequest, actor: str) -> TaskInfo:
        """Set/remove metadata keys, retire or activate; one event per kind of change."""
        runtime = await self._registry.get(request.job)
        retired = request.retired if request.HasField("retired") else None
        info = await asyncio.to_thread(self._update_task, request, retired, actor)
        runtime.request(full=True)
        return info

    def _update_task(self, request: pb.UpdateTaskRequest, retired: bool | None,
                     actor: str) -> TaskInfo:
        store, job, name = self._store, request.job, request.name
        validate_name(name, "task")
        tasks = {t.name: t for t in store.list_tasks(job)}
        before = tasks.get(name)
        if before is None:
            raise NotFoundError(f"task {name!r} is not registered in job {job!r}")
        if retired and not before.retired_at:
            if all(t.retired_at for t in tasks.values() if t.name != name):
                raise PreconditionError(
                    f"{name!r} is the last task of job {job!r} that is not retired: a mixture "
                    "needs one; register or activate another task first")
            self._check_pin_survives(job, name, tasks)
        after = store.update_task(job, name, metadata=dict(request.metadata),
                                  remove=list(request.remove_metadata), retired=retired)
        if after.metadata != before.metadata:
            details = {f"metadata.{k}": v for k, v in sorted(after.metadata.items())
                       if before.metadata.get(k) != v}
            removed = sorted(set(before.metadata) - set(after.metadata))
            if removed:
                details["removed"] = ",".join(removed)
            store.append_event(job, actor=actor, action="update_task", task=name,
                               details=details)
        if bool(after.retired_at) != bool(before.retired_at):
            action = "retire_task" if after.retired_at else "activate_task"
            store.append_event(job, actor=actor, action=action, task=name)
            log.info("job %r: task %r %s by %s", job, name,
                     "retired" if after.retired_at else "activated", actor)
        return after

    def _check_pin_survives(self, job: str, task: str, tasks: Mapping[str, TaskInfo]) -> None:
        pin = self._store.job_control(job).pin
        if pin is None:
            return
        left = [t for t, w in pin.items()
                if w > 0 and t != task and t in tasks and not tasks[t].retired_at]
        if not left:
            raise PreconditionError(
                f"job {job!r} is pinned with all its weight on {task!r} (and retired tasks): "
                "pin other weights or unpin before retiring it")

    async def pin(self, request: pb.PinMixtureRequest, actor: str) -> JobEvent:
        """Pin the job's mixture from the next version on."""
        runtime = await self._registry.get(request.job)
        weights = pin_weights(dict(request.weights))
        event = await asyncio.to_thread(self._pin, request.job, weights, request.reason, actor)
        runtime.request(full=True)
        return event

    def _pin(self, job: str, weights: dict[str, float], reason: str, actor: str) -> JobEvent:
        store = self._store
        tasks = {t.name: t for t in store.list_tasks(job)}
        unknown = sorted(set(weights) - set(tasks))
        if unknown:
            raise NotFoundError(f"job {job!r} has no task {', '.join(map(repr, unknown))}: "
                                "pin registered tasks only")
        retired = sorted(t for t, w in weights.items() if w > 0 and tasks[t].retired_at)
        if retired:
            raise PreconditionError(f"task {', '.join(map(repr, retired))} of job {job!r} is "
                                    "retired: activate it first, or pin it at 0")
        control = store.job_control(job)
        store.set_job_control(job, dataclasses.replace(control, pin=weights))
        details = {f"weight.{t}": f"{w:.6g}" for t, w in weights.items()}
        if reason:
            details["reason"] = reason
        log.info("job %r: mixture pinned by %s: %s", job, actor, weights)
        return store.append_event(job, actor=actor, action="pin", details=details)

    async def unpin(self, request: pb.UnpinMixtureRequest, actor: str) -> JobEvent:
        """Publish estimated weights again from the next version on."""
        runtime = await self._registry.get(request.job)
        event = await asyncio.to_thread(self._unpin, request.job, request.reason, actor)
        runtime.request(full=True)
        return event

    def _unpin(self, job: str, reason: str, actor: str) -> JobEvent:
        store = self._store
        control = store.job_control(job)
        if control.pin is None:
            raise PreconditionError(f"job {job!r} is not pinned")
        store.set_job_control(job, dataclasses.replace(control, pin=None))
        log.info("job %r: mixture unpinned by %s", job, actor)
        return store.append_event(job, actor=actor, action="unpin",
                                  details={"reason": reason} if reason else None)

    async def delete_job(self, request: pb.DeleteJobRequest, actor: str) -> JobEvent:
        """Archive (`keep_data`) or delete a job; an archived job can still be deleted."""
        name, keep = request.name, request.keep_data
        event = await asyncio.to_thread(self._mark_gone, name, keep, request.reason, actor)
        await self._registry.remove(name)
        if not keep:
            await asyncio.to_thread(self._store.delete_job, name)
        log.info("job %r %s by %s", name, "archived" if keep else "deleted", actor)
        return event

    def _mark_gone(self, job: str, keep: bool, reason: str, actor: str) -> JobEvent:
        """Record the event and mark the job archived, so no RPC loads it again meanwhile."""
        store = self._store
        control = store.job_control(job)  # NotFoundError: no such job
        if keep and control.archived_at:
            raise PreconditionError(f"job {job!r} is already archived")
        event = store.append_event(job, actor=actor,
                                   action="archive_job" if keep else "delete_job",
                                   details={"reason": reason} if reason else None)
        if not control.archived_at:
            store.set_job_control(job, dataclasses.replace(control, archived_at=time.time()))
        return event

    async def unarchive_job(self, request: pb.UnarchiveJobRequest, actor: str) -> JobEvent:
        """Serve an archived job again, from its store data as it was left."""
        self._registry.limits.check_name(request.name, "job")
        event = await asyncio.to_thread(self._unarchive, request.name, request.reason, actor)
        await self._registry.get(request.name)  # attach: re-estimate, series, watchers
        log.info("job %r unarchived by %s", request.name, actor)
        return event

    def _unarchive(self, job: str, reason: str, actor: str) -> JobEvent:
        store = self._store
        control = store.job_control(job)  # NotFoundError: no such job
        if not control.archived_at:
            raise PreconditionError(f"job {job!r} is not archived")
        store.set_job_control(job, dataclasses.replace(control, archived_at=0.0))
        return store.append_event(job, actor=actor, action="unarchive_job",
                                  details={"reason": reason} if reason else None)

    async def events(self, job: str, after_sequence: int) -> list[JobEvent]:
        """The job's event log after `after_sequence` (an archived job's too)."""
        self._registry.limits.check_name(job, "job")
        return await asyncio.to_thread(self._store.list_events, job, after_sequence)
