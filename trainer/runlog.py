"""The per-rank JSON-lines run log: the audit trail of a training run.

Each rank appends to `<output_dir>/logs/rank-<r>.jsonl` one object per event:
which task every step drew, when each mixture version took effect, anchors,
sketches written, the server going away and coming back. A run can be
audited (did every rank switch at the same step?) and replayed from it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("gradmix.trainer")


def log_path(output_dir: str | Path, rank: int) -> Path:
    """Where rank `rank` writes its log."""
    return Path(output_dir) / "logs" / f"rank-{rank}.jsonl"


class RunLog:
    """Appends events of one rank; `message` events also go to Python logging."""

    def __init__(self, output_dir: str | Path, rank: int) -> None:
        self.rank = rank
        self.path = log_path(output_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Also hand every event written from now on to `listener` (e.g. metrics)."""
        self._listeners.append(listener)

    def event(
        self, event: str, message: str = "", *, level: int = logging.INFO, **fields: Any
    ) -> None:
        """Write one event (flushed at once, so a killed run keeps its trail); a `message`
        also goes to the console at `level` (WARNING/ERROR: the mixture is not being
        estimated as it should)."""
        record = {"time": time.time(), "rank": self.rank, "event": event, **fields}
        if message:
            record["message"] = message
            if level > logging.INFO:
                record["level"] = logging.getLevelName(level)
            logger.log(level, "rank %d: %s", self.rank, message)
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        for listener in self._listeners:
            listener(record)

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """All complete events of one rank's log, in order.

    An event is complete once its newline is written: text after the last newline
    is an event the rank is writing right now (or one a killed run left torn), so
    a log can be read while its run goes on."""
    text = Path(path).read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def _drop_torn_tail(path: Path) -> None:
    """Cut an unfinished last event (a run killed mid-write) off `path`, so that the
    events appended after it stay one per line."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            logger.warning(
                "%s: dropping %d bytes of an event a previous run left unfinished",
                path,
                len(data) - keep,
            )
            f.truncate(keep)
