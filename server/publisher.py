"""Mixture versions, per job: the recent history and the fan-out to watchers.

Everything here runs on the server's event loop. `publish` is called only
after the version is persisted in the store, so a watcher never sees a
version a restart could lose. A watcher subscribes before it replays the
history, and skips versions it already sent, so no version is missed or sent
twice between the replay and the live stream. At most `Limits.max_watchers`
streams are open at once, all jobs together; one more is refused with
RESOURCE_EXHAUSTED before it subscribes.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server.errors import NotFoundError
from gradmix.server.limits import Limits
from gradmix.server.metrics import ServerMetrics

#: Loads versions > after_version from the store (for replays older than the cache).
HistoryLoader = Callable[[str, int], Awaitable[Sequence[pb.Mixture]]]

#: A queue item that ends the watch (server shutting down).
_CLOSED = None
#: A queue item that ends the watch with NOT_FOUND (the job was deleted or archived).
_GONE = pb.Mixture()


@dataclass
class _Feed:
    recent: deque[pb.Mixture]
    watchers: set[asyncio.Queue[pb.Mixture | None]] = field(default_factory=set)


class MixturePublisher:
    """Latest and recent mixture versions of every job; live watch streams."""

    def __init__(self, metrics: ServerMetrics, load_history: HistoryLoader,
                 *, cache_versions: int = 1024, limits: Limits | None = None) -> None:
        self._metrics = metrics
        self._load_history = load_history
        self._cache_versions = cache_versions
        self._limits = limits or Limits()
        self._feeds: dict[str, _Feed] = {}
        self._watching = 0
        self._closed = False

    def add_job(self, job: str, history: Sequence[pb.Mixture]) -> None:
        """Start serving `job` with its stored history (ascending versions)."""
        if job not in self._feeds:
            self._feeds[job] = _Feed(deque(history[-self._cache_versions:],
                                           maxlen=self._cache_versions))
            self._metrics.watchers.labels(job).set(0)

    def latest(self, job: str) -> pb.Mixture | None:
        feed = self._feeds.get(job)
        return feed.recent[-1] if feed and feed.recent else None

    def latest_version(self, job: str) -> int:
        latest = self.latest(job)
        return latest.version if latest else 0

    async def get(self, job: str, version: int) -> pb.Mixture | None:
        """One version (0 = latest), from the cache or else the store."""
        if version == 0:
            return self.latest(job)
        for mixture in await self.history(job, version - 1, limit=1):
            if mixture.version == version:
                return mixture
        return None

    async def history(self, job: str, after_version: int, limit: int = 0) -> list[pb.Mixture]:
        """Versions > after_version, ascending; `limit` 0 = all."""
        feed = self._feeds[job]
        recent = list(feed.recent)
        if recent and after_version + 1 < recent[0].version:
            older = await self._load_history(job, after_version)
            recent = [m for m in older if m.version < recent[0].version] + recent
        start = bisect.bisect_right([m.version for m in recent], after_version)
        selected = recent[start:]
        return selected[:limit] if limit else selected

    def publish(self, job: str, mixture: pb.Mixture) -> None:
        """Make `mixture` the latest version and push it to every watcher."""
        feed = self._feeds[job]
        if feed.recent and mixture.version <= feed.recent[-1].version:
            return
        feed.recent.append(mixture)
        for queue in feed.watchers:
            queue.put_nowait(mixture)

    async def watch(self, job: str, after_version: int) -> AsyncIterator[pb.Mixture]:
        """Every version > after_version: the history, then live ones, until close.

        Raises:
            LimitExceededError: `max_watchers` streams are open already.
        """
        feed = self._feeds[job]
        self._limits.check_new_watcher(self._watching)
        queue: asyncio.Queue[pb.Mixture | None] = asyncio.Queue()
        feed.watchers.add(queue)
        self._watching += 1
        gauge = self._metrics.watchers.labels(job)
        gauge.inc()
        try:
            sent = after_version
            for mixture in await self.history(job, after_version):
                if mixture.version > sent:
                    yield mixture
                    sent = mixture.version
            while not self._closed:
                item = await queue.get()
                if item is _CLOSED:
                    return
                if item is _GONE:
                    raise NotFoundError(f"job {job!r} was deleted or archived while watched")
                if item.version > sent:
                    yield item
                    sent = item.version
        finally:
            feed.watchers.discard(queue)
            self._watching -= 1
            gauge.dec()

    def remove_job(self, job: str) -> None:
        """Stop serving `job`: its watch streams end with NOT_FOUND."""
        feed = self._feeds.pop(job, None)
        if feed is None:
            return
        for queue in feed.watchers:
            queue.put_nowait(_GONE)

    def close(self) -> None:
        """End every watch stream (server shutdown)."""
        self._closed = True
        for feed in self._feeds.values():
            for queue in feed.watchers:
                queue.put_nowait(_CLOSED)
