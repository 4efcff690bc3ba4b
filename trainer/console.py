"""The trainer's console: a progress bar on a terminal, compact lines when piped.

On a terminal (rank 0) a tqdm bar shows the steps with their rate and ETA,
the server's state first so that it survives an 80-column window, and log
records are routed through the bar so they never land on it. When stderr is
not a terminal (`kubectl logs`, a file, CI) the bar would write thousands of
carriage-return updates; instead one compact line goes to the log every
`every` seconds, and at the end.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from types import TracebackType
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

logger = logging.getLogger("gradmix.trainer")


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
        self._bar: Any = None
        self._stack = contextlib.ExitStack()
        self._started = time.monotonic()
        self._last_line = self._started
        self._first = initial
        self._text = ""

    def __enter__(self) -> Progress:
        if self.enabled and self.tty:
            self._bar = tqdm(total=self.total, initial=self.done, dynamic_ncols=True)
            self._stack.enter_context(logging_redirect_tqdm(loggers=[logging.getLogger()]))
        return self

    def update(self, status: str, details: str) -> None:
        """One step done; `status` (short, shown first) and `details` describe it now."""
        self.done += 1
        self._text = f"{status} {details}"
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self._text, refresh=False)
            self._bar.update(1)
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
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.done > self._first:
            self._line()
        self._stack.close()
