"""bench/sketch.py's schedule of a demo-sized run: which sources it sketches when."""

from __future__ import annotations

from bench_modules import load_bench
from gradmix.trainer.config import SketchingConfig

sketch = load_bench("sketch")


def test_the_default_schedule_anchors_once_and_sketches_late_tasks_once() -> None:
    d = SketchingConfig()
    anchors, sources = sketch.demo_schedule(1500, d.first_anchor, d.interval, d.reanchor_every,
                                            initial=9, late=2, late_at=600)
    assert (anchors, sources) == (1, 1 + 9 + 2)


def test_re_anchoring_sketches_the_target_and_every_registered_task_again() -> None:
    anchors, sources = sketch.demo_schedule(100, 0, 10, 40, initial=3, late=1, late_at=50)
    # anchors at 0 and 40 (3 tasks + target), the late task alone at 60 (the first sketch
    # point after its registration), the anchor at 80 with it
    assert (anchors, sources) == (3, 4 + 4 + 1 + 5)


def test_a_late_task_between_anchors_is_sketched_at_the_next_sketch_point_only() -> None:
    anchors, sources = sketch.demo_schedule(100, 0, 10, 60, initial=2, late=1, late_at=15)
    # anchor at 0 (3 sources), the late task at 20 (1), re-anchor at 60 (4)
    assert (anchors, sources) == (2, 3 + 1 + 4)
