"""Tests of the subset-loss estimator against solvers written here, independently."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
from gradmix.server import task_statistics
from gradmix.server.errors import (
    DimensionMismatchError,
    EmptyTaskError,
    InvalidArgumentError,
    NonFiniteError,
    PreconditionError,
    UnknownTaskError,
)
from gradmix.server.estimator import SubsetEstimator
from scipy.special import expit


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def random_rows(rng: np.random.Generator, rows: int, dim: int, scale: float,
                right_side: bool = False):
    values = rng.normal(0.3, 1.0, rows)
    return rng.standard_normal((rows, dim)) * scale, np.abs(values) if right_side else values


def build(seed: int, *, dim: int = 8, n_tasks: int = 4, scale: float = 1.0, reg: float = 0.5,
          right_side: bool = False):
    rng = np.random.default_rng(seed)
    target = random_rows(rng, 60, dim, scale)
    tasks = {f"task-{t}": random_rows(rng, 40 + 10 * t, dim, scale, right_side)
             for t in range(n_tasks)}
    estimator = SubsetEstimator(dim, regularization=reg)
    estimator.add_target_rows(*target)
    for name, (g, f) in tasks.items():
        estimator.add_task_rows(name, g, f)
    return estimator, target, tasks


def reference_loss(target, tasks, alpha: dict[str, float], reg: float) -> float:
    """L̂ with w from L-BFGS-B on the objective of DESIGN.md §4, written out here."""
    total = sum(alpha.values())
    chosen = [(tasks[name], a / total) for name, a in alpha.items() if a > 0]
    dim = target[0].shape[1]

    def objective(w):
        value, grad = 0.5 * reg * w @ w, reg * w
        for (g, f), a in chosen:
            z = f + g @ w
            value += a * softplus(-z).mean()
            grad = grad - a * (expit(-z) @ g) / len(f)
        return value, grad

    result = scipy.optimize.minimize(
        objective, np.zeros(dim), jac=True, method="L-BFGS-B",
        options={"gtol": 1e-13, "ftol": 1e-16, "maxiter": 10_000, "maxcor": 30},
    )
    g_v, f_v = target
    return float(softplus(-(f_v + g_v @ result.x)).mean())


def one_newton_step_loss(target, tasks, alpha: dict[str, float], reg: float) -> float:
    """The fast mode's definition, computed in float64 from the rows."""
    total = sum(alpha.values())
    dim = target[0].shape[1]
    hessian, gradient = reg * np.eye(dim), np.zeros(dim)
    for name, a in alpha.items():
        g, f = tasks[name]
        # The loss Hessian's weight on the right side of a row's log-odds, σ(-f)² on the wrong.
        curvature = expit(-f) * np.maximum(expit(f), expit(-f))
        hessian += a / total * (g.T * curvature) @ g / len(f)
        gradient -= a / total * (expit(-f) @ g) / len(f)
    w = -np.linalg.solve(hessian, gradient)
    g_v, f_v = target
    return float(softplus(-(f_v + g_v @ w)).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_mode_matches_an_independent_lbfgs_solve(seed):
    estimator, target, tasks = build(seed, scale=3.0, reg=0.3)
    rng = np.random.default_rng(100 + seed)
    names = estimator.tasks
    subsets = np.array([[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=bool)
    weights = rng.uniform(0.2, 2.0, size=subsets.shape)
    exact = estimator.estimate(subsets, weights, mode="exact")
    fast = estimator.estimate(subsets, weights, mode="fast")
    for row in range(len(subsets)):
        alpha = {n: weights[row, j] for j, n in enumerate(names) if subsets[row, j]}
        expected = reference_loss(target, tasks, alpha, 0.3)
        assert abs(exact[row] - expected) <= 1e-6 * expected
        # With rows of norm ≈ 8 one Newton step is off by > 100× that
        # tolerance: agreement above comes from the exact mode's iterations.
        assert abs(fast[row] - expected) > 1e-4 * expected


def test_fast_mode_is_one_newton_step_from_zero():
    estimator, target, tasks = build(3, scale=0.3, reg=1.0)
    subsets = np.random.default_rng(0).random((20, 4)) < 0.6
    fast = estimator.estimate(subsets)
    for row, mask in enumerate(subsets):
        alpha = {n: 1.0 for n, inside in zip(estimator.tasks, mask, strict=True) if inside}
        expected = one_newton_step_loss(target, tasks, alpha, 1.0) if alpha else None
        expected = estimator.anchor_loss() if expected is None else expected
        # float32 hot path: agrees with the float64 definition to 1e-6 relative.
        assert fast[row] == pytest.approx(expected, rel=1e-6)


def test_fast_mode_is_close_to_exact_when_w_is_small():
    # Rows of norm ≈ 0.2·√8 ≈ 0.6 with λ = 1 give ‖w‖ ≈ 0.05: the loss is
    # nearly quadratic there, one Newton step lands within 1e-8 relative, and
    # the float32 fast path adds < 1e-6. So: L̂ within 1e-6 relative, and the
    # effect L̂(S) - L̂(∅) (≈ 3e-4 here) within 1% of the exact one. The tasks'
    # log-odds are on the right side (f ≥ 0), where the fast mode's curvature is
    # the loss Hessian (on the wrong side it is larger: a shorter step).
    estimator, _, _ = build(4, scale=0.2, reg=1.0, right_side=True)
    subsets = np.random.default_rng(1).random((30, 4)) < 0.5
    fast = estimator.estimate(subsets, mode="fast")
    exact = estimator.estimate(subsets, mode="exact")
    np.testing.assert_allclose(fast, exact, rtol=1e-6)
    effect = exact - estimator.anchor_loss()
    assert np.abs(effect).max() > 2e-4
    np.testing.assert_allclose(fast - estimator.anchor_loss(), effect, rtol=1e-2, atol=1e-9)


def test_large_batches_use_the_threaded_path_and_agree():
    estimator, target, tasks = build(5, dim=16, n_tasks=6, scale=0.3, reg=1.0)
    subsets = np.random.default_rng(2).random((300, 6)) < 0.5
    fast = estimator.estimate(subsets)
    for row in (0, 149, 299):
        alpha = {n: 1.0 for n, inside in zip(estimator.tasks, subsets[row], strict=True) if inside}
        if alpha:
            expected = one_newton_step_loss(target, tasks, alpha, 1.0)
            assert fast[row] == pytest.approx(expected, rel=1e-6)


def test_badly_scaled_rows_switch_the_fast_mode_to_float64():
    # trace(H)/λ ≫ 1e3: float32 would lose digits, so float64 is used.
    estimator, target, tasks = build(6, scale=30.0, reg=0.01)
    subsets = np.array([[1, 1, 0, 1], [0, 0, 1, 0]], dtype=bool)
    fast = estimator.estimate(subsets)
    for row, mask in enumerate(subsets):
        alpha = {n: 1.0 for n, inside in zip(estimator.tasks, mask, strict=True) if inside}
        expected = one_newton_step_loss(target, tasks, alpha, 0.01)
        assert fast[row] == pytest.approx(expected, rel=1e-9)


def test_empty_subsets_give_the_anchor_loss():
    estimator, target, _ = build(7)
    anchor = float(softplus(-target[1]).mean())
    assert estimator.anchor_loss() == pytest.approx(anchor, rel=1e-12)
    empty = np.zeros((2, 4), dtype=bool)
    np.testing.assert_allclose(estimator.estimate(empty), anchor, rtol=1e-12)
    zero_weight = estimator.estimate(np.ones((1, 4), dtype=bool), np.zeros(4), mode="exact")
    assert zero_weight[0] == pytest.approx(anchor, rel=1e-12)


def test_adding_rows_incrementally_equals_building_from_scratch():
    _, target, tasks = build(8)
    names = list(tasks)
    incremental = SubsetEstimator(8, regularization=0.5)
    incremental.add_target_rows(target[0][:25], target[1][:25])
    for name in names[:2]:
        g, f = tasks[name]
        incremental.add_task_rows(name, g[:7], f[:7])
    incremental.estimate(np.ones((1, 2), dtype=bool))  # caches must be refreshed below
    incremental.add_target_rows(target[0][25:], target[1][25:])
    for name in names[:2]:
        g, f = tasks[name]
        incremental.add_task_rows(name, g[7:], f[7:])
    for name in names[2:]:
        incremental.add_task_rows(name, *tasks[name])
    scratch, _, _ = build(8)
    assert incremental.tasks == scratch.tasks
    assert [incremental.task_rows(n) for n in names] == [len(tasks[n][1]) for n in names]
    subsets = np.random.default_rng(3).random((12, 4)) < 0.5
    for mode, tolerance in (("fast", 1e-6), ("exact", 1e-10)):
        np.testing.assert_allclose(
            incremental.estimate(subsets, mode=mode), scratch.estimate(subsets, mode=mode),
            rtol=tolerance,
        )


def test_named_subsets_and_weights_match_the_matrix_form():
    estimator, _, _ = build(9)
    names = estimator.tasks
    named = estimator.estimate_named([[names[2], names[0]], []], [[3.0, 1.0], []])
    weights = np.array([[1.0, 0, 3.0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(named, estimator.estimate(weights > 0, weights), rtol=1e-12)
    # Weights are renormalised over the subset: only their ratios matter.
    doubled = estimator.estimate_named([[names[2], names[0]]], [[6.0, 2.0]])
    assert doubled[0] == pytest.approx(named[0], rel=1e-9)
    with pytest.raises(UnknownTaskError, match="nope"):
        estimator.estimate_named([["nope"]])
    with pytest.raises(InvalidArgumentError, match="twice"):
        estimator.estimate_named([[names[0], names[0]]])


def test_invalid_rows_are_rejected_with_typed_errors_and_leave_no_trace():
    estimator = SubsetEstimator(4)
    with pytest.raises(DimensionMismatchError, match="dim 5"):
        estimator.add_task_rows("a", np.zeros((3, 5)), np.zeros(3))
    with pytest.raises(EmptyTaskError):
        estimator.add_task_rows("a", np.zeros((0, 4)), np.zeros(0))
    bad = np.zeros((3, 4))
    bad[1, 2] = np.nan
    with pytest.raises(NonFiniteError):
        estimator.add_task_rows("a", bad, np.zeros(3))
    with pytest.raises(NonFiniteError):
        estimator.add_target_rows(np.zeros((3, 4)), np.array([0.0, np.inf, 1.0]))
    with pytest.raises(InvalidArgumentError, match="values"):
        estimator.add_task_rows("a", np.zeros((3, 4)), np.zeros(2))
    assert estimator.tasks == [] and not estimator.has_target
    with pytest.raises(UnknownTaskError):
        estimator.task_rows("a")


def test_estimating_before_the_target_is_a_precondition_error():
    estimator = SubsetEstimator(4)
    estimator.add_task_rows("a", np.ones((2, 4)), np.zeros(2))
    with pytest.raises(PreconditionError, match="target"):
        estimator.estimate(np.ones((1, 1), dtype=bool))
    with pytest.raises(PreconditionError):
        estimator.anchor_loss()


@pytest.mark.parametrize(
    ("subsets", "weights", "error"),
    [
        (np.ones((2, 3), dtype=bool), None, InvalidArgumentError),  # 3 columns for 4 tasks
        (np.ones(4, dtype=bool), None, InvalidArgumentError),  # not 2-D
        (np.full((1, 4), 2), None, InvalidArgumentError),  # not boolean
        (np.ones((1, 4), dtype=bool), -np.ones(4), InvalidArgumentError),
        (np.ones((1, 4), dtype=bool), np.array([1, np.nan, 1, 1]), NonFiniteError),
        (np.ones((1, 4), dtype=bool), np.ones(3), InvalidArgumentError),
    ],
)
def test_bad_subset_matrices_and_weights_are_rejected(subsets, weights, error):
    estimator, _, _ = build(10)
    with pytest.raises(error):
        estimator.estimate(subsets, weights)


def test_bad_construction_and_mode_are_rejected():
    with pytest.raises(InvalidArgumentError):
        SubsetEstimator(0)
    with pytest.raises(InvalidArgumentError):
        SubsetEstimator(4, regularization=0.0)
    estimator, _, _ = build(11)
    with pytest.raises(InvalidArgumentError, match="mode"):
        estimator.estimate(np.ones((1, 4), dtype=bool), mode="slow")


def test_rows_added_after_an_estimate_are_reread_incrementally(monkeypatch):
    # The solver is kept when a known task gains rows (only its operand row is
    # re-cast); estimates must equal a fresh estimator's over all the rows.
    # Pages of 2 tasks: the 5 tasks' sums span 3 pages of the bank.
    monkeypatch.setattr(task_statistics, "PAGE", 2)
    rng = np.random.default_rng(20)
    dim = 130  # two block rows of uneven width in the packed layout
    target = random_rows(rng, 50, dim, 0.05)
    first = {f"t{i}": random_rows(rng, 30, dim, 0.05) for i in range(5)}
    more = random_rows(rng, 25, dim, 0.05)
    subsets = rng.random((40, 5)) < 0.5
    grown = SubsetEstimator(dim)
    grown.add_target_rows(*target)
    for name, rows in first.items():
        grown.add_task_rows(name, *rows)
    grown.estimate(subsets)
    grown.add_task_rows("t2", *more)
    fresh = SubsetEstimator(dim)
    fresh.add_target_rows(*target)
    for name, (g, f) in first.items():
        if name == "t2":
            g, f = np.concatenate([g, more[0]]), np.concatenate([f, more[1]])
        fresh.add_task_rows(name, g, f)
    np.testing.assert_allclose(grown.estimate(subsets), fresh.estimate(subsets), rtol=1e-7)
    for mode in ("linearized", "exact"):
        np.testing.assert_allclose(
            grown.estimate(subsets[:3], mode=mode), fresh.estimate(subsets[:3], mode=mode),
            rtol=1e-9,
        )
    # An ill-conditioned λ takes the float64 path over the same pages.
    np.testing.assert_allclose(
        grown.estimate(subsets[:3], regularization=1e-6),
        fresh.estimate(subsets[:3], regularization=1e-6), rtol=1e-7,
    )
    g, f = fresh.statistics("t2").grads(), fresh.statistics("t2").values()
    direct = (g.T * (expit(-f) * np.maximum(expit(f), expit(-f)))) @ g / len(f)
    np.testing.assert_allclose(grown.statistics("t2").hessian(), direct, rtol=1e-12, atol=1e-15)


def test_fast_mode_matches_the_definition_for_mixed_subset_sizes():
    # Singletons, halves and the full set in one batch: conjugate gradients
    # preconditioned by the batch's mean system must settle (or fall back to
    # a factorisation) for each of them.
    estimator, target, tasks = build(21, dim=70, n_tasks=8, scale=0.2, reg=0.5)
    rng = np.random.default_rng(3)
    subsets = np.vstack([np.eye(8, dtype=bool), rng.random((30, 8)) < 0.5, np.ones((1, 8), bool)])
    fast = estimator.estimate(subsets)
    for row, mask in enumerate(subsets):
        alpha = {n: 1.0 for n, inside in zip(estimator.tasks, mask, strict=True) if inside}
        if alpha:
            expected = one_newton_step_loss(target, tasks, alpha, 0.5)
            assert fast[row] == pytest.approx(expected, rel=1e-6)


def test_linearized_mode_is_exact_at_its_center_and_ranks_like_the_fast_mode():
    estimator, _, _ = build(22, dim=24, n_tasks=10, scale=0.2, reg=1.0)
    same = np.tile(np.random.default_rng(4).random((1, 10)) < 0.5, (3, 1))
    np.testing.assert_allclose(
        estimator.estimate(same, mode="linearized"), estimator.estimate(same), rtol=1e-6
    )
    subsets = np.random.default_rng(5).random((200, 10)) < 0.5
    linear = estimator.estimate(subsets, mode="linearized")
    fast = estimator.estimate(subsets)
    assert scipy.stats.spearmanr(linear, fast)[0] > 0.99
    assert not np.allclose(linear, fast, rtol=1e-9)  # an approximation, not the same numbers


def test_subsets_without_a_changed_task_reuse_their_solution():
    estimator, target, tasks = build(23, dim=12, n_tasks=5, scale=0.3, reg=1.0)
    subsets = np.random.default_rng(6).random((60, 5)) < 0.5
    before = estimator.estimate(subsets)
    more = random_rows(np.random.default_rng(7), 20, 12, 0.3)
    estimator.add_task_rows("task-1", *more)
    after = estimator.estimate(subsets)
    without = ~subsets[:, 1]
    np.testing.assert_array_equal(after[without], before[without])  # reused as is
    assert not np.allclose(after[~without], before[~without], rtol=1e-9)
    g, f = tasks["task-1"]
    tasks["task-1"] = (np.concatenate([g, more[0]]), np.concatenate([f, more[1]]))
    for row in np.flatnonzero(subsets.any(axis=1)):
        alpha = {n: 1.0 for n, inside in zip(estimator.tasks, subsets[row], strict=True) if inside}
        expected = one_newton_step_loss(target, tasks, alpha, 1.0)
        assert after[row] == pytest.approx(expected, rel=1e-6)


def test_rows_read_back_give_the_same_exact_estimates_and_bootstrap_as_rows_kept():
    from gradmix.server.policies import bootstrap_scores
    from gradmix.vocabulary.policy_settings import PolicyConfig

    kept, target, tasks = build(5, n_tasks=4)
    reads: list[str] = []

    def read(task: str):
        reads.append(task)
        g, f = tasks[task]
        return g.astype(np.float32), f

    lean = SubsetEstimator(8, regularization=0.5, rows=read)
    # float32 rows, as the store gives them back, in both estimators
    kept = SubsetEstimator(8, regularization=0.5)
    for estimator in (kept, lean):
        estimator.add_target_rows(*target)
        for name, (g, f) in tasks.items():
            estimator.add_task_rows(name, g.astype(np.float32), f)
    assert all(lean.statistics(t).held_bytes == 0 for t in lean.tasks)
    assert all(kept.statistics(t).held_bytes > 0 for t in kept.tasks)
    assert lean.statistics(None).held_bytes > 0  # the target's rows stay: every estimate reads them
    assert not reads

    subsets = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(lean.estimate(subsets, mode="exact"),
                                  kept.estimate(subsets, mode="exact"))
    assert sorted(set(reads)) == sorted(tasks) and len(reads) == 4  # once per task per call
    config = PolicyConfig(policy="ensemble", regularization=0.5, subset_count=16, bootstrap=3)
    reads.clear()
    np.testing.assert_array_equal(bootstrap_scores(lean, config), bootstrap_scores(kept, config))
    assert len(reads) == 4  # once for all the replicates
    reads.clear()
    with lean.rows_cached():  # a query of many calls: one read per task in all
        for row in subsets:
            lean.estimate(row[None, :], mode="exact")
    assert sorted(reads) == sorted(tasks)
    assert all(lean.statistics(t).held_bytes == 0 for t in lean.tasks)


def test_rows_read_back_that_are_not_the_rows_added_are_refused():
    rng = np.random.default_rng(0)
    g, f = random_rows(rng, 10, 4, 1.0)
    estimator = SubsetEstimator(4, rows=lambda task: (g[:7], f[:7]))
    estimator.add_target_rows(g, f)
    estimator.add_task_rows("t", g, f)
    with pytest.raises(PreconditionError, match="7 rows read back, 10 were added"):
        estimator.estimate(np.ones((1, 1), dtype=bool), mode="exact")


def test_a_dropped_estimators_pages_are_reused_from_zero(monkeypatch):
    # The pool hands a dropped bank's pages to the next bank of the same shape;
    # the new bank's sums must start from zero (the pages hold the old sums).
    import gc

    pool = task_statistics.PagePool(1 << 30)
    monkeypatch.setattr(task_statistics, "POOL", pool)
    monkeypatch.setattr(task_statistics, "PAGE", 2)
    dropped, _, _ = build(40, dim=70, n_tasks=5, scale=0.3)
    dropped.estimate(np.ones((3, 5), dtype=bool))
    del dropped
    gc.collect()
    idle = pool.idle_bytes
    assert idle > 0  # 3 pages of 2 slots, in float64 and float32
    reused, _, _ = build(41, dim=70, n_tasks=5, scale=0.3)
    assert pool.idle_bytes == 0
    monkeypatch.setattr(task_statistics, "POOL", task_statistics.PagePool(0))
    fresh, _, _ = build(41, dim=70, n_tasks=5, scale=0.3)
    subsets = np.random.default_rng(4).random((20, 5)) < 0.5
    np.testing.assert_array_equal(reused.estimate(subsets), fresh.estimate(subsets))
    for task in reused.tasks:
        np.testing.assert_array_equal(reused.statistics(task).hessian_sum(),
                                      fresh.statistics(task).hessian_sum())


def test_the_pool_keeps_pages_still_viewed_and_past_its_limit_frees_them():
    page = task_statistics.zeroed((2, 3), np.float64)
    pool = task_statistics.PagePool(page.nbytes)
    view = page[:1]
    pool.give(("k",), [[page], [task_statistics.zeroed((2, 3), np.float64)]])
    assert pool.idle_bytes == page.nbytes  # the second page did not fit
    assert pool.take(("other",)) is None
    assert pool.take(("k",)) is None  # `view` still reads it
    del view
    taken = pool.take(("k",))
    assert taken is not None and taken[0] is page
    assert pool.idle_bytes == 0


def test_large_fast_calls_linearize_and_keep_the_sample_they_check():
    from gradmix.server import estimator as estimator_module

    estimator, _, _ = build(42, dim=24, n_tasks=12, scale=0.2, reg=1.0)
    subsets = np.random.default_rng(7).random((300, 12)) < 0.5
    systems = estimator.estimate(subsets)
    assert estimator.last_fast_path == "systems"  # 2·300·12·packed d² is far below the bound
    estimator.linearize_above_flops = 0.0
    auto = estimator.estimate(subsets)
    assert estimator.last_fast_path == "linearized"
    assert estimator.last_linearized_error <= estimator_module.LINEARIZE_TOLERANCE
    linear = estimator.estimate(subsets, mode="linearized")
    sample = np.unique(np.linspace(0, 299, estimator_module.LINEARIZE_CHECK_SUBSETS).astype(int))
    rest = np.setdiff1d(np.arange(300), sample)
    np.testing.assert_allclose(auto[sample], systems[sample], rtol=1e-6)  # float32 solves
    np.testing.assert_array_equal(auto[rest], linear[rest])
    assert scipy.stats.spearmanr(auto, systems)[0] > 0.99
    # Fewer than LINEARIZE_MIN_SUBSETS are always solved as systems, whatever the bound.
    estimator.estimate(subsets[:estimator_module.LINEARIZE_MIN_SUBSETS - 1])
    assert estimator.last_fast_path == "systems"


def test_a_linearization_that_fails_its_check_solves_every_system():
    # Singletons and the full set around their mean weighting, with rows large
    # against λ: first order is far off, so the check must send every row to
    # the systems solve and the results equal the fast mode's.
    estimator, _, _ = build(43, dim=16, n_tasks=8, scale=3.0, reg=0.05)
    subsets = np.vstack([np.eye(8, dtype=bool)] * 32 + [np.ones((8, 8), dtype=bool)])
    systems = estimator.estimate(subsets)
    estimator.linearize_above_flops = 0.0
    checked = estimator.estimate(subsets)
    assert estimator.last_fast_path == "systems"
    assert estimator.last_linearized_error > 0.05
    np.testing.assert_array_equal(checked, systems)
