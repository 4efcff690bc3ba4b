"""`MixtureWatch`: a mixture stream that survives server restarts.

It wraps the WatchMixture server stream. When the stream breaks (the server
restarts, the network drops, the server ends the stream on shutdown) it
reconnects with backoff and asks for every version after the last one it
delivered, so the server's history replay fills any gap: no version is
skipped, and a version at or below the last delivered one is dropped, so none
is delivered twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from gradmix.client.convert import mixture_from_pb
from gradmix.client.errors import Unavailable, from_rpc_error
from gradmix.client.retry import RetryPolicy
from gradmix.client.types import Mixture

#: Codes after which the stream is re-opened rather than the error raised.
RECONNECT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,  # a server shutting down cancels its streams
        grpc.StatusCode.ABORTED,
    }
)


class MixtureWatch(Iterator[Mixture]):
    """Iterator of a job's mixtures, oldest first, across reconnects.

    Args:
        open_stream: Opens a WatchMixture stream for `after_version`.
        job: The job watched (for messages).
        after_version: Deliver versions after this one.
        backoff: Sleeps between reconnects (its `max_attempts` is ignored).
        give_up_after: Seconds of failing to reconnect before raising
            `Unavailable` (None: keep trying until closed).
    """

    def __init__(
        self,
        open_stream: Callable[[int], Any],
        job: str,
        after_version: int,
        backoff: RetryPolicy,
        give_up_after: float | None = None,
    ) -> None:
        self._open = open_stream
        self._job = job
        self._last = after_version
        self._backoff = backoff
        self._give_up_after = give_up_after
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None
        self._opened = False
        self.reconnects = 0
        """How many times the stream was re-opened."""

    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
        return self._closed.is_set()

    def __iter__(self) -> MixtureWatch:
        return self

    def __next__(self) -> Mixture:
        retry, failing_since = 0, None
        while not self._closed.is_set():
            call = self._current_call()
            try:
                msg = next(call)
            except StopIteration:
                pass  # the server ended the stream (e.g. on shutdown): re-open
            except grpc.RpcError as error:
                if self._closed.is_set():
                    break
                if error.code() not in RECONNECT_CODES:
                    raise from_rpc_error(error) from error
            else:
                retry, failing_since = 0, None
                mixture = mixture_from_pb(msg)
                if mixture.version <= self._last:
                    continue  # already delivered before a reconnect
                self._last = mixture.version
                return mixture
            self._drop_call()
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            if self._give_up_after is not None and now - failing_since > self._give_up_after:
                raise Unavailable(
                    f"watch of job {self._job!r} could not reconnect "
                    f"for {self._give_up_after:.0f}s (last version {self._last})"
                )
            self._closed.wait(self._backoff.delay(retry))
            retry += 1
        raise StopIteration

    def _current_call(self) -> Any:
        with self._lock:
            if self._call is None:
                if self._opened:
                    self.reconnects += 1
                self._opened = True
                self._call = self._open(self._last)
            return self._call

    def _drop_call(self) -> None:
        with self._lock:
            if self._call is not None:
                self._call.cancel()
                self._call = None

    def close(self) -> None:
        """Stop watching; a blocked `next()` in another thread ends with StopIteration."""
        self._closed.set()
        self._drop_call()

    def __enter__(self) -> MixtureWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
