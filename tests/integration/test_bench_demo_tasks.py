"""Smoke test of bench/demo_tasks.py: a shortened run completes and its last line parses."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
LAST_LINE = re.compile(
    r"demo_tasks: baseline_ce=([\d.]+) best_helpful=([\w-]+):([\d.]+) "
    r"best_harmful=([\w-]+):([\d.]+) label_pairs_agreeing=(\d+)/(\d+)"
)


def load_bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # the bench imports outcome and suites by name
    spec = importlib.util.spec_from_file_location("bench_demo_tasks", BENCH / "demo_tasks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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
