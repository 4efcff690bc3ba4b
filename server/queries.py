"""EstimateSubsets and SelectTasks: the paper's discrete outputs on a live job.

Both are heavy (a call may estimate thousands of subsets), so they run apart
from everything else: on the `QueryPool`'s own few threads (never the event
loop, never the default executor that cheap calls' store reads use), with
the job's estimator lock held, at the current anchor or a named complete one.
A call is refused up front when its cost (subsets × tasks) passes the
server's limit, and it stops between chunks of subsets when the caller
cancels or its deadline (the client's, or `query_timeout_seconds`) passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server.convert import estimate_mode, scores_to_pb
from gradmix.server.errors import (
    InvalidArgumentError,
    LimitExceededError,
    PreconditionError,
    QueryDeadlineError,
    UnknownTaskError,
)
from gradmix.server.estimator import SubsetEstimator
from gradmix.server.jobstate import JobState
from gradmix.server.limits import Limits
from gradmix.server.policies import (
    POLICIES,
    bootstrap_config,
    compute_mixture,
    subsets_scored,
)
from gradmix.server.selection import forward_selection, select_threshold, select_top_k
from gradmix.vocabulary import EstimateMode

#: Subsets estimated between two checks of the caller's deadline, per mode.
CHUNK = {EstimateMode.FAST: 256, EstimateMode.EXACT: 1}


class QueryCancelledError(Exception):
    """The caller went away; the query stopped (nobody reads this error)."""


class Budget:
    """A query's deadline and cancel flag, checked by the worker between chunks."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._deadline = time.monotonic() + seconds
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def check(self) -> None:
        """Raise if the caller cancelled or the deadline passed."""
        if self._cancelled.is_set():
            raise QueryCancelledError
        if time.monotonic() > self._deadline:
            raise QueryDeadlineError(
                f"the query ran past its deadline of {self.seconds:.3g} s (the client's "
                "deadline or the server's query_timeout_seconds) and was stopped: ask for "
                "fewer subsets per call")


Query = Callable[[JobState, object, Limits, Budget], "QueryResult"]


