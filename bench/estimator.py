"""Benchmark: statistics ingest and fast-mode subset estimates, each against a baseline.

Run by hand: ``.venv/bin/python bench/estimator.py`` (defaults: 100 tasks ×
500 rows, 500 target rows, d = 256, 1000 random subsets of half the tasks);
the production-scale case is ``--tasks 1000 --rows 100 --dim 512``.

It measures, in one run:

* ingest: adding every task's rows to a `SubsetEstimator` (per-task b_t and
  packed Hessian sums; task rows read back, not kept, as on the server) and
  building the fast-mode solver (`prepare`), as rows per second (the median
  of ``--ingest-repeats``; the first run, which touches memory the process
  has not used yet, is reported beside it); beside it a bare GEMM of the
  same rows (XᵀX over all task rows stacked in float64, BLAS on one thread
  like the ingest): the arithmetic the ingest cannot avoid;
* the fast mode over all subsets, one batched `estimate` call, as the
  server runs it: its systems solved, or above `LINEARIZE_ABOVE_FLOPS` the
  checked linearized solve (the path taken is printed); beside it the same
  call with every system solved (``systems``) and the Spearman rank
  correlation of the two; and the same estimates by the previous
  implementation (`PreviousFastSolver` below: one
  GEMM over whole d×d Hessians per chunk of subsets into freshly allocated
  systems), both ``--repeats`` times, compared by their medians; the largest
  difference between the two sets of estimates is printed;
* incremental re-estimation: one task gains rows (its own rows again, as a
  commit would add), then every subset is estimated; the fast mode re-solves
  only the subsets that hold that task (``discard_solves`` before each of
  the repeated fast-mode runs above makes those solve every subset);
* the linearized mode (the fast mode's w to first order around the subsets'
  mean weighting) over the same subsets, and the Spearman rank correlation
  of its estimates with the fast mode's;
* the per-subset baseline of the method's reference code: scikit-learn
  ``LogisticRegression(C=1e-4, solver="liblinear")`` (L2 penalty, the default)
  fitted on the rows of each subset, then the target loss
  mean softplus(-(f_v + g_vᵀ w)) with w its coefficients. Like the reference
  it has no value offset in the regression; it makes the two classes sklearn
  needs by negating a random 30% of the rows and labelling them 0 (σ(-z) =
  1 - σ(z), so this is the same likelihood as labelling every row 1). Timed
  per subset over ``--baseline-subsets`` subsets (fit + target loss; building
  the row matrix is not timed). The speedup compares medians on both sides:
  the median per-subset fit against the median fast-mode run / m.

Data: `gradmix.demo.planted.planted_tasks` (rows of norm ≈ 1.4, so the
fast mode runs in float32). The last line is::

    estimator: subsets=<m> seconds=<fast mode, median> per_subset_speedup=<ratio> \
        ingest_rows_per_s=<rate> previous_seconds=<s> speedup_vs_previous=<ratio> \
        fast_path=<systems|linearized> systems_seconds=<every system solved> \
        spearman_vs_systems=<rank agreement of the fast mode with it> \
        cpu_seconds=<fast mode, process CPU> systems_cpu_seconds=<...> \
        ingest_vs_gemm=<ingest rows/s over bare-GEMM rows/s> \
        ingest_cold_rows_per_s=<the first ingest of the process> \
        ingest_cpu_rows_per_s=<rows over the ingest's median process CPU time> \
        load=<1-minute load average at the end> \
        linearized_seconds=<s> linearized_spearman=<rank agreement with the fast mode> \
        incremental_seconds=<one task's rows added and every subset re-estimated>

(one line).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.stats
from gradmix.demo.planted import TaskRows, planted_tasks
from gradmix.server.batched_solve import single_threaded_blas
from gradmix.server.estimator import (
    LINEARIZE_ABOVE_FLOPS,
    SubsetEstimator,
    softplus,
    target_losses,
)
from scipy.linalg import get_lapack_funcs
from sklearn.linear_model import LogisticRegression


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--rows", type=int, default=500, help="rows per task and for the target")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--subsets", type=int, default=1000)
    parser.add_argument("--subset-fraction", type=float, default=0.5)
    parser.add_argument("--baseline-subsets", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ingest-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class PreviousFastSolver:
    """The fast mode as implemented before the packed operands: the baseline.

    Whole d×d Hessians H_t stacked as (n+1, d²) float32 (λI the last row);
    per chunk of 128 subsets one GEMM into a freshly allocated (128, d, d)
    stack, then ``posv`` per system; chunks on a thread pool, BLAS on one
    thread.
    """

    def __init__(self, estimator: SubsetEstimator) -> None:
        d = estimator.dim
        self.tasks = estimator.tasks
        stack = np.empty((len(self.tasks) + 1, d, d), np.float32)
        for t, task in enumerate(self.tasks):
            stack[t] = estimator.statistics(task).hessian()
        stack[-1] = np.eye(d)
        self.stack = stack.reshape(len(self.tasks) + 1, d * d)
        self.gradients = np.array([estimator.statistics(t).loss_gradient() for t in self.tasks])

    def solve(self, alpha: np.ndarray, regularization: float) -> np.ndarray:
        m, d = alpha.shape[0], self.gradients.shape[1]
        weights = np.empty((m, len(self.tasks) + 1), np.float32)
        weights[:, :-1] = alpha
        weights[:, -1] = regularization
        rhs = -(alpha @ self.gradients).astype(np.float32)
        out = np.empty((m, d), np.float32)
        (posv,) = get_lapack_funcs(("posv",), dtype=np.float32)

        def work(lo: int) -> None:
            hi = min(lo + 128, m)
            systems = np.empty((hi - lo, d, d), np.float32)
            np.matmul(weights[lo:hi], self.stack, out=systems.reshape(hi - lo, d * d))
            for i in range(hi - lo):
                _, solution, info = posv(systems[i].T, rhs[lo + i], lower=0, overwrite_a=1)
                out[lo + i] = solution if info == 0 else np.nan

        with single_threaded_blas(), ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            list(pool.map(work, range(0, m, 128)))
        return out


def baseline_loss(
    grads: np.ndarray, target_g: np.ndarray, target_f: np.ndarray, seed: int
) -> float:
    """The reference code's per-subset fit, then the estimated target loss."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(grads.shape[0]) < 0.7, 1, 0)
    signed = np.where(labels[:, None] == 1, grads, -grads)
    model = LogisticRegression(C=1e-4, solver="liblinear")  # L2 penalty (the default)
    model.fit(signed, labels)
    return float(softplus(-(target_f + target_g @ model.coef_[0])).mean())


