"""The trainer's console: a live progress bar on a terminal, compact lines when piped.

On a terminal (rank 0) a rich progress display shows the server's state first (so that
it survives an 80-column window), then the steps with their rate and the time left,
then the run's details, which are cut first when the window is narrow. The time left
is estimated over a window of recent steps, sketch points included. Log records are
routed through the display (rich's logging handler on the same console), so they
print above it and never land on it. When stderr is not a terminal (`kubectl logs`,
a file, CI) a live display would write thousands of redraws; instead one compact line
goes to the log every `every` seconds, and at the end.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from types import TracebackType

from gradmix.client import render
from rich import progress as rich_progress
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Column
from rich.text import Text

logger = logging.getLogger("gradmix.trainer")


class _Rate(rich_progress.ProgressColumn):
    """Steps per second ("?" until known)."""

    def render(self, task: rich_progress.Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} it/s" if speed else "? it/s")


#: Columns taken by all but the details column (status, bar, steps, rate, time left).
_KEPT = 56


def _kept() -> Column:
    """A column that is never wrapped or cut (the details column gives way instead)."""
    return Column(no_wrap=True, overflow="ignore")


@contextlib.contextmanager
def routed_logging(console: Console) -> Iterator[None]:
    """Send the root logger's console handlers' records through `console` (rich's
    logging handler, at each handler's level) while the block runs."""
    root = logging.getLogger()
    plain = [h for h in root.handlers
             if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout)]
    routed = [
        RichHandler(level=h.level, console=console, show_path=False, markup=False,
                    rich_tracebacks=False, log_time_format="%H:%M:%S")
        for h in plain
    ]
    for old, new in zip(plain, routed, strict=True):
        root.removeHandler(old)
        root.addHandler(new)
    try:
        yield
    finally:
        for old, new in zip(plain, routed, strict=True):
            root.removeHandler(new)
            root.addHandler(old)


class Progress:
    """Step progress of rank 0 (a no-op elsewhere).

    Args:
        total: steps of the run.
        initial: steps already done (a resumed run).
        enabled: whether this process shows progress (rank 0).
        every: seconds between compact lines when stderr is not a terminal.
        tty: whether stderr is a terminal (default: ask it).
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        *,
        enabled: bool = True,
        every: float = 30.0,
        tty: bool | None = None,
    ) -> None:
        self.total, self.done, self.enabled, self.every = total, initial, enabled, every
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._bar: rich_progress.Progress | None = None
        self._task: rich_progress.TaskID | None = None
        self._stack = contextlib.ExitStack()
        self._started = time.monotonic()
        self._last_line = self._started
        self._first = initial
        self._text = ""

    def __enter__(self) -> Progress:
        if self.enabled and self.tty:
            console = render.console(sys.stderr, tty=True)
            self._bar = rich_progress.Progress(
                rich_progress.TextColumn("{task.fields[status]}", table_column=_kept()),
                rich_progress.BarColumn(bar_width=12),
                rich_progress.MofNCompleteColumn(table_column=_kept()),
                _Rate(table_column=_kept()),
                rich_progress.TimeRemainingColumn(compact=True, table_column=_kept()),
                rich_progress.TextColumn(
                    "{task.fields[details]}",
                    table_column=Column(
                        no_wrap=True, overflow="ellipsis", max_width=max(8, console.width - _KEPT)
                    ),
                ),
                console=console,
                speed_estimate_period=120.0,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._task = self._bar.add_task(
                "train", total=self.total, completed=self.done, status="server=?", details=""
            )
            self._stack.enter_context(routed_logging(console))
            self._stack.enter_context(self._bar)
        return self

    def update(self, status: str, details: str) -> None:
        """One step done; `status` (short, shown first) and `details` describe it now."""
        self.done += 1
        self._text = f"{status} {details}"
        if not self.enabled:
            return
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=1, status=status, details=details)
        elif time.monotonic() - self._last_line >= self.every:
            self._line()

    def _line(self) -> None:
        self._last_line = now = time.monotonic()
        rate = (self.done - self._first) / max(now - self._started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f}s" if eta != float("inf") else "?"
        logger.info(
            "step %d/%d %.1f it/s eta %s %s", self.done, self.total, rate, eta_text, self._text
        )

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._bar is None and self.enabled and self.done > self._first:
            self._line()
        self._stack.close()
