"""Smoke test of bench/fidelity.py: the --quick run completes and its last line parses."""

from __future__ import annotations

import math
import re
from types import ModuleType

import bench_modules
import pytest

LAST_LINE = re.compile(
    r"fidelity: skill=(\S+) spearman=(\S+) rel_err=(\S+) rel_rss=(\S+) "
    r"do_nothing_rel_err=(\S+) noise_floor=(\S+)"
)


def load_bench() -> ModuleType:
    return bench_modules.load_bench("fidelity")


@pytest.mark.timeout(180)
def test_quick_run_prints_a_finite_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench()
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    match = LAST_LINE.fullmatch(out[-1])
    assert match, out[-1]
    values = [float(v) for v in match.groups()]
    assert all(math.isfinite(v) for v in values), out[-1]
    skill, spearman, rel_err, rel_rss, nothing, noise = values
    assert -1.0 <= spearman <= 1.0
    assert rel_err >= 0 and rel_rss >= 0 and nothing > 0 and noise >= 0
    assert math.isclose(skill, 1 - rel_err / nothing, abs_tol=0.01)  # one run: exact up to rounding
    # both regimes and both projectors are reported, and forward selection ran
    text = "\n".join(out)
    for word in ("matched", "trainer", "structured", "dense", "selection", "c.skill"):
        assert word in text
    # the matched horizon's first-order check (the ceiling's skill per shape) is printed
    assert "first order at the matched horizon" in text
    assert any(line.strip().startswith("gpt2-tied:") for line in out)


def test_defaults_follow_the_trainer() -> None:
    from gradmix.trainer.config import SketchingConfig

    bench = load_bench()
    args = bench.parse_args([])
    trainer = SketchingConfig()
    assert (args.value_kind, args.projector, args.dim) == (
        trainer.value_kind,
        trainer.projector,
        trainer.dim,
    )
    # the last line's value kind follows the trainer's too
    assert args.value_kind in args.value_kinds