def timed(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, Timing]:
    """Runs each function `repeats` times, interleaved (load drifts hit all alike)."""
    timings = {name: Timing() for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            timing = timings[name]
            timing.result = None  # free the last result first: it may be large
            start, before = time.perf_counter(), os.times()
            timing.result = function()
            timing.wall.append(time.perf_counter() - start)
            after = os.times()
            timing.cpu.append(after.user - before.user + after.system - before.system)
            timing.system.append(after.system - before.system)
    return timings


class Timing:
    """Wall and process-CPU seconds of repeated runs, and the last run's result."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.system: list[float] = []
        self.result: object = None

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    def describe(self) -> str:
        return (" ".join(f"{r:.3f}" for r in self.wall) + f"  median={self.median:.3f}"
                + f"  (process CPU s, all threads: median={statistics.median(self.cpu):.3f}"
                + f", of it system {statistics.median(self.system):.3f})")


def ingest(
    args: argparse.Namespace, target: TaskRows, tasks: dict[str, TaskRows]
) -> SubsetEstimator:
    """A fresh estimator holding every row's statistics, its fast-mode solver built.

    As on the server, task rows are not kept: the estimator reads them back
    when its exact mode needs them (here from `tasks`; the server's from the
    store).
    """
    estimator = SubsetEstimator(args.dim, rows=lambda task: tasks[task])
    estimator.add_target_rows(*target)
    for name, (grads, values) in tasks.items():
        estimator.add_task_rows(name, grads, values)
    estimator.prepare()
    return estimator


def main() -> None:
    args = parse_args()
    third = args.tasks // 3
    target_g, target_f, tasks, _ = planted_tasks(
        third, third, args.tasks - 2 * third, args.rows, args.dim, args.seed
    )
    names = list(tasks)
    rows = args.rows * (args.tasks + 1)

    stacked = np.concatenate([tasks[name][0] for name in names]).astype(np.float64)

    def gemm() -> None:
        with single_threaded_blas():  # as the ingest's BLAS calls
            stacked.T @ stacked

    loads = timed({"ingest": lambda: ingest(args, (target_g, target_f), tasks), "gemm": gemm},
                  args.ingest_repeats)
    estimator = loads["ingest"].result
    assert isinstance(estimator, SubsetEstimator)
    ingest_rate = rows / loads["ingest"].median
    # The first ingest of the process touches memory it has not used (later
    # ones reuse the dropped estimator's pages, as a server's next anchor does).
    cold_rate = rows / loads["ingest"].wall[0]
    # On a shared machine wall time includes waiting for a core: the CPU rate beside it.
    # (A run too short for the process clock to tick counts one tick.)
    cpu_rate = rows / max(statistics.median(loads["ingest"].cpu),
                          time.get_clock_info("process_time").resolution)
    gemm_rate = args.tasks * args.rows / loads["gemm"].median
    print(f"ingest of {args.tasks} tasks x {args.rows} rows + {args.rows} target rows, "
          f"d={args.dim} (wall s): {loads['ingest'].describe()}: {ingest_rate:.0f} rows/s")
    print(f"bare GEMM of the task rows (wall s): {loads['gemm'].describe()}: "
          f"{gemm_rate:.0f} rows/s; first (cold) ingest {cold_rate:.0f} rows/s")

    rng = np.random.default_rng(args.seed + 1)
    size = math.ceil(args.subset_fraction * args.tasks)
    members = rng.random((args.subsets, args.tasks)).argsort(axis=1)[:, :size]
    subsets = np.zeros((args.subsets, args.tasks), dtype=bool)
    np.put_along_axis(subsets, members, True, axis=1)

    previous_solver = PreviousFastSolver(estimator)
    alpha = estimator.subset_weights(subsets)
    target = estimator.statistics(None)
    def full_fast(bound: float) -> np.ndarray:
        estimator.discard_solves()  # every run solves every subset
        estimator.linearize_above_flops = bound
        return estimator.estimate(subsets)

    runs = timed({
        "fast": lambda: full_fast(LINEARIZE_ABOVE_FLOPS),  # what the server runs
        "systems": lambda: full_fast(math.inf),  # every system solved
        "linearized": lambda: estimator.estimate(subsets, mode="linearized"),
        "previous": lambda: target_losses(
            target, previous_solver.solve(alpha, estimator.regularization)
        ),
    }, args.repeats)
    estimator.linearize_above_flops = LINEARIZE_ABOVE_FLOPS
    estimator.estimate(subsets)
    path, check = estimator.last_fast_path, estimator.last_linearized_error
    fast, systems, previous = (runs[k].median for k in ("fast", "systems", "previous"))
    losses = np.asarray(runs["fast"].result)
    exact = np.asarray(runs["systems"].result)
    difference = float(np.abs(exact - np.asarray(runs["previous"].result)).max())
    agreement = float(scipy.stats.spearmanr(losses, exact)[0])
    print(f"fast mode runs (wall s): {runs['fast'].describe()}; path {path}"
          + (f" (check: largest sample error {check:.4f} of the losses' std)"
             if path == "linearized" else "")
          + f"; Spearman with every system solved {agreement:.5f}")
    print(f"fast mode, every system solved (wall s): {runs['systems'].describe()}")
    linearized = runs["linearized"].median
    rank = float(scipy.stats.spearmanr(np.asarray(runs["linearized"].result), exact)[0])
    print(f"linearized mode runs (wall s): {runs['linearized'].describe()}; "
          f"Spearman with every system solved {rank:.5f}")
    print(f"previous implementation runs (wall s): {runs['previous'].describe()}; "
          f"largest difference in L-hat from every system solved {difference:.2e}")

    # One task gains rows (as after a commit): only subsets holding it are re-solved.
    estimator.estimate(subsets)
    changed = names[0]
    start = time.perf_counter()
    estimator.add_task_rows(changed, *tasks[changed])
    estimator.estimate(subsets)
    incremental = time.perf_counter() - start
    how = (f"re-solving the {int(subsets[:, 0].sum())} subsets that hold it"
           if estimator.last_fast_path == "systems" else "the linearized path, every subset")
    print(f"incremental: {incremental:.3f} s to add {args.rows} rows to one task and re-estimate "
          f"({how}; {fast:.3f} s for all {args.subsets})")

    times, reference = [], []
    for j in range(args.baseline_subsets):
        chosen = [names[t] for t in np.flatnonzero(subsets[j])]
        grads = np.concatenate([tasks[t][0] for t in chosen]).astype(np.float64)
        start = time.perf_counter()
        reference.append(baseline_loss(grads, target_g, target_f, args.seed + j))
        times.append(time.perf_counter() - start)
    per_baseline = statistics.median(times)
    per_fast = fast / args.subsets
    print(f"baseline: {per_baseline:.4f} s per subset (median of {len(times)} subsets, "
          f"{size * args.rows} rows each); fast mode: {per_fast * 1e3:.3f} ms per subset")
    first = losses[: len(times)]
    print(f"L-hat on the first {len(times)} subsets: fast mean={first.mean():.4f} "
          f"baseline mean={np.mean(reference):.4f} anchor={estimator.anchor_loss():.4f}")
    print(f"estimator: subsets={args.subsets} seconds={fast:.3f} "
          f"per_subset_speedup={per_baseline / per_fast:.0f} ingest_rows_per_s={ingest_rate:.0f} "
          f"previous_seconds={previous:.3f} speedup_vs_previous={previous / fast:.2f} "
          f"fast_path={path} systems_seconds={systems:.3f} spearman_vs_systems={agreement:.5f} "
          f"cpu_seconds={statistics.median(runs['fast'].cpu):.3f} "
          f"systems_cpu_seconds={statistics.median(runs['systems'].cpu):.3f} "
          f"ingest_vs_gemm={ingest_rate / gemm_rate:.2f} ingest_cold_rows_per_s={cold_rate:.0f} "
          f"ingest_cpu_rows_per_s={cpu_rate:.0f} load={os.getloadavg()[0]:.1f} "
          f"linearized_seconds={linearized:.3f} "
          f"linearized_spearman={rank:.5f} incremental_seconds={incremental:.3f}")


if __name__ == "__main__":
    main()
