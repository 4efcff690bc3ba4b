"""Selection policies: per-task scores from the subset-loss estimator.

Every policy maps a `SubsetEstimator` to one score per task, lower = more
helpful to the target; `gradmix.server.mixture.scores_to_mixture` turns scores
into a mixture. Policies (DESIGN.md §4):

* ``ensemble`` — the paper's random ensemble: `subset_count` random subsets
  of size k = ⌈q·n⌉ (q = `subset_fraction`, k clipped to [1, n-1]);
  score_t = mean L̂(S∋t) - mean L̂(S∌t). When C(n, k) ≤ `subset_count` every
  subset of size k is used instead of a random draw.

  Subsets are estimated *scale-normalised*: inside each subset the task
  weights are α_t ∝ 1/‖b_t‖ (b_t the task's mean loss gradient in the
  sketch), not uniform. The trainers gradmix serves take AdamW steps with
  gradient clipping, whose size does not grow with a task's gradient; with
  uniform α a high-loss task that is similar to the target but wrong (large
  ‖b_t‖, partly aligned) looks far more helpful than a clean one, which is
  what bench/outcome.py measured before this weighting.
* ``surrogate`` — ridge fit L̂(S) ≈ β₀ + Σ β_t·1[t∈S] over the same
  (scale-normalised) subsets;
  score_t = β_t (see `SURROGATE_RIDGE`). Subsets all of one size identify
  the β_t only up to a common shift; the ridge picks the smallest ‖β‖, which
  centres them near zero. Rankings and mixtures do not depend on the shift;
  use ``ensemble`` scores for an absolute threshold such as 0.
* ``simplex`` — minimises L̂(α) over the probability simplex directly by
  exponentiated gradient, ∂L̂/∂α by implicit differentiation through w(α);
  score_t = -log(n·α_t) (0 for a uniform optimum; α clipped at 1e-12).
* ``uniform`` — all scores 0 (the uniform mixture).
* ``gradient_similarity`` — LESS-style baseline: score_t = -cos(b_t, b_target)
  with b the mean loss gradient of the task's and the target's rows.
* ``subset_search`` (the default) — ``ensemble``'s scores, and a mixture
  searched among subsets too: `gradmix.server.compose` adds the equal
  mixture of the subset that backward elimination on L̂ keeps
  (`gradmix.server.selection.backward_elimination`) as the first candidate
  when it keeps two tasks or more.
  Per-task scores cannot express tasks that help only together; the search
  can (bench/outcome.py's complementary suite; the README's "How good are
  the estimates?" has what it gains and costs there and elsewhere).

Small n: with one task (or a task that the drawn subsets never leave out, or
never include) ``ensemble`` and ``surrogate`` fall back to the singleton
effect L̂({t}) - L̂(∅), and ``simplex`` gives 0 for a single task.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import replace
from itertools import combinations
from typing import ClassVar

import numpy as np
from gradmix.server.estimator import SubsetEstimator
from gradmix.server.mixture import scores_to_mixture, standard_error
from gradmix.server.simplex import optimize_simplex
from gradmix.server.task_statistics import RowCache
from gradmix.vocabulary.policy_settings import PolicyConfig

#: Ridge penalty of the surrogate fit, relative to the mean diagonal of XᵀX
#: (centred design): small enough not to bias a well-posed fit, large enough
#: to keep it defined when subsets are fewer than tasks.
SURROGATE_RIDGE = 1e-3
#: Fewest subsets a bootstrap replicate of ``ensemble``/``surrogate`` draws.
BOOTSTRAP_MIN_SUBSETS = 64


class Policy(ABC):
    """A way of scoring tasks; implementations are registered in `POLICIES`."""

    name: ClassVar[str]
    #: Whether the policy reads the target (uniform does not).
    needs_target: ClassVar[bool] = True
    #: Whether its scores come from subset-loss estimates (the baselines' do not);
    #: such a policy's mixture is chosen by its estimate (`gradmix.server.compose`).
    estimates_subsets: ClassVar[bool] = True
    #: Whether that choice also considers the subset backward elimination keeps.
    searches_subsets: ClassVar[bool] = False
    #: Whether its scores come from the subsets `draw_subsets` gives (`subsets_scored`).
    draws_subsets: ClassVar[bool] = False

    @abstractmethod
    def scores(self, estimator: SubsetEstimator, config: PolicyConfig) -> np.ndarray:
        """Scores (n_tasks,) in `estimator.tasks` order, lower = more helpful."""


class UniformPolicy(Policy):
    name = "uniform"
    needs_target = False
    estimates_subsets = False

    def scores(self, estimator: SubsetEstimator, config: PolicyConfig) -> np.ndarray:
        return np.zeros(len(estimator.tasks))


class GradientSimilarityPolicy(Policy):
    name = "gradient_similarity"
    estimates_subsets = False

    def scores(self, estimator: SubsetEstimator, config: PolicyConfig) -> np.ndarray:
        target = estimator.statistics(None).loss_gradient()
        result = np.zeros(len(estimator.tasks))
        for j, task in enumerate(estimator.tasks):
            b = estimator.statistics(task).loss_gradient()
            norms = float(np.linalg.norm(b) * np.linalg.norm(target))
            result[j] = -float(b @ target) / norms if norms > 0 else 0.0
        return result


class EnsemblePolicy(Policy):
    name = "ensemble"
    draws_subsets = True

    def scores(self, estimator: SubsetEstimator, config: PolicyConfig) -> np.ndarray:
        subsets = draw_subsets(len(estimator.tasks), config)
        losses = estimator.estimate(subsets, task_scales(estimator),
                                    regularization=config.regularization)
        counts = subsets.sum(axis=0)
        varied = (counts > 0) & (counts < subsets.shape[0])
        result = np.empty(subsets.shape[1])
        if not varied.all():
            result[~varied] = singleton_effects(estimator, config)[~varied]
        inside = (losses @ subsets)[varied] / counts[varied]
        outside = (losses @ ~subsets)[varied] / (subsets.shape[0] - counts[varied])
        result[varied] = inside - outside
        return result


class SubsetSearchPolicy(EnsemblePolicy):
    name = "subset_search"
    searches_subsets = True


class SurrogatePolicy(Policy):
    name = "surrogate"
    draws_subsets = True

    def scores(self, estimator: SubsetEstimator, config: PolicyConfig) -> np.ndarray:
        subsets = draw_subsets(len(estimator.tasks), config)
        losses = estimator.estimate(subsets, task_scales(estimator),
                                    regularization=config.regularization)
        varied = subsets.any(axis=0) & ~subsets.all(axis=0)
        result = np.empty(subsets.shape[1])
        if not varied.all():
            result[~varied] = singleton_effects(estimator, config)[~varied]
        if varied.any():
            design = subsets[:, varied].astype(np.float64)
            design -= design.mean(axis=0)
            gram = design.T @ design
            penalty = SURROGATE_RIDGE * float(np.trace(gram)) / gram.shape[0]
            gram[np.diag_indices_from(gram)] += penalty
            result[varied] = np.linalg.solve(gram, design.T @ (losses - losses.mean()))
        return result


class SimplexPolicy(Policy):
    name = "simplex"

    def scores(self, estimator: SubsetEstimator, config: PolicyConfig) -> np.ndarray:
        n = len(estimator.tasks)
        if n <= 1:
            return np.zeros(n)
        alpha = optimize_simplex(estimator, config.regularization)
        return -np.log(n * np.clip(alpha, 1e-12, None))


POLICIES: dict[str, Policy] = {
    policy.name: policy
    for policy in (
        EnsemblePolicy(),
        SurrogatePolicy(),
        SimplexPolicy(),
        UniformPolicy(),
        GradientSimilarityPolicy(),
        SubsetSearchPolicy(),
    )
}


def compute_scores(estimator: SubsetEstimator, config: PolicyConfig) -> dict[str, float]:
    """Per-task scores under `config.policy`, lower = more helpful.

    `config.regularization` is the λ used (not the estimator's own default).
    Raises PreconditionError when the policy needs the target and it has no
    rows yet. No tasks gives {}.
    """
    policy = POLICIES[config.policy]
    if not estimator.tasks:
        return {}
    if policy.needs_target:
        estimator.anchor_loss()  # raises PreconditionError without target rows
    values = policy.scores(estimator, config)
    return {task: float(v) for task, v in zip(estimator.tasks, values, strict=True)}


def compute_mixture(
    estimator: SubsetEstimator, config: PolicyConfig
) -> tuple[dict[str, float], dict[str, float]]:
    """(scores, mixture weights) of the estimator's tasks under `config`.

    The temperature is scaled by the scores' bootstrap standard error
    (`score_error`).
    """
    scores = compute_scores(estimator, config)
    weights = scores_to_mixture(scores, temperature=config.temperature,
                                floor=config.floor_for(len(scores)),
                                error=score_error(estimator, config))
    return scores, weights


def bootstrap_scores(estimator: SubsetEstimator, config: PolicyConfig) -> np.ndarray:
    """The policy's scores on `config.bootstrap` resamplings of the sketched rows.

    Every source's rows (target and tasks) are resampled with replacement
    (seeded by `config.seed`) and scored again: (B, n_tasks) in
    `estimator.tasks` order. (0, n) when the policy does not read the
    sketches or there are fewer than two tasks (nothing to compare).

    A replicate draws a quarter of `subset_count` subsets (at least
    `BOOTSTRAP_MIN_SUBSETS`), the same ones in every replicate: the
    replicates then differ by the rows alone, and the bootstrap costs
    B/4 times one scoring instead of B times.
    """
    policy = POLICIES[config.policy]
    n = len(estimator.tasks)
    if not policy.needs_target or n < 2:
        return np.zeros((0, n))
    rng = np.random.default_rng(config.seed)
    lighter = bootstrap_config(config)
    cache = estimator.row_cache()  # rows read back once for every replicate (within its bound)
    return np.array([policy.scores(resampled(estimator, rng, cache), lighter)
                     for _ in range(config.bootstrap)])


def bootstrap_config(config: PolicyConfig) -> PolicyConfig:
    """The settings a bootstrap replicate is scored with (a quarter of the subsets)."""
    return replace(config, subset_count=max(BOOTSTRAP_MIN_SUBSETS, config.subset_count // 4))


def subsets_scored(n: int, config: PolicyConfig) -> int:
    """How many subset losses one scoring of `n` tasks under `config` estimates.

    A policy that `draws_subsets` (``ensemble``, ``surrogate``,
    ``subset_search``): the subsets `draw_subsets` gives (and n singletons
    when a task is in all or none of them); ``simplex``: 0 (it solves over
    the simplex, not subsets); the others: 0.
    """
    if not POLICIES[config.policy].draws_subsets or n == 0:
        return 0
    subsets = draw_subsets(n, config)
    counts = subsets.sum(axis=0)
    fallback = n if ((counts == 0) | (counts == subsets.shape[0])).any() else 0
    return subsets.shape[0] + fallback


def score_error(estimator: SubsetEstimator, config: PolicyConfig) -> float:
    """σ, the scores' standard error from `bootstrap_scores` (0 without replicates)."""
    return standard_error(bootstrap_scores(estimator, config))


def resampled(estimator: SubsetEstimator, rng: np.random.Generator,
              cache: RowCache | None = None) -> SubsetEstimator:
    """A copy of `estimator` whose every source's rows are drawn with replacement.

    Rows the estimator does not keep are read back (through `cache` if given).
    """
    replica = SubsetEstimator(estimator.dim, regularization=estimator.regularization)
    cache = cache or RowCache()
    for name in (None, *estimator.tasks):
        stats = estimator.statistics(name)
        rows = rng.integers(0, stats.rows, stats.rows)
        grads, values = cache.rows(stats)
        grads, values = grads[rows], values[rows]
        if name is None:
            replica.add_target_rows(grads, values)
        else:
            replica.add_task_rows(name, grads, values)
    return replica


def task_scales(estimator: SubsetEstimator) -> np.ndarray:
    """α_t ∝ 1/‖b_t‖ per task (1 for a task whose mean loss gradient is 0)."""
    norms = np.array([np.linalg.norm(estimator.statistics(t).loss_gradient())
                      for t in estimator.tasks])
    return np.divide(1.0, norms, out=np.ones_like(norms), where=norms > 0)


def draw_subsets(n: int, config: PolicyConfig) -> np.ndarray:
    """Boolean (m, n) subsets of size ⌈q·n⌉ clipped to [1, max(n-1, 1)].

    All C(n, k) subsets when that is at most `subset_count`, else
    `subset_count` uniform random draws seeded by `config.seed`.
    """
    k = min(max(1, math.ceil(config.subset_fraction * n)), max(n - 1, 1))
    if math.comb(n, k) <= config.subset_count:
        members = np.array(list(combinations(range(n), k)), dtype=np.intp).reshape(-1, k)
    else:
        rng = np.random.default_rng(config.seed)
        members = rng.random((config.subset_count, n)).argsort(axis=1)[:, :k]
    subsets = np.zeros((members.shape[0], n), dtype=bool)
    np.put_along_axis(subsets, members, True, axis=1)
    return subsets


def singleton_effects(estimator: SubsetEstimator, config: PolicyConfig) -> np.ndarray:
    """L̂({t}) - L̂(∅) for every task (the small-n fallback score)."""
    n = len(estimator.tasks)
    losses = estimator.estimate(np.eye(n, dtype=bool), regularization=config.regularization)
    return losses - estimator.anchor_loss()


__all__ = [
    "POLICIES",
    "EnsemblePolicy",
    "GradientSimilarityPolicy",
    "Policy",
    "SimplexPolicy",
    "SubsetSearchPolicy",
    "SurrogatePolicy",
    "UniformPolicy",
    "bootstrap_config",
    "bootstrap_scores",
    "compute_mixture",
    "compute_scores",
    "draw_subsets",
    "resampled",
    "score_error",
    "singleton_effects",
    "subsets_scored",
    "task_scales",
]
