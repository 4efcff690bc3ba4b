"""Pending streaks and the decay of a stale pending task's weight (`gradmix.server.staleness`)."""

from __future__ import annotations

import pytest
from gradmix.server.compose import Composition
from gradmix.server.staleness import (
    StalePolicy,
    Streak,
    decayed,
    next_change,
    pending_streaks,
)
from gradmix.store import AnchorInfo, TaskInfo


def task(name: str, registered_at: float) -> TaskInfo:
    return TaskInfo(name=name, metadata={}, registered_at=registered_at)


def anchor(name: str, step: int, declared_at: float, state: str = "complete",
           run: str = "") -> AnchorInfo:
    return AnchorInfo(name, step, state, declared_at, run=run)


ANCHORS = [anchor("a0", 0, 10.0), anchor("a1", 100, 20.0), anchor("a2", 200, 30.0),
           anchor("a3", 300, 40.0, state="open")]
ROWS = {"a0": {"help", "late"}, "a1": {"help"}, "a2": {"help"}}


def test_a_streak_counts_complete_anchors_in_a_row_declared_after_registration() -> None:
    tasks = [task("help", 0.0), task("ghost", 0.0), task("late", 0.0), task("new", 25.0),
             task("newest", 35.0)]
    streaks = pending_streaks(tasks, {"ghost", "late", "new", "newest"}, ANCHORS, "a2",
                              lambda a: ROWS[a], limit=100)
    assert streaks == {
        "ghost": Streak(3, 10.0),   # missed a0, a1, a2 (a3 is open: not counted)
        "late": Streak(2, 20.0),    # sketched at a0, missed a1 and a2
        "new": Streak(1, 30.0),     # registered after a1 was declared
        "newest": Streak(0, 35.0),  # registered after the current anchor: waits since then
    }
    assert pending_streaks(tasks, {"ghost"}, ANCHORS, "a2", lambda a: ROWS[a],
                           limit=2)["ghost"] == Streak(2, 20.0)
    assert pending_streaks(tasks, {"ghost"}, ANCHORS, "", lambda a: set(), limit=9) == {
        "ghost": Streak(0, 0.0)}


def test_a_streak_follows_the_anchor_order_across_runs() -> None:
    # Run r2 started later: its step-0 anchor comes after r1's step-500 one.
    anchors = [anchor("r1-500", 500, 10.0, run="r1"), anchor("r2-0", 0, 20.0, run="r2"),
               anchor("r2-100", 100, 30.0, run="r2")]
    rows = {"r1-500": set(), "r2-0": {"x"}, "r2-100": set()}
    streaks = pending_streaks([task("x", 0.0), task("y", 0.0)], {"x", "y"}, anchors, "r2-100",
                              lambda a: rows[a], limit=9)
    assert streaks == {"x": Streak(1, 30.0), "y": Streak(3, 10.0)}


def test_halvings_by_anchors_and_by_time() -> None:
    policy = StalePolicy(anchors=2, seconds=100.0)
    assert [policy.halvings(n, 0.0) for n in range(5)] == [0, 0, 0, 1, 2]
    assert [policy.halvings(0, t) for t in (99.9, 100.0, 250.0)] == [0, 1, 2]
    assert policy.halvings(4, 250.0) == 2
    assert StalePolicy(anchors=0, seconds=0.0).halvings(50, 1e9) == 0  # both rules off


def composition(weights: dict[str, float], states: dict[str, str]) -> Composition:
    return Composition(weights=weights, scores=dict.fromkeys(weights, 0.0), states=states,
                       anchor_loss=1.0, estimated_loss=0.9, subsets_estimated=1)


def test_a_stale_task_s_weight_halves_and_the_mixture_is_renormalised() -> None:
    mix = composition({"a": 0.4, "b": 0.4, "ghost": 0.2},
                      {"a": "active", "b": "active", "ghost": "pending"})
    policy = StalePolicy(anchors=1, seconds=0.0)
    fresh = decayed(mix, {"ghost": Streak(1, 0.0)}, policy, now=5.0)
    assert fresh.weights == mix.weights and fresh.stale == ()
    assert fresh.pending_anchors == {"ghost": 1}
    once = decayed(mix, {"ghost": Streak(2, 0.0)}, policy, now=5.0)
    assert once.stale == ("ghost",)
    assert once.weights["ghost"] == pytest.approx(0.1 / 0.9)
    assert once.weights["a"] == pytest.approx(0.4 / 0.9)
    assert sum(once.weights.values()) == pytest.approx(1.0)
    twice = decayed(mix, {"ghost": Streak(3, 0.0)}, policy, now=5.0)
    assert twice.weights["ghost"] == pytest.approx(0.05 / 0.85)
    assert 0 < twice.weights["ghost"] < once.weights["ghost"]


def test_no_decay_without_an_active_task_to_give_the_weight_to() -> None:
    mix = composition({"x": 0.5, "y": 0.5}, {"x": "pending", "y": "pending"})
    out = decayed(mix, {"x": Streak(9, 0.0), "y": Streak(0, 0.0)},
                  StalePolicy(anchors=1, seconds=0.0), now=1.0)
    assert out.weights == mix.weights and out.stale == ()


def test_the_next_time_decay_moves() -> None:
    policy = StalePolicy(anchors=2, seconds=100.0)
    streaks = {"x": Streak(0, 50.0), "y": Streak(0, 10.0)}
    assert next_change(streaks, policy, now=130.0) == 150.0   # x turns stale at 150
    assert next_change(streaks, policy, now=160.0) == 210.0   # y halves again at 210
    assert next_change(streaks, StalePolicy(anchors=2, seconds=0.0), now=1.0) is None
    assert next_change({}, policy, now=1.0) is None
