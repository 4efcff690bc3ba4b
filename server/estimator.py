"""Subset-loss estimator: GradEx's first-order approximation of fine-tuning.

Given sketches at one anchor — per example a value f (log-odds of the target
tokens) and a projected gradient g (DESIGN.md §4) — the fine-tuning loss on the
target of a subset S of tasks with task weights α is estimated by a logistic
regression whose features are the gradients:

    w_S  = argmin_w  Σ_{t∈S} α_t · mean_{i∈t} softplus(-(f_i + g_iᵀw)) + (λ/2)‖w‖²
    L̂(S) = mean_{v∈target} softplus(-(f_v + g_vᵀ w_S))

with α uniform over S by default (and always renormalised to sum to one over
S). L̂(∅) = mean softplus(-f_v) is the anchor's own target loss.

Two modes:

* ``fast``: one Newton step from w = 0, computed from per-task statistics
  b_t = mean -σ(-f) g and H_t = mean c g gᵀ only (c = σ(-f)·max(σ(f), σ(-f)):
  the Hessian's σ(f)σ(-f) on the right side of a row's log-odds, σ(-f)² on the
  wrong side, which keeps a confidently wrong row's step in its log-odds ≤ 2;
  `gradmix.server.task_statistics`), batched over subsets
  (see `gradmix.server.batched_solve`). Cost per subset O(|S|·d² + d³),
  independent of the number of rows.
* ``exact``: damped Newton on the rows of the subset, warm-started from the
  fast solution, to a gradient norm of `EXACT_GRADIENT_TOLERANCE` relative to
  the gradient at w = 0.
* ``linearized``: the fast mode's w expanded to first order in the weights
  around the subsets' mean weighting (`FastSolver.solve_linearized`): one
  factorisation for all subsets, O(n·d² + m·n·d). An approximation of the
  fast mode for thousands of subsets over thousands of tasks, where the fast
  mode's O(m·n·d²) systems dominate; `bench/estimator.py` reports its rank
  agreement with the fast mode.

The fast mode itself switches to the linearized solve when its systems would
cost more than `LINEARIZE_ABOVE_FLOPS` (2·m·n·(packed d²); e.g. 1000 subsets
of 1000 tasks at d = 512, or the server's default 500 subsets of 100 tasks at
d = 256) and there are at least `LINEARIZE_MIN_SUBSETS` of them, and checks
it: `LINEARIZE_CHECK_SUBSETS` of the subsets are solved exactly too, and
unless the largest difference there is within `LINEARIZE_TOLERANCE` of the
spread of the losses (what ranking subsets needs), every subset is solved
exactly after all. Policies that draw
thousands of subsets over thousands of tasks get this path; queries of a few
subsets never do.

Task rows are kept in memory unless the estimator is given a `TaskRows`
reader (the server's, which reads them back from the store): then a task
costs its statistics only, and the exact mode and the bootstrap
(`gradmix.server.policies.resampled`) read its rows back when they run. One
exact call, or the calls within `rows_cached`, keep what they read in a
`RowCache` of at most `ROW_CACHE_BYTES` (`gradmix.server.task_statistics`;
rows are read again past it) and drop it when they return. The target's
rows are always kept: every estimate reads them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import scipy.linalg
from gradmix.server.batched_solve import FastSolver, single_threaded_blas
from gradmix.server.errors import (
    ConvergenceError,
    InvalidArgumentError,
    NonFiniteError,
    PreconditionError,
    UnknownTaskError,
)
from gradmix.server.task_statistics import (
    HessianBank,
    RowCache,
    TaskStatistics,
    softplus,
)
from gradmix.vocabulary import EstimateMode, choices
from scipy.special import expit

__all__ = ["MODES", "SubsetEstimator", "TaskStatistics", "softplus", "target_losses"]

#: An in-process approximation of the fast mode (first order around the subsets' mean
#: weighting): benches and policies may ask for it; it is not an API mode.
LINEARIZED = "linearized"
MODES = (*choices(EstimateMode), LINEARIZED)
#: Exact mode stops when ‖∇J(w)‖ ≤ this × max(1, ‖∇J(0)‖).
EXACT_GRADIENT_TOLERANCE = 1e-11
EXACT_MAX_ITERATIONS = 100
#: Reads back the rows added for a task: (grads (rows, d), values (rows,)).
TaskRows = Callable[[str], tuple[np.ndarray, np.ndarray]]
#: The fast mode solves m subsets' systems exactly (`SYSTEMS`) while that costs at
#: most this many flops (2·m·n·(packed d²): 1000 subsets of 1000 tasks at d = 512
#: are 295 GFLOP, ~5 s of CPU on the 2-core machine; 500 subsets of 100 tasks at
#: d = 256, the server's default policy, 4.1 GFLOP); above it, the linearized
#: solve, checked on a sample (`SubsetEstimator._linearized_checked`). The
#: README's Scale section has the times and rank agreements measured.
LINEARIZE_ABOVE_FLOPS = 2e9
#: Subsets of a linearized call also solved exactly, to check it.
LINEARIZE_CHECK_SUBSETS = 32
#: Calls with fewer subsets solve their systems (the check alone would be a
#: large share of them): the check is at most 1/8 of the systems' cost.
LINEARIZE_MIN_SUBSETS = 8 * LINEARIZE_CHECK_SUBSETS
#: The check's bound: the sample's largest |L̂ error| over the std of the L̂s.
LINEARIZE_TOLERANCE = 0.05
#: `SubsetEstimator.last_fast_path` values.
SYSTEMS = "systems"
#: Fast-mode solves kept for reuse, one per (λ, number of subsets): the
#: server's policies, its estimated-loss check, queries and each round of
#: ``subset_search``'s backward elimination have their own (a commit's
#: elimination then re-solves only the subsets holding the task that changed:
#: 0.08 s per commit at 100 tasks, d = 256, against 0.22 s with 4 kept).
SOLVES_KEPT = 64


class SubsetEstimator:
    """Estimates the target loss L̂(S) of fine-tuning on any subset of tasks.

    Rows are added incrementally (`add_target_rows`, `add_task_rows`); the
    per-task statistics are updated in O(rows·d²) per call and estimates always
    reflect every row added so far. Not thread-safe: callers serialise adds
    and estimates on one instance (estimates may use a few worker threads
    internally).

    Errors: DimensionMismatchError, EmptyTaskError, NonFiniteError (rows);
    UnknownTaskError; PreconditionError (no target rows yet);
    InvalidArgumentError (bad subsets, weights, mode or λ); ConvergenceError
    (exact mode, not expected for λ > 0).

    Attributes:
        dim: The sketch dimension d every row must have.
        regularization: λ, the ridge weight on w (default for `estimate`).
    """

    def __init__(self, dim: int, *, regularization: float = 1.0,
                 rows: TaskRows | None = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim <= 0:
            raise InvalidArgumentError(f"dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.regularization = _checked_regularization(regularization)
        #: None: task rows are kept in memory; else how they are read back.
        self.rows = rows
        self._tasks: dict[str, TaskStatistics] = {}
        self._bank = HessianBank(self.dim)
        self._target: TaskStatistics | None = None
        self._solver: FastSolver | None = None
        self._changed: set[str] = set()  # tasks with rows the solver has not reread
        self._versions: list[int] = []  # per task (index = bank slot): adds so far
        self._solved: dict[tuple[float, int], _Solved] = {}  # (λ, m) → the last solve
        self._cache: RowCache | None = None  # shared by the calls within `rows_cached`
        #: The fast mode linearizes above this many flops of systems (`LINEARIZE_ABOVE_FLOPS`;
        #: math.inf: never).
        self.linearize_above_flops = LINEARIZE_ABOVE_FLOPS
        #: How the last fast-mode call solved: `SYSTEMS` or `LINEARIZED`.
        self.last_fast_path = SYSTEMS
        #: Its check's largest error over the losses' spread (when it linearized).
        self.last_linearized_error = 0.0

    # ------------------------------------------------------------------ rows
    def add_target_rows(self, grads: np.ndarray, values: np.ndarray) -> None:
        """Adds sketch rows of the target (validation) examples."""
        if self._target is None:
            stats = TaskStatistics(self.dim, name="target")
            stats.add(grads, values)  # validates before the target exists
            self._target = stats
        else:
            self._target.add(grads, values)

    def add_task_rows(self, task: str, grads: np.ndarray, values: np.ndarray) -> None:
        """Adds sketch rows of `task`, creating the task on its first rows."""
        if not isinstance(task, str) or not task:
            raise InvalidArgumentError(f"task must be a non-empty string, got {task!r}")
        stats = self._tasks.get(task)
        if stats is None:
            reader = None if self.rows is None else partial(self.rows, task)
            stats = TaskStatistics(self.dim, name=task, bank=self._bank, reader=reader)
            stats.add(grads, values)
            self._tasks[task] = stats
            self._versions.append(0)
            self._solver = None  # a new task: a new operand shape
            self._solved.clear()
        else:
            stats.add(grads, values)
            self._changed.add(task)
            assert stats.slot is not None
            self._versions[stats.slot] += 1

    # ------------------------------------------------------------- accessors
    @property
    def tasks(self) -> list[str]:
        """Task names in insertion order; subset-matrix columns follow it."""
        return list(self._tasks)

    @property
    def has_target(self) -> bool:
        """Whether any target rows have been added."""
        return self._target is not None

    @property
    def statistics_bytes(self) -> int:
        """Bytes of the tasks' Hessian sums (the bank's pages; the rest is O(n·d))."""
        return self._bank.nbytes

    def task_rows(self, task: str) -> int:
        """Number of rows added for `task` (UnknownTaskError if none)."""
        return self.statistics(task).rows

    def statistics(self, task: str | None) -> TaskStatistics:
        """The statistics of `task`, or of the target when `task` is None."""
        if task is None:
            return self._require_target()
        stats = self._tasks.get(task)
        if stats is None:
            raise UnknownTaskError(f"unknown task {task!r}; known: {sorted(self._tasks)}")
        return stats

    def anchor_loss(self) -> float:
        """L̂(∅): the mean target loss softplus(-f_v) at the anchor."""
        return self._require_target().loss()

    @contextlib.contextmanager
    def rows_cached(self) -> Iterator[None]:
        """Within it, every exact estimate and bootstrap shares one `RowCache`, so a
        query of many calls (one subset at a time, forward selection) reads each
        task's rows back once, not once per call; dropped on leaving."""
        outer = self._cache
        self._cache = outer or RowCache()
        try:
            yield
        finally:
            self._cache = outer

    def row_cache(self) -> RowCache:
        """The `RowCache` of the enclosing `rows_cached`, else a fresh one."""
        return self._cache or RowCache()

    # ------------------------------------------------------------ estimation
    def discard_solves(self) -> None:
        """Forgets the fast-mode solves kept for reuse (the next estimate solves every subset)."""
        self._solved.clear()

    def prepare(self, regularization: float | None = None) -> None:
        """Builds the fast-mode caches now instead of on the next `estimate`."""
        lam = self.regularization if regularization is None else _checked_regularization(
            regularization
        )
        self._fast_solver().prepare(lam)
        if self._target is not None:
            self._target.grads(self._fast_solver().dtype_for(lam))

    def estimate(
        self,
        subsets: np.ndarray,
        weights: np.ndarray | None = None,
        *,
        mode: str = "fast",
        regularization: float | None = None,
    ) -> np.ndarray:
        """Estimates L̂(S) for each row of a subset matrix.

        Args:
            subsets: Boolean (m, n_tasks); column j is `tasks[j]`.
            weights: None (uniform over each subset), (n_tasks,) or
                (m, n_tasks) nonnegative task weights α. Weights outside a
                subset are ignored and the rest renormalised to sum to one;
                a subset whose weights are all zero counts as empty.
            mode: "fast", "exact" or "linearized".
            regularization: λ for this call; defaults to `self.regularization`.

        Returns:
            float64 (m,) estimated target losses; an empty subset gives L̂(∅).
        """
        if mode not in MODES:
            raise InvalidArgumentError(f"mode must be one of {MODES}, got {mode!r}")
        lam = self.regularization if regularization is None else _checked_regularization(
            regularization
        )
        target = self._require_target()
        alpha = self.subset_weights(subsets, weights)
        losses = np.full(alpha.shape[0], target.loss())
        active = np.flatnonzero(alpha.sum(axis=1) > 0)
        if active.size == 0:
            return losses
        if mode == "linearized":
            solver = self._fast_solver()
            linear_w = solver.solve_linearized(alpha[active], lam)
            losses[active] = target_losses(target, linear_w.astype(solver.dtype_for(lam)))
            return losses
        if (mode == "fast" and active.size >= LINEARIZE_MIN_SUBSETS
                and self._systems_flops(active.size) > self.linearize_above_flops):
            losses[active] = self._linearized_checked(alpha[active], lam)
            return losses
        self.last_fast_path = SYSTEMS
        fast_w = self._solve_fast(alpha[active], lam)
        if mode == "fast":
            losses[active] = target_losses(target, fast_w)
            return losses
        cache = self.row_cache()
        with single_threaded_blas():
            for row, w0 in zip(active, fast_w, strict=True):
                w = self._exact_solve(alpha[row], lam, w0.astype(np.float64), cache)
                losses[row] = target_losses(target, w[None, :])[0]
        return losses

    def estimate_named(
        self,
        subsets: Sequence[Sequence[str]],
        weights: Sequence[Sequence[float]] | None = None,
        *,
        mode: str = "fast",
    ) -> np.ndarray:
        """`estimate` for subsets given as task names (weights aligned with them)."""
        if weights is not None and len(weights) != len(subsets):
            raise InvalidArgumentError(
                f"weights has {len(weights)} entries for {len(subsets)} subsets"
            )
        index = {name: j for j, name in enumerate(self._tasks)}
        alpha = np.zeros((len(subsets), len(index)))
        for row, names in enumerate(subsets):
            if isinstance(names, str):
                raise InvalidArgumentError("each subset must be a sequence of task names")
            if len(set(names)) != len(names):
                raise InvalidArgumentError(f"subset {row} names a task twice: {list(names)}")
            given = [1.0] * len(names) if weights is None else list(weights[row])
            if len(given) != len(names):
                raise InvalidArgumentError(
                    f"subset {row}: {len(given)} weights for {len(names)} tasks"
                )
            for name, value in zip(names, given, strict=True):
                if name not in index:
                    raise UnknownTaskError(f"unknown task {name!r} in subset {row}")
                alpha[row, index[name]] = value
        return self.estimate(alpha > 0, alpha, mode=mode)

    def subset_weights(self, subsets: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Validates a subset matrix and weights; returns α (m, n_tasks), rows summing to 1 or 0."""
        n = len(self._tasks)
        mask = np.asarray(subsets)
        if mask.ndim != 2 or mask.shape[1] != n:
            raise InvalidArgumentError(f"subsets must have shape (m, {n}), got {mask.shape}")
        if mask.dtype != np.bool_:
            if not np.issubdtype(mask.dtype, np.number) or not np.isin(mask, (0, 1)).all():
                raise InvalidArgumentError("subsets must be boolean (or 0/1)")
            mask = mask.astype(bool)
        if weights is None:
            alpha = mask.astype(np.float64)
        else:
            given = np.asarray(weights, dtype=np.float64)
            if given.shape not in ((n,), mask.shape):
                raise InvalidArgumentError(
                    f"weights must have shape ({n},) or {mask.shape}, got {given.shape}"
                )
            if not np.isfinite(given).all():
                raise NonFiniteError("weights contain NaN or Inf")
            if (given < 0).any():
                raise InvalidArgumentError("weights must be nonnegative")
            alpha = np.where(mask, given, 0.0)
        total = alpha.sum(axis=1, keepdims=True)
        normalised: np.ndarray = np.divide(alpha, total, out=np.zeros_like(alpha), where=total > 0)
        return normalised

    # --------------------------------------------------------------- helpers
    def _require_target(self) -> TaskStatistics:
        if self._target is None:
            raise PreconditionError("no target rows yet: the target must be sketched first")
        return self._target

    def _fast_solver(self) -> FastSolver:
        """The solver over every task's current statistics.

        It reads the bank's sums in place: rows added to a known task refresh
        only that task's row count, gradient and trace; a new task rebuilds
        those small per-task arrays (O(n·d), no copy of the sums).
        """
        if self._solver is None:
            stats = list(self._tasks.values())
            gradients = np.array([s.loss_gradient() for s in stats])
            # Slots are handed out in task order (first valid rows first).
            assert [s.slot for s in stats] == list(range(len(stats)))
            self._solver = FastSolver(
                self._bank.layout,
                {dtype: self._bank.pages(dtype) for dtype in HessianBank.DTYPES},
                np.array([s.rows for s in stats]),
                gradients.reshape(len(stats), self.dim),
                np.array([self._bank.trace(j) for j in range(len(stats))]),
            )
        else:
            for task in self._changed:
                changed = self._tasks[task]
                assert changed.slot is not None
                self._solver.refresh(changed.slot, changed.rows, changed.loss_gradient(),
                                     self._bank.trace(changed.slot))
        self._changed.clear()
        return self._solver

    def _systems_flops(self, subsets: int) -> float:
        """Flops of the fast mode's batched systems for this many subsets: 2·m·n·(packed d²)."""
        return 2.0 * subsets * len(self._tasks) * self._bank.layout.size

    def _linearized_checked(self, alpha: np.ndarray, lam: float) -> np.ndarray:
        """The fast mode's losses by the linearized solve, checked on a sample.

        `LINEARIZE_CHECK_SUBSETS` rows spread over α are also solved as the
        fast mode solves them. If the largest difference there exceeds
        `LINEARIZE_TOLERANCE` times the spread (standard deviation) of the
        linearized losses, which is what ranking the subsets needs, every
        row is solved as the fast mode does; else the linearized losses are
        returned, with the sample's own fast-mode losses in place.
        `last_fast_path` and `last_linearized_error` say what happened.
        """
        target = self._require_target()
        solver = self._fast_solver()
        # Losses in the dtype the systems would be solved in, as the fast mode's are.
        linear = target_losses(target, solver.solve_linearized(alpha, lam)
                               .astype(solver.dtype_for(lam), copy=False))
        sample = np.unique(np.linspace(0, alpha.shape[0] - 1,
                                       LINEARIZE_CHECK_SUBSETS).astype(int))
        exact = target_losses(target, solver.solve(alpha[sample], lam))
        spread = float(linear.std())
        error = float(np.abs(linear[sample] - exact).max())
        self.last_linearized_error = error / spread if spread > 0 else math.inf
        if self.last_linearized_error > LINEARIZE_TOLERANCE:
            self.last_fast_path = SYSTEMS
            return target_losses(target, self._solve_fast(alpha, lam))
        self.last_fast_path = LINEARIZED
        linear[sample] = exact
        return linear

    def _solve_fast(self, alpha: np.ndarray, lam: float) -> np.ndarray:
        """The fast-mode w for each row of α, re-solving only what changed.

        A row equal to the same row of the last solve with this λ and this
        many rows, none of whose tasks has gained rows since, has the same
        system and right-hand side, so its w is reused: when one task's rows
        change, the subsets without it (half of them at q = 0.5) cost
        nothing. The target's rows do not enter w.
        """
        solver = self._fast_solver()
        versions = np.array(self._versions)
        key = (lam, alpha.shape[0])
        last = self._solved.get(key)
        reuse = np.zeros(alpha.shape[0], dtype=bool)
        if last is not None and last.w.dtype == solver.dtype_for(lam):
            changed = np.flatnonzero(versions != last.versions)
            reuse = (alpha == last.alpha).all(axis=1) & ~(alpha[:, changed] > 0).any(axis=1)
        if last is not None and reuse.all():
            return last.w
        w = np.empty((alpha.shape[0], self.dim), solver.dtype_for(lam))
        if last is not None:
            w[reuse] = last.w[reuse]
        w[~reuse] = solver.solve(alpha[~reuse], lam)
        self._solved.pop(key, None)
        self._solved[key] = _Solved(alpha=alpha.copy(), w=w, versions=versions)
        while len(self._solved) > SOLVES_KEPT:
            del self._solved[next(iter(self._solved))]
        return w

    def _exact_solve(self, alpha: np.ndarray, lam: float, w: np.ndarray,
                     cache: RowCache) -> np.ndarray:
        """Damped Newton on the rows of the subset (alpha > 0), from `w`."""
        stats = list(self._tasks.values())
        chosen = np.flatnonzero(alpha > 0)
        parts = [cache.rows(stats[j]) for j in chosen]
        grads = np.concatenate([g for g, _ in parts])
        values = np.concatenate([f for _, f in parts])
        del parts
        coef = np.concatenate([np.full(stats[j].rows, alpha[j] / stats[j].rows) for j in chosen])

        def objective(w: np.ndarray) -> float:
            return float(coef @ softplus(-(values + grads @ w)) + 0.5 * lam * (w @ w))

        def gradient(w: np.ndarray) -> np.ndarray:
            slope: np.ndarray = coef * expit(-(values + grads @ w))
            step: np.ndarray = -slope @ grads + lam * w
            return step

        initial = float(np.linalg.norm(gradient(np.zeros_like(w))))
        tolerance = EXACT_GRADIENT_TOLERANCE * max(1.0, initial)
        current = objective(w)
        for _ in range(EXACT_MAX_ITERATIONS):
            grad = gradient(w)
            if np.linalg.norm(grad) <= tolerance:
                return w
            margins = values + grads @ w
            curvature = coef * expit(margins) * expit(-margins)
            hessian = (grads.T * curvature) @ grads
            hessian[np.diag_indices_from(hessian)] += lam
            step = -scipy.linalg.cho_solve(scipy.linalg.cho_factor(hessian), grad)
            w, current = _backtrack(objective, w, step, current, float(grad @ step))
        raise ConvergenceError(
            f"exact mode did not reach ‖∇J‖ ≤ {tolerance:.3g} "
            f"in {EXACT_MAX_ITERATIONS} Newton steps"
        )


@dataclass(frozen=True, slots=True)
class _Solved:
    """One fast-mode solve kept for reuse: its α rows, w rows and task versions."""

    alpha: np.ndarray
    w: np.ndarray
    versions: np.ndarray


def target_losses(target: TaskStatistics, w: np.ndarray) -> np.ndarray:
    """Mean target loss for each row of `w` (m, d): float64 (m,).

    Computed in w's dtype (float32 in the fast mode), averaged in float64.
    """
    margins = target.grads(w.dtype) @ w.T
    margins += target.values().astype(w.dtype)[:, None]
    losses: np.ndarray = softplus(-margins).mean(axis=0, dtype=np.float64)
    return losses


def _backtrack(
    objective: Callable[[np.ndarray], float],
    w: np.ndarray,
    step: np.ndarray,
    current: float,
    slope: float,
) -> tuple[np.ndarray, float]:
    """Armijo backtracking along a descent `step`; returns the new point and value."""
    # Values within round-off of `current` count as no increase, so that near
    # the optimum (decrease below float resolution) the full step is taken.
    slack = 8 * np.finfo(np.float64).eps * abs(current)
    size = 1.0
    for _ in range(40):
        candidate = w + size * step
        value = objective(candidate)
        if value <= current + 1e-4 * size * slope + slack:
            return candidate, value
        size *= 0.5
    return w + step, objective(w + step)


def _checked_regularization(value: float) -> float:
    try:
        lam = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"regularization must be a number, got {value!r}") from exc
    if not np.isfinite(lam) or lam <= 0:
        raise InvalidArgumentError(f"regularization must be positive and finite, got {value!r}")
    return lam

