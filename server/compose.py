"""Composing a job's mixture over all its tasks, pending ones included.

Active tasks (sketched at the current anchor) are weighted by the job's
policy: scores from `compute_scores`, bootstrap replicates of them from
`bootstrap_scores`, then `scores_to_mixture` with the temperature in units of
their standard error. Where the evidence is thin, a task is capped at the
uniform share 1/n of the active tasks: it has fewer than `THIN_ROWS` sketched
rows, or fewer than both the target and the largest task. The trainer
sketches as many examples of every task as of the target unless a task's
pool runs out first, so such a task is (all but always) a small one: its rows
are its whole pool, and a mixture that leans on it repeats those examples
many times over the horizon, which the first-order estimate (fresh examples
at every step) does not see (bench/outcome.py's sizes-and-noise suite; the
README's Policies section has what the cap changed there).

Given the mixture in force before the current anchor, the active weights are
then smoothed towards it (`smooth_mixture`, policy setting `smoothing`). A
pending task (registered, not yet sketched there) gets `prior_weight` times
the mean active weight, i.e. with prior_weight = 1 it is sampled as often as
an average active task; the whole vector is then renormalised to sum to 1. With no active task,
or before the target is sketched (nothing to score against), every task is
weighted uniformly. A failed task (its data cannot be loaded, as a trainer
reported) is left out of all of this: weight 0, state failed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from gradmix.server.convert import ACTIVE, FAILED, PENDING
from gradmix.server.estimator import SubsetEstimator
from gradmix.server.mixture import (
    apply_floor,
    cap_weights,
    pooled_error,
    scores_to_mixture,
    smooth_mixture,
    task_errors,
)
from gradmix.server.policies import (
    POLICIES,
    bootstrap_config,
    bootstrap_scores,
    compute_scores,
    subsets_scored,
    task_scales,
)
from gradmix.server.selection import backward_elimination
from gradmix.store import MixtureRecord
from gradmix.vocabulary.policy_settings import PolicyConfig

#: Active tasks with fewer sketched rows than this (or than both the target and
#: the largest task) are capped at the uniform share.
THIN_ROWS = 16
#: How much softer than the job's temperature the candidate mixtures go
#: (`_best_estimated`); the uniform mixture is a candidate too.
SOFTER = tuple(2.0**k for k in range(9))
#: A softer candidate must gain this share of the best estimated improvement
#: L̂(∅) − min L̂ over the sharpest one to be taken; backward elimination
#: removes a task while L̂ stays within this share of its best.
SOFTENING_GAIN = 0.05
#: Backward elimination (``subset_search``) starts from at most this many
#: tasks, the best-scoring ones: it estimates O(k²) subsets, in k batched
#: calls. At 100 tasks, d = 256, 64 rows each, a commit's composition took
#: 0.08 s (median of 8 commits) at 16 against 0.20 s at 32; `ensemble` 0.05 s.
ELIMINATION_TASKS = 16
#: It removes a task while L̂ stays within this share of the best estimated
#: gain. Wider than `SOFTENING_GAIN`: a task the estimate rates as adding a
#: little to a subset is where it is most often wrong (bench/outcome.py's
#: near-misses suite, 6 seeds of subset_search runs: 0.662 at 0.15 against
#: 0.734 at 0.05; complementary 0.877 against 0.890; at 0.3 complementary
#: lost the pair on one seed).
ELIMINATION_TOLERANCE = 0.15


@dataclass(frozen=True, kw_only=True)
class Composition:
    """A mixture before it gets a version: what a re-estimate produced."""

    weights: dict[str, float]
    scores: dict[str, float]
    states: dict[str, str]
    anchor_loss: float
    estimated_loss: float
    subsets_estimated: int
    score_error: float = 0.0
    #: Each active task's own σ_t (`gradmix.server.mixture.task_errors`).
    score_errors: dict[str, float] = field(default_factory=dict)
    #: Pending tasks' complete anchors in a row without rows (`gradmix.server.staleness`).
    pending_anchors: dict[str, int] = field(default_factory=dict)
    #: Pending tasks whose weight decays for waiting too long.
    stale: tuple[str, ...] = ()


def compose_mixture(tasks: Sequence[str], estimator: SubsetEstimator | None,
                    policy: PolicyConfig,
                    previous: Mapping[str, float] | None = None,
                    error: float | Mapping[str, float] | None = None,
                    failed: Collection[str] = ()) -> Composition:
    """Weights over `tasks` (registration order) from what `estimator` holds.

    Args:
        tasks: every registered task of the job.
        estimator: the current anchor's estimator (None: no complete anchor).
        policy: the job's policy settings.
        previous: the weights in force before the current anchor (None: none).
        error: the scores' standard error if already known for these rows
            (the bootstrap, the costly part, is then skipped): one σ for every
            task, or each task's own σ_t (a `Composition.score_errors`);
            None: bootstrap.
        failed: tasks whose data cannot be loaded: weight 0, state failed.
    """
    if failed:
        kept = compose_mixture([t for t in tasks if t not in failed], estimator, policy,
                               previous=previous, error=error)
        gone = [t for t in tasks if t in failed]
        return replace(kept, weights={**kept.weights, **dict.fromkeys(gone, 0.0)},
                       scores={**kept.scores, **dict.fromkeys(gone, 0.0)},
                       states={**kept.states, **dict.fromkeys(gone, FAILED)})
    rows = {t: estimator.task_rows(t) if estimator and t in estimator.tasks else 0
            for t in tasks}
    active = [t for t in tasks if rows[t] > 0]
    states: dict[str, str] = {t: ACTIVE if rows[t] > 0 else PENDING for t in tasks}
    scorable = estimator is not None and estimator.has_target and bool(active)
    if not scorable or estimator is None:
        uniform = 1.0 / len(tasks) if tasks else 0.0
        anchor_loss = estimator.anchor_loss() if estimator and estimator.has_target else 0.0
        return Composition(weights=dict.fromkeys(tasks, uniform), scores=dict.fromkeys(tasks, 0.0),
                           states=states, anchor_loss=anchor_loss, estimated_loss=anchor_loss,
                           subsets_estimated=0)
    all_scores = compute_scores(estimator, policy)
    scores = {t: float(all_scores[t]) for t in active}
    bootstraps = 0
    errors: dict[str, float] = {}
    if error is None:
        replicates = bootstrap_scores(estimator, policy)
        columns = [estimator.tasks.index(t) for t in active]
        errors = dict(zip(active, task_errors(replicates[:, columns]).tolist(), strict=True))
        error = pooled_error(errors.values())
        bootstraps = len(replicates)
    elif isinstance(error, Mapping):
        errors = {t: float(error[t]) for t in active if t in error}
        error = pooled_error(errors.values())
    full = min(estimator.statistics(None).rows, max(rows[t] for t in active))
    enough_rows = max(THIN_ROWS, full)
    thin = {t for t in active if rows[t] < enough_rows}
    active_weights, searched = _best_estimated(estimator, policy, scores, error, thin,
                                               len(active), errors)
    if previous:
        before = {t: previous[t] for t in active if t in previous}
        total_before = sum(before.values())
        if total_before > 0:
            before = {t: w / total_before for t, w in before.items()}
            active_weights = smooth_mixture(before, active_weights, policy.smoothing)
    estimated = _estimated_loss(estimator, active, active_weights, policy.regularization)
    pending_weight = policy.prior_weight / len(active)
    raw = {t: active_weights[t] if states[t] == ACTIVE else pending_weight for t in tasks}
    total = sum(raw.values())
    counted = subsets_scored(len(estimator.tasks), policy)
    counted += bootstraps * subsets_scored(len(estimator.tasks), bootstrap_config(policy))
    counted += searched
    return Composition(weights={t: w / total for t, w in raw.items()},
                       scores={t: scores.get(t, 0.0) for t in tasks}, states=states,
                       anchor_loss=estimator.anchor_loss(), estimated_loss=estimated,
                       subsets_estimated=counted + 1,
                       score_error=error, score_errors=errors)


def _best_estimated(estimator: SubsetEstimator, policy: PolicyConfig,
                    scores: Mapping[str, float], error: float, thin: Collection[str],
                    active: int, errors: Mapping[str, float]) -> tuple[dict[str, float], int]:
    """The sharpest mixture from `scores` whose estimated gain is near the best,
    and how many subsets were estimated to find it.

    Candidates are `scores_to_mixture` at the job's temperature and at
    `SOFTER` times softer steps up to the uniform mixture; each is scored by
    L̂ of its weights (scale-normalised as the policy's subsets are, see
    `task_scales`). The sharpest candidate within `SOFTENING_GAIN` of the
    best estimated gain (L̂(∅) − min L̂) wins, so a softer mixture is taken
    only for a real predicted gain, not for noise-sized differences. Scores
    rank tasks one at a time; the estimate sees them together, so two
    complementary tasks keep a blend where the sharpest mixture would go all
    in on the one with the better score (bench/outcome.py's complementary
    suite).

    A policy that `searches_subsets` (``subset_search``) puts one candidate
    first: the equal mixture of the tasks `backward_elimination` keeps
    (tolerance `ELIMINATION_TOLERANCE`), starting from the
    `ELIMINATION_TASKS` best-scoring ones, if it keeps at least two. It is
    taken whenever its L̂ is within `SOFTENING_GAIN` of the best; it reaches
    mixtures no temperature of the scores can (two tasks that help only
    together), and it trusts the estimate more: where L̂ is wrong about a
    task, it follows the error further (the README's "How good are the
    estimates?"). When elimination keeps one task, its one-hot mixture is
    not a candidate: the sharpest the scores' evidence allows is already
    one, and early anchors, where the estimate sees only the short-run
    effect, are where a lone task was most often wrong (bench/outcome.py,
    6 seeds: near-misses 0.679 with it, 0.602 without; complementary
    0.892 both ways; sizes-and-noise 1.763 and 1.705). The same goes for one
    task kept with thin ones (evidence thin, see the module docstring):
    capped at 1/n, the thin tasks hand the rest of their share to the one
    task, and the candidate is that task alone by another name; in
    bench/outcome.py's sizes-and-noise suite it was {add4-small,
    add3-noise50} capped to 0.17 / 0.83, taken at one redraw of the rows and
    not at the next (stability at seed 0's second anchor 0.431 with it,
    0.084 without; gradmix over seeds 0-5 1.672 and 1.653, the other two
    suites unchanged). Elimination itself estimates each set's equal mixture
    as it would be published, thin tasks capped: uncapped, it rated
    {add4-small, add3-noise50} at 0.5 each, and kept it at three redraws of
    the rows at seed 3's second anchor and {add2, add3-noise50} at the
    fourth, whose equal mixture was taken (stability 0.488; capped, 0; seeds
    0-5 of sizes-and-noise otherwise unchanged; gradmix over seeds 0-5
    1.672 uncapped and 1.676 capped, over 6-11 1.720 and 1.726, one seed of
    each set worse by 0.02-0.04 and the rest the same; the other two suites
    have no thin tasks). Nor is a set that leaves out the task the scores rate
    best: the candidate is there for tasks that help only together, which
    the scores cannot see, and a set without their best task is instead a
    disagreement between the two estimates (the scores' random subsets dose
    each task at a fraction of the horizon, L̂ of a set at a half or a
    third), where elimination follows L̂'s error furthest. At the second
    anchor of bench/outcome.py's near-misses suite, seed 4, elimination
    kept {add2, add4} at three redraws of the rows and {add4, reverse} at
    the fourth while the scores put add3-shuffled and add3-off-by-one
    first by 0.24 (their standard errors 0.007-0.02): stability 0.496 with those
    candidates, 0 without; the gradmix runs of seeds 0-11 on all three
    suites came out the same to the digit (no anchor of theirs kept such a
    set). Nor is the mixture of
    a set that some task of the start alone beats on L̂: elimination removes
    a task while L̂ stays within the tolerance of the best it has seen, so it
    can drift to a set worse than the best single task (a `make demo` run's
    last anchor kept add4 with the noisy task, L̂ 0.201, against 0.191 for
    add3-extra alone, and gave them 0.35 each); bench/outcome.py's three
    suites over 6 seeds came out the same with and without this check.
    """
    floor = policy.floor_for(len(scores))

    def at(factor: float) -> dict[str, float]:
        mixture = scores_to_mixture(scores, temperature=policy.temperature * factor,
                                    floor=floor, error=error, errors=errors)
        return cap_weights(mixture, thin, 1.0 / active)

    if len(scores) < 2 or not POLICIES[policy.policy].estimates_subsets:
        return at(1.0), 0
    candidates = [at(factor) for factor in SOFTER]
    candidates.append(dict.fromkeys(scores, 1.0 / len(scores)))
    columns = estimator.tasks
    scales = task_scales(estimator)
    searched = 0
    if POLICIES[policy.policy].searches_subsets:
        def count(subsets: int) -> None:
            nonlocal searched
            searched += subsets

        start = set(sorted(scores, key=lambda t: scores[t])[:ELIMINATION_TASKS])

        def capped(kept: list[int]) -> np.ndarray:  # the equal mixture as published
            names = [columns[c] for c in kept]
            weights = cap_weights(dict.fromkeys(names, 1.0 / len(names)), thin, 1.0 / active)
            return np.array([weights[t] for t in names])

        kept = set(backward_elimination(
            estimator, [t for t in scores if t in start], scales=scales,
            regularization=policy.regularization, tolerance=ELIMINATION_TOLERANCE,
            on_estimate=count, weigh=capped if thin else None))
        # One task alone (or one and thin ones, which the cap turns into the one task
        # with the cap's excess): the scores' own candidates reach it, hedged. A set
        # without the task the scores rate best: the two estimates disagree, not a
        # set that helps only together. A set that some task alone beats: elimination
        # drifted (each removal within the tolerance).
        leader = min(scores, key=lambda t: scores[t])
        mixture = dict(zip(kept, capped([columns.index(t) for t in kept]).tolist(),
                           strict=True))
        if len(kept - set(thin)) >= 2 and leader in kept and _beats_every_single(
                estimator, mixture, start, scales, policy.regularization, count):
            equal = np.array([1.0 if t in kept else 0.0 for t in scores]) / len(kept)
            candidates.insert(0, cap_weights(
                dict(zip(scores, apply_floor(equal, floor).tolist(), strict=True)), thin,
                1.0 / active))
    alpha = np.array([[mixture.get(t, 0.0) for t in columns] for mixture in candidates])
    alpha *= scales
    subsets = alpha > 0
    losses = estimator.estimate(subsets, alpha, regularization=policy.regularization)
    best = float(losses.min())
    enough = best + SOFTENING_GAIN * max(0.0, estimator.anchor_loss() - best)
    return candidates[int(np.flatnonzero(losses <= enough)[0])], searched + len(candidates)


def _beats_every_single(estimator: SubsetEstimator, mixture: Mapping[str, float],
                        tasks: Collection[str], scales: np.ndarray, regularization: float,
                        count: Callable[[int], None]) -> bool:
    """Whether L̂ rates `mixture` (of the kept tasks) better than each of `tasks` alone
    (scale-normalised as every candidate is; `count` is told the subsets estimated)."""
    columns = estimator.tasks
    rows = [{t: 1.0} for t in tasks] + [mixture]
    alpha = np.array([[scales[i] * r.get(t, 0.0) for i, t in enumerate(columns)]
                      for r in rows])
    count(len(rows))
    losses = estimator.estimate(alpha > 0, alpha, regularization=regularization)
    return bool(losses[-1] < losses[:-1].min())


def kept_composition(previous: Mapping[str, float], new: Composition,
                     estimator: SubsetEstimator, regularization: float) -> Composition:
    """`new` with the `previous` weights kept (an implausible estimate held back).

    Tasks absent from `previous` get no weight. The estimated loss is that of the
    kept weights at this anchor, so that the next anchor's calibration compares
    what happened with what was predicted for the mixture actually in force.
    """
    weights = {t: previous.get(t, 0.0) for t in new.weights}
    total = sum(weights.values())
    weights = {t: w / total for t, w in weights.items()} if total > 0 else dict(new.weights)
    active = [t for t in new.weights if new.states[t] == ACTIVE and weights[t] > 0]
    mass = sum(weights[t] for t in active)
    estimated = _estimated_loss(estimator, active, {t: weights[t] / mass for t in active},
                                regularization) if mass > 0 else new.anchor_loss
    return dataclasses.replace(new, weights=weights, estimated_loss=estimated)


def _estimated_loss(estimator: SubsetEstimator, active: Sequence[str],
                    weights: Mapping[str, float], regularization: float) -> float:
    """L̂ of the mixture's weights over the active tasks, at the policy's λ."""
    columns = estimator.tasks
    subset = np.array([[t in weights for t in columns]], dtype=bool)
    alpha = np.array([weights.get(t, 0.0) for t in columns], dtype=np.float64)
    return float(estimator.estimate(subset, alpha, regularization=regularization)[0])


def mixture_changed(last: MixtureRecord | None, anchor: str, new: Composition,
                    tolerance: float) -> bool:
    """Whether `new` deserves a new version after `last`.

    It does when the task set, a task's state, the stale tasks or the anchor
    changed, or when some weight moved by more than `tolerance`.
    """
    if last is None:
        return bool(new.weights)
    if last.anchor != anchor or set(last.weights) != set(new.weights):
        return True
    if last.states != new.states or set(last.stale) != set(new.stale):
        return True
    return any(abs(last.weights[t] - w) > tolerance for t, w in new.weights.items())
