"""Demo tasks: what each of the demo's tasks really does to the target, next to its own data.

    python bench/demo_tasks.py [--seeds 3] [--steps 400] [--share 0.3]

The demo's tasks carry labels (helpful / neutral / harmful, `gradmix.demo.tasks`)
that describe their data, not their measured effect. This bench measures the
effect in the situation the demo's final mixture decides: the target's own
distribution (`add3-extra`) is at hand, and the question is what giving a
share of the steps to another task costs. Every run trains bench/outcome.py's
tiny GPT-2 (same schedule, same evaluation: token cross-entropy on 256
held-out target examples) on a fixed mixture:

- baseline: `add3-extra` alone;
- for every other demo task t: `add3-extra` at 1 − share, t at share.

It prints each task's mean target loss over the seeds, its ratio to the
baseline, and how many (helpful, harmful) label pairs the measured losses
order as the labels do.

Last line: ``demo_tasks: baseline_ce=<> best_helpful=<task>:<ratio>
best_harmful=<task>:<ratio> label_pairs_agreeing=<k>/<n>`` (ratios of mean
target loss to the baseline's, same run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from gradmix.demo.tasks import TARGET, TASKS
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outcome import Method, Settings, run, suite_data
from suites import Suite, SuiteTask

HOME = "add3-extra"
POOL = 2000  # examples per task, as the demo writes them


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--share", type=float, default=0.3, help="the other task's share of steps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.share < 1 or args.seeds < 1 or args.steps <= Settings().warmup:
        print("demo_tasks: need 0 < --share < 1, --seeds >= 1 and --steps > the warm-up",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    names = list(TASKS)
    suite = Suite(name="demo", description="the demo's tasks", target=TARGET.make_example,
                  tasks=tuple(SuiteTask(name=n, label=TASKS[n].label, size=POOL,
                                        make=TASKS[n].make_example) for n in names))
    settings = Settings(steps=args.steps)
    mixtures = {HOME: {HOME: 1.0}}
    mixtures |= {n: {HOME: 1.0 - args.share, n: args.share} for n in names if n != HOME}
    losses: dict[str, list[float]] = {key: [] for key in mixtures}
    for seed in range(args.seeds):
        data = suite_data(suite, seed, 0)
        for key, mixture in mixtures.items():
            method = Method(key, fixed={n: mixture.get(n, 0.0) for n in names})
            losses[key].append(float(run(suite, data, method, seed, settings)))
    mean = {key: statistics.fmean(v) for key, v in losses.items()}
    baseline = mean[HOME]
    table = Table(title=f"{HOME} at {1 - args.share:g} and one other task at {args.share:g}")
    for column in ("other task", "label", "mean target CE", "± sd", "ratio to alone"):
        table.add_column(column, justify="left" if column in ("other task", "label") else "right")
    for key in sorted(mean, key=lambda k: mean[k]):
        sd = statistics.stdev(losses[key]) if args.seeds > 1 else float("nan")
        table.add_row("(none)" if key == HOME else key, TASKS[key].label if key != HOME else "-",
                      f"{mean[key]:.4f}", f"{sd:.4f}", f"{mean[key] / baseline:.2f}")
    Console(width=120).print(table)
    others = [n for n in names if n != HOME]
    helpful = [n for n in others if TASKS[n].label == "helpful"]
    harmful = [n for n in others if TASKS[n].label == "harmful"]
    agreeing = sum(mean[h] < mean[b] for h in helpful for b in harmful)
    best_helpful = min(helpful, key=lambda n: mean[n])
    best_harmful = min(harmful, key=lambda n: mean[n])
    print(f"demo_tasks: baseline_ce={baseline:.4f} "
          f"best_helpful={best_helpful}:{mean[best_helpful] / baseline:.2f} "
          f"best_harmful={best_harmful}:{mean[best_harmful] / baseline:.2f} "
          f"label_pairs_agreeing={agreeing}/{len(helpful) * len(harmful)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
