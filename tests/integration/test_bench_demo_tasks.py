"""Smoke test of bench/demo_tasks.py: a shortened run completes and its last line parses."""

from __future__ import annotations

import re
from types import ModuleType

import bench_modules
import pytest

LAST_LINE = re.compile(
    r"demo_tasks: baseline_ce=([\d.]+) best_helpful=([\w-]+):([\d.]+) "
    r"best_harmful=([\w-]+):([\d.]+) label_pairs_agreeing=(\d+)/(\d+)"
)


def load_bench() -> ModuleType:
    return bench_modules.load_bench("demo_tasks")


@pytest.mark.timeout(300)
def test_a_short_run_prints_every_task_and_its_last_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gradmix.demo.tasks import TASKS

    assert load_bench().main(["--seeds", "1", "--steps", "22"]) == 0
    out = capsys.readouterr().out
    for name in TASKS:
        assert name in out
    match = LAST_LINE.search(out.strip().splitlines()[-1])
    assert match is not None
    helpful = sum(t.label == "helpful" for t in TASKS.values()) - 1  # add3-extra is the baseline
    harmful = sum(t.label == "harmful" for t in TASKS.values())
    assert TASKS[match.group(2)].label == "helpful" and TASKS[match.group(4)].label == "harmful"
    pairs = helpful * harmful
    assert int(match.group(7)) == pairs and 0 <= int(match.group(6)) <= pairs


def test_bad_arguments_exit_2() -> None:
    assert load_bench().main(["--share", "1.5"]) == 2
