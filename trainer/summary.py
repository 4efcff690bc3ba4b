"""The end-of-run summary: what gradmix did for this run, in a few plain lines.

Written by rank 0 to the console and, as one `summary` event, to its run
log: the mixture versions applied and at which steps, the anchors completed,
the tasks never sketched and why, the time spent sketching and waiting on
the server, and a plain sentence when no estimated mixture was ever applied
(the run then trained on the uniform or prior mixture the server gives
before its first estimate, which is what a misconfigured run looks like).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """What a finished (or stopped) run reports."""

    steps: int
    """Optimizer steps done."""
    versions: list[tuple[int, int, str]] = field(default_factory=list)
    """(version, step it took effect, anchor it was estimated at; "" = not estimated)."""
    anchors_completed: list[tuple[str, int]] = field(default_factory=list)
    """(anchor, step) of each anchor this run completed."""
    open_anchor: str = ""
    """An anchor declared but never completed ("" if none)."""
    never_sketched: dict[str, str] = field(default_factory=dict)
    """Task → why it was never sketched in this run."""
    sketch_seconds: float = 0.0
    """Wall time in sketch points (sketching, store writes, commits)."""
    server_seconds: float = 0.0
    """Wall time waiting on the server (first mixture, sketch-point calls)."""
    stopped_by: str = ""
    """The server refusal that ended the run ("" if it ran to the end)."""

    @property
    def estimated(self) -> bool:
        """Whether any applied mixture was estimated from sketches."""
        return any(anchor for _, _, anchor in self.versions)

    def lines(self) -> list[str]:
        """The summary as console lines."""
        applied = ", ".join(
            f"v{v}@{s}" + ("" if a else " (not estimated)") for v, s, a in self.versions
        )
        out = [
            f"run summary: {self.steps} steps; mixture versions applied (version@step): "
            f"{applied or 'none'}",
            "anchors completed: "
            + (", ".join(f"{n} (step {s})" for n, s in self.anchors_completed) or "none")
            + (f"; {self.open_anchor} never completed" if self.open_anchor else ""),
            f"time sketching {self.sketch_seconds:.1f} s, waiting on the server "
            f"{self.server_seconds:.1f} s",
        ]
        for task, why in sorted(self.never_sketched.items()):
            out.append(f"never sketched: {task}: {why}")
        if self.stopped_by:
            out.append(f"stopped: the server refused: {self.stopped_by}")
        if not self.estimated:
            out.append(
                "gradmix never produced an estimated mixture for this run: it trained on the "
                "server's uniform (prior) mixture; see the warnings above and the run log"
            )
        return out

    def report(self, log: Any, logger: logging.Logger) -> None:
        """Console lines (WARNING when nothing was estimated) and a `summary` event."""
        level = logging.INFO if self.estimated and not self.never_sketched else logging.WARNING
        for line in self.lines():
            logger.log(level, "%s", line)
        log.event("summary", estimated=self.estimated, **asdict(self))


def build_summary(
    *,
    steps: int,
    history: Sequence[Mapping[str, Any]],
    anchors: Any,
    configured_tasks: Sequence[str],
    first_wait_seconds: float,
    stopped_by: str = "",
) -> RunSummary:
    """The summary from a run's mixture history and its `AnchorProtocol`."""
    from gradmix.trainer.anchors import TARGET_KEY

    known = set(configured_tasks) | set(anchors.known_tasks)
    never = {
        t: anchors.problems.get(t, "no sketch point reached it (server away or run too short)")
        for t in sorted(known - anchors.sketched_ever)
    }
    if TARGET_KEY not in anchors.sketched_ever:
        never[TARGET_KEY] = anchors.problems.get(TARGET_KEY, "no sketch point completed it")
    state = anchors.state
    return RunSummary(
        steps=steps,
        versions=[(int(h["version"]), int(h["step"]), str(h["anchor"])) for h in history],
        anchors_completed=list(anchors.completed),
        open_anchor=state.name if state.name and not state.complete else "",
        never_sketched=never,
        sketch_seconds=anchors.sketch_seconds,
        server_seconds=anchors.server_seconds + first_wait_seconds,
        stopped_by=stopped_by,
    )
