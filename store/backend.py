"""The store backend seam: the key/value operations the sketch store needs, as a small ABC.

Modelled on zarr-python's ``zarr.abc.store.Store``: :class:`StoreBackend` says
what every place that keeps the store's bytes must offer, and one class per
kind of place implements it beside it (:class:`gradmix.store.local.LocalBackend`
for a directory, :class:`gradmix.store.objects.ObjectBackend` for fsspec
URLs: ``s3://``, ``memory://`` ...). Nothing above this seam asks which kind
of backend it has; what differs is said by the backend's methods and its
``writes_in_place`` flag. :func:`open_backend` picks the implementation from a URL.

Contract (tested against every backend in ``tests/integration/test_store_backends.py``):

- ``put`` replaces a key whole: a reader sees the old bytes or the new, never a mix;
- ``create`` publishes a key only if it is absent, in one step from a reader's
  view: a process killed inside it leaves the key absent or whole, and any
  scratch it leaves is hidden from ``list_dir`` (see :mod:`gradmix.store.names`);
- ``list_dir`` names what is directly under a prefix, bookkeeping left out;
- every write that the place refuses (read-only, full, no permission, gone)
  raises :class:`StoreUnavailableError`; reads are unaffected by it. Whoever
  watches the store's health (:meth:`StoreBackend.on_health`) hears of the
  first refused write and of the first write that works again.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradmix.store.errors import StoreError, StoreUnavailableError
from zarr.abc.store import Store


@dataclass(frozen=True)
class ChunkPiece:
    """New rows landing in one chunk of a row array.

    Attributes:
        key: the chunk's store key.
        offset: byte offset of the new rows inside the chunk.
        data: the new rows' bytes.
        chunk_nbytes: the size of a whole chunk.
        chunk: the whole chunk's bytes after the write (committed rows, new rows,
            zeros), when asked for (backends that can only replace whole keys).
    """

    key: str
    offset: int
    data: bytes
    chunk_nbytes: int
    chunk: bytes | None


HealthListener = Callable[[StoreUnavailableError | None], None]
"""Told each refused write (the error), and None when writes work again."""


class StoreBackend(ABC):
    """Where the sketch store keeps its bytes; see the module docstring for the contract."""

    writes_in_place: bool = False
    """True if new rows are written into chunk keys at an offset (no whole-chunk bytes needed)."""

    def __init__(self) -> None:
        self.unavailable: StoreUnavailableError | None = None
        """The last refused write while writes are failing; None while they work."""
        self._listeners: list[HealthListener] = []
        self._health_lock = threading.Lock()

    def on_health(self, listener: HealthListener) -> None:
        """Call ``listener(error)`` on every refused write and ``listener(None)`` on the first
        write that works after one (from whichever thread wrote)."""
        self._listeners.append(listener)

    @contextlib.contextmanager
    def writing(self, operation: str) -> Iterator[None]:
        """Run one write: a refusal becomes :class:`StoreUnavailableError` and health news.

        ``OSError`` covers a read-only or full disk, a missing permission, and
        object-storage errors (fsspec maps those to ``OSError`` subclasses).
        """
        try:
            yield
        except StoreError:  # a nested write's refusal is reported already
            raise
        except OSError as exc:
            error = StoreUnavailableError(operation, f"{type(exc).__name__}: {exc}")
            self._report(error)
            raise error from exc
        if self.unavailable is not None:
            self._report(None)

    def delete_tree(self, prefix: str) -> None:
        """Remove every key under ``prefix`` (a whole group and what it holds)."""
        from zarr.core.sync import sync

        with self.writing(f"delete {prefix}/"):
            sync(self.zarr_store.delete_dir(prefix))

    def _report(self, error: StoreUnavailableError | None) -> None:
        with self._health_lock:
            recovered = error is None and self.unavailable is not None
            self.unavailable = error
            if error is None and not recovered:
                return
        for listener in self._listeners:
            listener(error)

    @property
    @abstractmethod
    def zarr_store(self) -> Store:
        """The same place as a Zarr store (row arrays are created, resized and read through it)."""

    @abstractmethod
    def identity(self) -> str:
        """A string naming where the data lives (equal for two opens of the same place)."""

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The bytes under ``key``, or None if there is no such key."""

    @abstractmethod
    def get_ranges(self, spans: Sequence[tuple[str, int, int]]) -> list[bytes]:
        """Byte ranges ``(key, offset, length)``; a missing key reads as ``b""``."""

    @abstractmethod
    def list_dir(self, prefix: str) -> list[str]:
        """Names of the keys and sub-folders directly under ``prefix`` (unsorted), bookkeeping
        (Zarr metadata, scratch of writes in progress) left out."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing it whole."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` unless the key exists; True if this call created it."""

    @abstractmethod
    def create_marker(self, key: str, data: bytes) -> None:
        """Create a key whose existence is what matters (a commit marker); a no-op if present."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` if it exists."""

    @abstractmethod
    def write_pieces(self, pieces: Sequence[ChunkPiece]) -> None:
        """Write new rows into chunk keys (in place or as whole chunks: ``writes_in_place``)."""


def open_backend(url: str, storage_options: Mapping[str, Any] | None = None) -> StoreBackend:
    """Open a local directory (created if missing) or an fsspec URL as a store backend.

    Args:
        url: a filesystem path or ``file://`` URL (the embedded default), or any
            fsspec URL: ``memory://name`` (tests), ``s3://bucket/prefix`` (needs
            the ``s3`` extra, ``pip install 'gradmix[s3]'``; credentials come from
            the usual AWS environment/config, or ``storage_options``), ``gs://``,
            ``abfs://`` and so on with their fsspec packages.
        storage_options: passed to the fsspec filesystem (e.g. ``{"anon": False,
            "endpoint_url": "http://minio:9000"}``); not allowed for local paths.

    Raises:
        StoreError: the URL cannot be opened.
    """
    from gradmix.store.local import LocalBackend
    from gradmix.store.objects import ObjectBackend

    if not isinstance(url, str) or not url:
        raise StoreError(f"store URL must be a non-empty string, got {url!r}")
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" not in url:
        if storage_options:
            raise StoreError("storage_options apply to fsspec URLs, not to local paths")
        return LocalBackend(url)
    return ObjectBackend(url, storage_options)


def url_identity(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """`StoreBackend.identity` of the store at `url`, without creating a local directory."""
    local = url[len("file://") :] if url.startswith("file://") else url
    if "://" not in local:
        return f"file:{Path(local).expanduser().resolve()}"
    return open_backend(url, storage_options).identity()
