"""Benchmark: how many tasks one job's estimator takes, grown until a bound is passed.

Run by hand: ``.venv/bin/python bench/scale.py`` (defaults: d = 512, 100 rows
per task, tasks 250, 500, 1000, 2000, ... doubling while every bound holds).

For each task count n it builds, as the server does at an anchor, a
`SubsetEstimator` over n planted tasks (rows read back, not kept) and measures:

* ingest: every task's rows in, wall and process-CPU seconds, rows/s;
* memory: the statistics' bytes (the bank: n packed d×d sums in float64 and
  a float32 mirror) and the process's peak resident memory (ru_maxrss);
* a re-estimate with the server's default policy (`compute_scores`, the
  ensemble over `subset_count` subsets of half the tasks; above
  `LINEARIZE_ABOVE_FLOPS` its systems take the checked linearized path,
  printed), from scratch and after one task gains rows (what a commit costs).

With ``--jobs`` it grows the number of jobs instead (``--start`` jobs of
``--tasks-per-job`` tasks, doubling): every job's estimator alive at once,
as the server holds each job's current anchor, then one commit in every job;
it stops when the peak resident memory passes ``--max-gib``. Its last line is
``scale_jobs: ... largest_within_bounds=<jobs> ... commit_cpu_s=<median>``.

The task sweep stops after the first n at which the incremental re-estimate's CPU time
passes ``--max-reestimate-cpu`` or the peak resident memory passes
``--max-gib`` (or at ``--max-tasks``), and says which bound stopped it. The
machine's load (1-minute average) is printed with each row: on a shared
machine compare CPU seconds, not wall. The last line is::

    scale: dim=<d> rows=<per task> largest_within_bounds=<n> stopped_by=<bound> \
        ingest_rows_per_s=<at that n> reestimate_cpu_s=<incremental, at that n> \
        bank_gib=<at that n> peak_rss_gib=<...>

(one line).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import time
from dataclasses import dataclass

import numpy as np
from gradmix.demo.planted import planted_tasks
from gradmix.server.estimator import SubsetEstimator
from gradmix.server.policies import compute_scores
from gradmix.vocabulary.policy_settings import PolicyConfig

GIB = float(1 << 30)


@dataclass
class Step:
    tasks: int
    ingest_wall: float
    ingest_cpu: float
    bank_gib: float
    rss_gib: float
    full_cpu: float
    incremental_wall: float
    incremental_cpu: float
    path: str
    rows: int

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.ingest_wall if self.ingest_wall > 0 else 0.0


def cpu() -> float:
    times = os.times()
    return times.user + times.system


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def measure(n: int, args: argparse.Namespace, config: PolicyConfig) -> Step:
    third = n // 3
    target_g, target_f, tasks, _ = planted_tasks(third, third, n - 2 * third, 2 * args.rows,
                                                 args.dim, args.seed)
    first = {t: (g[: args.rows], f[: args.rows]) for t, (g, f) in tasks.items()}
    estimator = SubsetEstimator(args.dim, regularization=config.regularization,
                                rows=lambda task: first[task])
    estimator.add_target_rows(target_g[: args.rows], target_f[: args.rows])
    start, before = time.perf_counter(), cpu()
    for name, (grads, values) in first.items():
        estimator.add_task_rows(name, grads, values)
    estimator.prepare(config.regularization)
    ingest_wall, ingest_cpu = time.perf_counter() - start, cpu() - before
    bank = estimator.statistics_bytes
    before = cpu()
    compute_scores(estimator, config)
    full_cpu = cpu() - before
    changed = next(iter(tasks))
    grads, values = tasks[changed]
    start, before = time.perf_counter(), cpu()
    estimator.add_task_rows(changed, grads[args.rows :], values[args.rows :])
    compute_scores(estimator, config)
    return Step(n, ingest_wall, ingest_cpu, bank / GIB, peak_rss_gib(), full_cpu,
                time.perf_counter() - start, cpu() - before, estimator.last_fast_path,
                n * args.rows)


def measure_jobs(jobs: int, args: argparse.Namespace, config: PolicyConfig,
                 rows: tuple[np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]
                 ) -> tuple[float, float, float]:
    """`jobs` estimators alive at once (one per job, as the server holds each job's
    current anchor), then one commit in every job (a task's new rows, then the
    default policy's re-estimate). Returns (peak RSS GiB, median CPU s per
    commit, the commits' total wall s)."""
    target_g, target_f, tasks = rows
    first = {t: (g[: args.rows], f[: args.rows]) for t, (g, f) in tasks.items()}
    held = []
    for _ in range(jobs):
        estimator = SubsetEstimator(args.dim, regularization=config.regularization,
                                    rows=lambda task: first[task])
        estimator.add_target_rows(target_g[: args.rows], target_f[: args.rows])
        for name, (grads, values) in first.items():
            estimator.add_task_rows(name, grads, values)
        compute_scores(estimator, config)  # the job's first mixture
        held.append(estimator)
    names = list(tasks)
    seconds = []
    start = time.perf_counter()
    for j, estimator in enumerate(held):
        task = names[j % len(names)]
        grads, values = tasks[task]
        before = cpu()
        estimator.add_task_rows(task, grads[args.rows :], values[args.rows :])
        compute_scores(estimator, config)
        seconds.append(cpu() - before)
    wall = time.perf_counter() - start
    return peak_rss_gib(), float(np.median(seconds)), wall


def jobs_sweep(args: argparse.Namespace, config: PolicyConfig) -> None:
    tasks_per_job = args.tasks_per_job
    third = tasks_per_job // 3
    target_g, target_f, tasks, _ = planted_tasks(third, third, tasks_per_job - 2 * third,
                                                 2 * args.rows, args.dim, args.seed)
    print(f"jobs of {tasks_per_job} tasks, d={args.dim}, {args.rows} rows per task; bound: "
          f"peak RSS <= {args.max_gib} GiB", flush=True)
    largest, stopped, jobs = (0, 0.0, 0.0, 0.0), "max_jobs", args.start
    while jobs <= args.max_jobs:
        rss, per_commit, wall = measure_jobs(jobs, args, config, (target_g, target_f, tasks))
        gc.collect()
        print(f"jobs={jobs}: peak RSS {rss:.2f} GiB; one commit in every job: median "
              f"{per_commit:.3f} s CPU per commit, {wall:.1f} s wall in all; "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        if rss > args.max_gib:
            stopped = "max_gib"
            break
        largest = (jobs, rss, per_commit, wall)
        jobs *= 2
    print(f"scale_jobs: dim={args.dim} tasks_per_job={tasks_per_job} rows={args.rows} "
          f"largest_within_bounds={largest[0]} stopped_by={stopped} peak_rss_gib={largest[1]:.2f} "
          f"commit_cpu_s={largest[2]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rows", type=int, default=100, help="rows per task")
    parser.add_argument("--start", type=int, default=250, help="first task count")
    parser.add_argument("--max-tasks", type=int, default=16000)
    parser.add_argument("--max-reestimate-cpu", type=float, default=2.0,
                        help="bound on one incremental re-estimate's CPU seconds")
    parser.add_argument("--max-gib", type=float, default=8.0,
                        help="bound on the process's peak resident memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", action="store_true",
                        help="grow the number of jobs (of --tasks-per-job tasks) instead")
    parser.add_argument("--tasks-per-job", type=int, default=100)
    parser.add_argument("--max-jobs", type=int, default=4096)
    args = parser.parse_args()
    config = PolicyConfig()
    if args.jobs:
        jobs_sweep(args, config)
        return
    print(f"d={args.dim}, {args.rows} rows per task; policy {config.policy}, "
          f"{config.subset_count} subsets of {config.subset_fraction:g} of the tasks; bounds: "
          f"re-estimate CPU <= {args.max_reestimate_cpu} s, peak RSS <= {args.max_gib} GiB")
    within: Step | None = None
    stopped = "max_tasks"
    n = args.start
    while n <= args.max_tasks:
        step = measure(n, args, config)
        gc.collect()
        print(f"tasks={n}: ingest {step.ingest_wall:.2f} s wall, {step.ingest_cpu:.2f} s CPU "
              f"({step.rows_per_s:.0f} rows/s); bank {step.bank_gib:.2f} GiB, peak RSS "
              f"{step.rss_gib:.2f} GiB; re-estimate from scratch {step.full_cpu:.2f} s CPU, "
              f"after one task's rows {step.incremental_wall:.2f} s wall, "
              f"{step.incremental_cpu:.2f} s CPU (path {step.path}); "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        if step.incremental_cpu > args.max_reestimate_cpu:
            stopped = "max_reestimate_cpu"
            break
        if step.rss_gib > args.max_gib:
            stopped = "max_gib"
            break
        within = step
        n *= 2
    if within is None:
        print(f"scale: dim={args.dim} rows={args.rows} largest_within_bounds=0 "
              f"stopped_by={stopped}")
        return
    print(f"scale: dim={args.dim} rows={args.rows} largest_within_bounds={within.tasks} "
          f"stopped_by={stopped} ingest_rows_per_s={within.rows_per_s:.0f} "
          f"reestimate_cpu_s={within.incremental_cpu:.3f} bank_gib={within.bank_gib:.2f} "
          f"peak_rss_gib={within.rss_gib:.2f}")


if __name__ == "__main__":
    main()
