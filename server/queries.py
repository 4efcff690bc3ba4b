"""EstimateSubsets and SelectTasks: the paper's discrete outputs on a live job.

Both run on a worker thread (never the event loop) with the job's estimator
lock held, at the current anchor or a named complete one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server.convert import estimate_mode, scores_to_pb
from gradmix.server.errors import InvalidArgumentError, PreconditionError, UnknownTaskError
from gradmix.server.estimator import SubsetEstimator
from gradmix.server.jobstate import JobState
from gradmix.server.policies import (
    POLICIES,
    bootstrap_config,
    compute_mixture,
    subsets_scored,
)
from gradmix.server.selection import forward_selection, select_threshold, select_top_k


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


def estimate_subsets(state: JobState, request: pb.EstimateSubsetsRequest) -> QueryResult:
    """L̂(S) of each requested subset."""
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
    with state.lock:
        anchor, estimator = state.estimator_at(request.anchor)
        _check_tasks(state, anchor, estimator, [t for s in subsets for t in s])
        losses = estimator.estimate_named(subsets, weights, mode=mode) if subsets else []
        anchor_loss = estimator.anchor_loss()
    response = pb.EstimateSubsetsResponse(anchor=anchor, losses=[float(v) for v in losses],
                                          anchor_loss=anchor_loss)
    return QueryResult(response, len(subsets))


def select_tasks(state: JobState, request: pb.SelectTasksRequest) -> QueryResult:
    """A subset of the active tasks by threshold or top-k on scores, or forward selection."""
    method = request.method
    if method == pb.SELECTION_METHOD_TOP_K and request.k == 0:
        raise InvalidArgumentError("top-k selection needs k >= 1")
    if method not in pb.SelectionMethod.values():
        raise InvalidArgumentError(f"unknown selection method enum value {method}")
    mode = estimate_mode(request.mode)
    policy = state.policy
    with state.lock:
        anchor, estimator = state.estimator_at(request.anchor)
        if not estimator.tasks:
            raise PreconditionError(
                f"no task of job {state.name!r} has sketch rows at anchor {anchor!r} yet")
        scores, weights = compute_mixture(estimator, policy)
        n = len(estimator.tasks)
        rounds = policy.bootstrap if n > 1 and POLICIES[policy.policy].needs_target else 0
        counted = subsets_scored(n, policy) + rounds * subsets_scored(n, bootstrap_config(policy))
        if method == pb.SELECTION_METHOD_FORWARD:
            evaluated: list[int] = []
            selected, estimated = forward_selection(estimator, mode=mode,
                                                    on_estimate=evaluated.append)
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
