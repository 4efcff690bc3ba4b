"""Smoke test of bench/outcome.py: a shortened run completes and its last line parses."""

from __future__ import annotations

import re
from types import ModuleType

import bench_modules
import pytest

LAST_LINE = re.compile(
    r"outcome: suites=(\d+) beats_uniform=(\d+) beats_proportional=(\d+) "
    r"beats_similarity=(\d+) loses_similarity=(\d+)"
)


def load_bench() -> ModuleType:
    return bench_modules.load_bench("outcome")


@pytest.mark.timeout(300)
def test_a_short_outcome_run_prints_its_tables_and_last_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = load_bench()
    argv = ["--suite", "near-misses", "--seeds", "2", "--steps", "60", "--first-anchor", "20",
            "--anchor-every", "20", "--similarity-temperatures", "1", "--no-single"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    for name in ("gradmix", "gradient_similarity", "uniform", "proportional"):
        assert name in out
    for name in ("gradmix", "gradient_similarity"):
        assert f"stability of {name}: redrawing the sketched rows" in out
    assert "gradmix − baseline, per seed (mean ± sd): uniform" in out
    assert re.search(r"^paired: beats_uniform=\d+ beats_proportional=\d+ beats_similarity=\d+ "
                     r"loses_similarity=\d+", out, re.MULTILINE)
    match = LAST_LINE.search(out.strip().splitlines()[-1])
    assert match is not None
    suites, *counts = map(int, match.groups())
    assert suites == 1 and all(0 <= c <= 1 for c in counts)


def test_a_win_counts_only_beyond_the_seed_spread() -> None:
    bench = load_bench()
    diff, spread = bench.spread_beyond([1.0, 1.2], [2.0, 2.2])
    assert diff == pytest.approx(-1.0) and spread == pytest.approx(0.1414, abs=1e-3)
    diff, spread = bench.spread_beyond([1.0, 2.0], [1.2, 1.3])
    assert abs(diff) < spread  # inside the spread: neither a win nor a loss


def test_a_paired_win_counts_beyond_the_spread_of_the_per_seed_differences() -> None:
    bench = load_bench()
    # Seeds move both methods together: apart, the spreads overlap; seed by seed, one
    # method is better by 0.1 ± 0.01 every time.
    ours, theirs = [1.0, 1.5, 2.0], [1.11, 1.6, 2.09]
    diff, spread = bench.spread_beyond(ours, theirs)
    assert abs(diff) < spread
    diff, spread = bench.paired_beyond(ours, theirs)
    assert diff == pytest.approx(-0.1) and spread == pytest.approx(0.01)
