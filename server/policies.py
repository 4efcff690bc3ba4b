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

Small n: with one task (or a task that the drawn subsets never leave out, or
never include) ``ensemble`` and ``surrogate`` fall back to the singleton
effect L̂({t}) - L̂(∅), and ``simplex`` gives 0 for a single task.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from itertools import combinations
from typing import ClassVar

import gradmix.vocabulary as vocabulary
import numpy as np
from gradmix.server.errors import InvalidArgumentError
from gradmix.server.estimator import SubsetEstimator
from gradmix.server.mixture import scores_to_mixture, standard_error
from gradmix.server.simplex import optimize_simplex
from gradmix.server.task_statistics import RowCache

#: Ridge penalty of the surrogate fit, relative to the mean diagonal of XᵀX
#: (centred design): small enough not to bias a well-posed fit, large enough
#: to keep it defined when subsets are fewer than tasks.
SURROGATE_RIDGE = 1e-3
#: Fewest subsets a bootstrap replicate of ``ensemble``/``surrogate`` draws.
BOOTSTRAP_MIN_SUBSETS = 64

# What a job's settings may be: inside these, every job can always be turned
# into a mixture, however many tasks it grows to (bench/outcome.py and the
# policy tests exercise the ends). λ's range is also where calibration keeps
# the λ it derives (`gradmix.server.calibration.REGULARIZATION_MIN/MAX`).
REGULARIZATION_RANGE = (1e-8, 1e8)
TEMPERATURE_RANGE = (1e-3, 1e3)
PRIOR_WEIGHT_MAX = 1e3
SUBSET_COUNT_MAX = 20_000
#: The floors of n tasks together take at most this share of the weight: the
#: floor in force is min(ε, FLOOR_SHARE / n), so it scales down as tasks grow.
FLOOR_SHARE = 0.5
#: The largest ε a job may ask for: more could not hold even for two tasks.
FLOOR_MAX = FLOOR_SHARE / 2


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """How scores and the mixture are computed for a job.

    Attributes:
        policy: One of `POLICIES`.
        regularization: λ of the estimator's ridge on w. In units of the
            per-example Hessian σ(f)σ(-f)‖g‖²: λ = 1 keeps ‖w‖ moderate when
            sketch rows have norm ≈ 1; calibrate against a few fine-tunes.
        temperature: τ of `scores_to_mixture`, in standard errors of the
            scores (their sampling noise, bootstrapped over the sketched
            rows): beyond the tie margin (`TIE_MARGIN` standard errors of
            the best), each standard error costs a task a factor e^(1/τ).
        floor: Least weight of any task, ε ≤ `FLOOR_MAX`; with n tasks the
            floor in force is `floor_for(n)` = min(ε, `FLOOR_SHARE`/n), so a
            job's floor never rules out a mixture however many tasks it has.
        subset_count: Subsets drawn by ``ensemble`` / ``surrogate`` (500:
            each task is in ≈ 250 of them at q = 0.5, enough for stable means).
        subset_fraction: q in (0, 1), subset size ⌈q·n⌉.
        prior_weight: Weight of a registered task that has no sketch at the
            current anchor yet, relative to the uniform share 1/n (the server
            applies it).
        seed: Seed of the subset draws (and of the bootstrap).
        smoothing: β in [0, 1): a new anchor's mixture is (1-β)·new +
            β·(the mixture in force before that anchor), so one anchor's
            sampling noise cannot swing the mixture on its own.
        bootstrap: Replicates of the bootstrap over sketched rows that gives
            the scores' standard error (≥ 2).
    """

    policy: str = "ensemble"
    regularization: float = 1.0
    temperature: float = 0.5
    floor: float = 0.001
    subset_count: int = 500
    subset_fraction: float = 0.5
    prior_weight: float = 1.0
    seed: int = 0
    smoothing: float = 0.3
    bootstrap: int = 8

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InvalidArgumentError(
                f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}"
            )
        # field: (in range, the range in words); NaN fails every comparison.
        checks = {
            "regularization": (_within(self.regularization, *REGULARIZATION_RANGE),
                               f"in [{REGULARIZATION_RANGE[0]:g}, {REGULARIZATION_RANGE[1]:g}]"),
            "temperature": (_within(self.temperature, *TEMPERATURE_RANGE),
                            f"in [{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}]"),
            "floor": (_within(self.floor, 0.0, FLOOR_MAX),
                      f"in [0, {FLOOR_MAX:g}] (the floors of n tasks take at most "
                      f"{FLOOR_SHARE:g} of the weight; ε scales down as tasks grow)"),
            "subset_count": (isinstance(self.subset_count, int)
                             and 1 <= self.subset_count <= SUBSET_COUNT_MAX,
                             f"an integer in [1, {SUBSET_COUNT_MAX}]"),
            "subset_fraction": (0 < self.subset_fraction < 1, "in (0, 1)"),
            "prior_weight": (_within(self.prior_weight, 0.0, PRIOR_WEIGHT_MAX),
                             f"in [0, {PRIOR_WEIGHT_MAX:g}]"),
            "seed": (isinstance(self.seed, int) and 0 <= self.seed < 2**64,
                     "an integer in [0, 2^64)"),
            "smoothing": (0 <= self.smoothing < 1, "in [0, 1)"),
            "bootstrap": (isinstance(self.bootstrap, int) and 2 <= self.bootstrap <= 1000,
                          "an integer in [2, 1000]"),
        }
        for field, (ok, allowed) in checks.items():
            if not ok:
                raise InvalidArgumentError(
                    f"invalid {field}: {getattr(self, field)!r}; must be {allowed}")

    def floor_for(self, tasks: int) -> float:
        """The floor in force for a mixture of `tasks` tasks: min(ε, FLOOR_SHARE / n)."""
        return min(self.floor, FLOOR_SHARE / tasks) if tasks else self.floor


def _within(value: float, low: float, high: float) -> bool:
    return isinstance(value, int | float) and low <= value <= high


class Policy(ABC):
    """A way of scoring tasks; implementations are registered in `POLICIES`."""

    name: ClassVar[str]
    #: Whether the policy reads the target (uniform does not).
    needs_target: ClassVar[bool] = True

    @abstractmethod
    def scores(self, estimator: SubsetEstimator, config: PolicyConfig) -> np.ndarray:
        """Scores (n_tasks,) in `estimator.tasks` order, lower = more helpful."""


class UniformPolicy(Policy):
    name = "uniform"
    needs_target = False

    def scores(self, estimator: SubsetEstimator, config: PolicyConfig) -> np.ndarray:
        return np.zeros(len(estimator.tasks))


class GradientSimilarityPolicy(Policy):
    name = "gradient_similarity"

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


class SurrogatePolicy(Policy):
    name = "surrogate"

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

    ``ensemble``/``surrogate``: the subsets `draw_subsets` gives (and n
    singletons when a task is in all or none of them); ``simplex``: 0 (it
    solves over the simplex, not subsets); the others: 0.
    """
    if config.policy not in (vocabulary.Policy.ENSEMBLE, vocabulary.Policy.SURROGATE) or n == 0:
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
    "PolicyConfig",
    "SimplexPolicy",
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
