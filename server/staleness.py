"""Pending is not forever: the decaying weight of a task that stays pending.

A pending task (registered, no rows at the current anchor) carries the job's
prior weight (`gradmix.server.compose`): it is sampled like an average task
until its sketch arrives. A task that never gets one — a typo in its name,
data nobody can load and nobody reported — would keep that share for good:
two typos once sent 40% of a mixture to tasks no loader could draw.

So each pending task's *streak* is counted: the complete anchors in a row,
ending at the current one and going back in the order that picks the
current anchor (`run_order`), that were declared after the task registered
and hold none of its rows; and the time it has waited, since the first
anchor of the streak was declared (or since it registered, or since the
current anchor was declared, whichever is later, for an empty streak).

A task is *stale* once its streak passes `StalePolicy.anchors` anchors or it
has waited `StalePolicy.seconds`. Its weight is then multiplied by
0.5^k, k the larger of the anchors beyond the bound and the whole periods
of `seconds` waited, and the mixture renormalised: each further anchor (or
period) halves it, towards 0, never below. Decay applies only while some
task is active (there is someone to give the weight to); the stale tasks
are listed in the mixture version, counted in the metrics and logged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from gradmix.server.compose import Composition
from gradmix.store import AnchorInfo, TaskInfo
from gradmix.vocabulary import AnchorState, TaskState

#: A streak is not followed back further than this many anchors past the bound
#: (0.5^64 of a weight is nothing).
MAX_EXTRA_ANCHORS = 64


@dataclass(frozen=True, kw_only=True)
class StalePolicy:
    """When a pending task counts as stale (0 switches a rule off)."""

    anchors: int
    """A task pending at more than this many complete anchors in a row is stale."""
    seconds: float
    """A task pending this long is stale; each further period halves its weight again."""

    def halvings(self, anchors: int, waited: float) -> int:
        """k: how many times a task pending `anchors` anchors / `waited` seconds is halved."""
        by_anchors = anchors - self.anchors if self.anchors > 0 else 0
        by_time = math.floor(waited / self.seconds) if self.seconds > 0 else 0
        return max(0, by_anchors, by_time)


@dataclass(frozen=True)
class Streak:
    """How long a pending task has waited."""

    anchors: int
    since: float


def run_order(anchors: Iterable[AnchorInfo]) -> Callable[[AnchorInfo], tuple[float, int, float]]:
    """Sort key of anchors: runs by when their first anchor was declared, anchors
    within a run by step, then by declaration (`jobstate.current_anchor` picks the
    greatest complete one)."""
    started: dict[str, float] = {}
    for anchor in anchors:
        started[anchor.run] = min(started.get(anchor.run, anchor.declared_at), anchor.declared_at)
    return lambda a: (started[a.run], a.step, a.declared_at)


def pending_streaks(tasks: Sequence[TaskInfo], pending: Collection[str],
                    anchors: Sequence[AnchorInfo], current: str,
                    sourced: Callable[[str], Collection[str]], limit: int) -> dict[str, Streak]:
    """Each pending task's streak (see the module docstring).

    Args:
        tasks: the job's tasks.
        pending: the names of those pending at `current`.
        anchors: the job's anchors.
        current: the current anchor ("" if none: every streak is empty).
        sourced: an anchor's name -> the tasks with rows there.
        limit: the most anchors a streak is followed back.
    """
    complete = sorted((a for a in anchors if a.state == AnchorState.COMPLETE),
                      key=run_order(anchors))
    names = [a.name for a in complete]
    upto = complete[:names.index(current) + 1] if current in names else []
    declared = upto[-1].declared_at if upto else 0.0
    streaks: dict[str, Streak] = {}
    for task in tasks:
        if task.name not in pending:
            continue
        count, since = 0, max(task.registered_at, declared)
        for anchor in reversed(upto):
            if (count >= limit or anchor.declared_at < task.registered_at
                    or task.name in sourced(anchor.name)):
                break
            count, since = count + 1, anchor.declared_at
        streaks[task.name] = Streak(count, since)
    return streaks


def decayed(composition: Composition, streaks: dict[str, Streak], policy: StalePolicy,
            now: float) -> Composition:
    """`composition` with each stale pending task's weight halved k times, renormalised,
    and every pending task's streak and the stale tasks recorded."""
    counts = {t: s.anchors for t, s in streaks.items()}
    if not any(composition.states.get(t) == TaskState.ACTIVE and w > 0
               for t, w in composition.weights.items()):
        return dataclasses.replace(composition, pending_anchors=counts)
    halvings = {t: policy.halvings(s.anchors, now - s.since) for t, s in streaks.items()
                if composition.states.get(t) == TaskState.PENDING}
    stale = tuple(t for t in composition.weights if halvings.get(t, 0) > 0)
    if not stale:
        return dataclasses.replace(composition, pending_anchors=counts)
    raw = {t: w * 0.5 ** halvings[t] if t in stale else w for t, w in composition.weights.items()}
    total = sum(raw.values())
    return dataclasses.replace(composition, weights={t: w / total for t, w in raw.items()},
                               pending_anchors=counts, stale=stale)


def next_change(streaks: dict[str, Streak], policy: StalePolicy, now: float) -> float | None:
    """The next time a pending task's time-based halving count grows (None: never)."""
    if policy.seconds <= 0 or not streaks:
        return None
    return min(s.since + (math.floor((now - s.since) / policy.seconds) + 1) * policy.seconds
               for s in streaks.values())
