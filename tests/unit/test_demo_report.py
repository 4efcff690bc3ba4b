"""The demo's report: the live table shows late tasks entering, summary, PNG plot."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from gradmix.demo.report import (
    LiveTable,
    RunHistory,
    WeightPoint,
    plot_runs,
    progress_line,
    summarize,
)

LABELS = {"good": "helpful", "meh": "neutral", "bad": "harmful", "late": "helpful"}


@dataclass(frozen=True)
class _Mixture:
    """Stands in for gradmix.client.Mixture (same attribute names)."""

    version: int
    weights: dict[str, float]
    scores: dict[str, float] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    anchor: str = "a0"
    policy: str = "ensemble"


def test_live_table_marks_late_tasks_and_ignores_stale_versions() -> None:
    out = io.StringIO()
    table = LiveTable(labels=LABELS, stream=out, interactive=False, progress_every=0)
    table.on_mixture(_Mixture(1, {"good": 1 / 3, "meh": 1 / 3, "bad": 1 / 3}))
    table.on_mixture(
        _Mixture(
            3,
            {"good": 0.5, "meh": 0.2, "bad": 0.05, "late": 0.25},
            scores={"good": -0.2, "meh": 0.0, "bad": 0.3},
            states={"late": "pending", "good": "active"},
        )
    )
    table.on_mixture(_Mixture(2, {"good": 0.0, "meh": 1.0, "bad": 0.0}))  # stale: ignored
    table.on_progress(progress_line(run="gradmix", step=5, total=10, target_loss=1.5, version=3))
    rendered = table.render()
    assert "mixture v3" in rendered
    late_row = next(line for line in rendered.splitlines() if line.startswith("late"))
    assert "new in v3" in late_row and "pending" in late_row
    assert "new in" not in next(ln for ln in rendered.splitlines() if ln.startswith("good"))
    assert table.entered == {"good": 1, "meh": 1, "bad": 1, "late": 3}
    assert "[gradmix] step 5/10" in rendered and "target 1.5000" in rendered
    assert out.getvalue().count("policy=") == 2  # each accepted version printed once


def test_interactive_table_redraws_in_place() -> None:
    out = io.StringIO()
    table = LiveTable(labels=LABELS, stream=out, interactive=True)
    table.on_mixture(_Mixture(1, {"good": 0.5, "bad": 0.5}))
    table.on_progress("[gradmix] step 1/2")
    assert "\x1b[" in out.getvalue()  # cursor moved up to overwrite the old table


def test_summary_names_up_and_down_weighted_tasks_and_losses() -> None:
    final = _Mixture(4, {"good": 0.6, "meh": 0.25, "bad": 0.05, "late": 0.1})
    text = summarize(final, labels=LABELS, gradmix_loss=0.9, uniform_loss=1.0)
    up, down = text.split("down-weighted:")
    assert "good" in up and "bad" not in up
    assert "bad" in down and "late" in down and "good" not in down
    assert "gradmix 0.9000, uniform 1.0000 (-10.0% vs uniform)" in text


def test_plot_writes_a_png(tmp_path: Path) -> None:
    gradmix = RunHistory(
        name="gradmix",
        target_loss=[(0, 2.0), (10, 1.2)],
        weights=[
            WeightPoint(step=0, version=1, weights={"good": 0.5, "bad": 0.5}),
            WeightPoint(step=6, version=2, weights={"good": 0.7, "bad": 0.1, "late": 0.2}),
        ],
    )
    uniform = RunHistory(name="uniform", target_loss=[(0, 2.0), (10, 1.4)])
    path = plot_runs(
        tmp_path / "out" / "weights.png",
        gradmix=gradmix,
        uniform=uniform,
        labels=LABELS,
        total_steps=10,
    )
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