class QueryPool:
    """The bounded pool heavy queries run on (`Limits.query_workers` threads)."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._executor = ThreadPoolExecutor(limits.query_workers,
                                            thread_name_prefix="gradmix-query")
        self._admitted = 0

    async def run(self, query: Query, state: JobState, request: object,
                  time_remaining: float | None) -> QueryResult:
        """Run `query` on a pool thread; cancelling the caller stops it at the next chunk.

        Raises:
            LimitExceededError: `max_queued_queries` are already waiting.
        """
        limits = self._limits
        if self._admitted >= limits.query_workers + limits.max_queued_queries:
            raise LimitExceededError(
                f"{self._admitted} queries are running or queued, the server's query_workers "
                f"+ max_queued_queries: retry later")
        seconds = limits.query_timeout_seconds
        if time_remaining is not None:
            seconds = min(seconds, max(time_remaining, 0.0))
        budget = Budget(seconds)
        self._admitted += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, query, state, request, limits,
                                              budget)
        finally:
            budget.cancel()  # the caller is gone or done: a running query stops
            self._admitted -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class QueryResult:
    response: pb.EstimateSubsetsResponse | pb.SelectTasksResponse
    subsets_estimated: int


def _check_tasks(state: JobState, anchor: str, estimator: SubsetEstimator,
                 names: Sequence[str]) -> None:
    known = set(estimator.tasks)
    missing = [n for n in dict.fromkeys(names) if n not in known]
    if not missing:
        return
    tasks = {t.name: t for t in state.store.list_tasks(state.name)}
    unknown = [n for n in missing if n not in tasks]
    if unknown:
        raise UnknownTaskError(f"job {state.name!r} has no task(s) {unknown}")
    retired = [n for n in missing if tasks[n].retired_at]
    if retired:
        raise PreconditionError(f"task(s) {retired} of job {state.name!r} are retired: "
                                "activate them to estimate with them")
    raise PreconditionError(
        f"task(s) {missing} of job {state.name!r} have no sketch rows at anchor {anchor!r} "
        "yet (pending): sketch them there first")


def estimate_subsets(state: JobState, request: object, limits: Limits,
                     budget: Budget) -> QueryResult:
    """L̂(S) of each requested subset."""
    assert isinstance(request, pb.EstimateSubsetsRequest)
    mode = estimate_mode(request.mode)
    subsets = [list(s.tasks) for s in request.subsets]
    for i, subset in enumerate(request.subsets):
        if subset.weights and len(subset.weights) != len(subset.tasks):
            raise InvalidArgumentError(
                f"subset {i} has {len(subset.tasks)} tasks but {len(subset.weights)} weights")
    weights: list[list[float]] | None = None
    if any(s.weights for s in request.subsets):
        # The estimator renormalises weights within a subset: 1.0 each is uniform.
        weights = [list(s.weights) or [1.0] * len(s.tasks) for s in request.subsets]
    with state.lock, contextlib.ExitStack() as cached:
        anchor, estimator = state.estimator_at(request.anchor)
        cached.enter_context(estimator.rows_cached())  # rows read back once per call
        limits.check_query_cost(len(subsets), len(estimator.tasks), mode)
        _check_tasks(state, anchor, estimator, [t for s in subsets for t in s])
        losses: list[float] = []
        step = CHUNK[mode]
        for start in range(0, len(subsets), step):
            budget.check()
            chunk_weights = weights[start:start + step] if weights is not None else None
            losses.extend(estimator.estimate_named(subsets[start:start + step], chunk_weights,
                                                   mode=mode))
        anchor_loss = estimator.anchor_loss()
    response = pb.EstimateSubsetsResponse(anchor=anchor, losses=[float(v) for v in losses],
                                          anchor_loss=anchor_loss)
    return QueryResult(response, len(subsets))


def select_tasks(state: JobState, request: object, limits: Limits,
                 budget: Budget) -> QueryResult:
    """A subset of the active tasks by threshold or top-k on scores, or forward selection."""
    assert isinstance(request, pb.SelectTasksRequest)
    method = request.method
    if method == pb.SELECTION_METHOD_TOP_K and request.k == 0:
        raise InvalidArgumentError("top-k selection needs k >= 1")
    if method not in pb.SelectionMethod.values():
        raise InvalidArgumentError(f"unknown selection method enum value {method}")
    mode = estimate_mode(request.mode)
    policy = state.policy
    with state.lock, contextlib.ExitStack() as cached:
        anchor, estimator = state.estimator_at(request.anchor)
        cached.enter_context(estimator.rows_cached())  # rows read back once per call
        if not estimator.tasks:
            raise PreconditionError(
                f"no task of job {state.name!r} has sketch rows at anchor {anchor!r} yet")
        n = len(estimator.tasks)
        rounds = policy.bootstrap if n > 1 and POLICIES[policy.policy].needs_target else 0
        counted = subsets_scored(n, policy) + rounds * subsets_scored(n, bootstrap_config(policy))
        limits.check_query_cost(counted, n, "fast")
        if method == pb.SELECTION_METHOD_FORWARD:  # at most n rounds of at most n subsets
            limits.check_query_cost(n * (n + 1) // 2, n, mode)
        budget.check()
        scores, weights = compute_mixture(estimator, policy)
        if method == pb.SELECTION_METHOD_FORWARD:
            evaluated: list[int] = []

            def on_estimate(subsets: int) -> None:
                evaluated.append(subsets)
                budget.check()

            selected, estimated = forward_selection(estimator, mode=mode,
                                                    on_estimate=on_estimate)
            counted += sum(evaluated)
        else:
            if method == pb.SELECTION_METHOD_TOP_K:
                selected = select_top_k(scores, int(request.k))
            else:
                selected = select_threshold(scores, request.threshold)
            estimated = float(estimator.estimate_named([selected], mode=mode)[0])
            counted += 1
        anchor_loss = estimator.anchor_loss()
        order = list(estimator.tasks)
    response = pb.SelectTasksResponse(
        anchor=anchor, selected=list(selected), estimated_loss=float(estimated),
        anchor_loss=anchor_loss, scores=scores_to_pb(scores, weights, order))
    return QueryResult(response, counted)
