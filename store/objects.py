"""The object-storage backend: any fsspec URL (``s3://``, ``gs://``, ``memory://`` ...).

Keys are objects. An object PUT replaces the object whole, so ``put`` and
chunk writes (the writer keeps each touched chunk in memory and PUTs it
whole) are atomic from a reader's view, and a killed process leaves either
the old object or the new. There are no folders to leave behind: a key
that was never PUT does not exist.

``create`` is a conditional PUT (``If-None-Match: *``) where the filesystem
offers one (s3fs: ``mode="create"``), so of two racing creators exactly one
wins; elsewhere it is check-then-put, and the last of two simultaneous
creators wins (in a deployment the server is the one process that declares
jobs, tasks, anchors and mixture versions).

Listings are never served from fsspec's per-process listing cache: commit
markers other processes create must show up at the next look.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from gradmix.store.backend import ChunkPiece, StoreBackend
from gradmix.store.errors import StoreError
from gradmix.store.names import is_bookkeeping
from zarr.abc.store import RangeByteRequest, Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore

_PROTO = default_buffer_prototype()


class ObjectBackend(StoreBackend):
    """A store under an fsspec URL."""

    writes_in_place = False

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        try:
            self._zarr = FsspecStore.from_url(url, storage_options=dict(storage_options or {}))
        except (ImportError, ValueError, TypeError) as exc:
            raise StoreError(f"cannot open store {url!r}: {exc}") from exc
        pipe = getattr(self._zarr.fs, "_pipe_file", None)
        self._conditional = pipe is not None and "mode" in inspect.signature(pipe).parameters

    @property
    def zarr_store(self) -> Store:
        return self._zarr

    def identity(self) -> str:
        protocol = self._zarr.fs.protocol
        name = protocol if isinstance(protocol, str) else protocol[0]
        return f"{name}:{self._zarr.path}"

    def get(self, key: str) -> bytes | None:
        buf = sync(self._zarr.get(key, prototype=_PROTO))
        return None if buf is None else buf.to_bytes()

    def get_ranges(self, spans: Sequence[tuple[str, int, int]]) -> list[bytes]:
        async def get_all() -> list[bytes]:
            bufs = await asyncio.gather(
                *(self._zarr.get(k, prototype=_PROTO, byte_range=RangeByteRequest(o, o + n))
                  for k, o, n in spans)
            )
            return [b"" if b is None else b.to_bytes() for b in bufs]

        return sync(get_all())

    def list_dir(self, prefix: str) -> list[str]:
        # fsspec caches listings per process; other processes' keys must show up.
        self._zarr.fs.invalidate_cache(self._path(prefix.rstrip("/")))

        async def collect() -> list[str]:
            return [name async for name in self._zarr.list_dir(prefix)]

        return [n for n in sync(collect()) if not is_bookkeeping(n)]

    def put(self, key: str, data: bytes) -> None:
        with self.writing(f"put {key}"):
            sync(self._zarr.set(key, _PROTO.buffer.from_bytes(data)))

    def create(self, key: str, data: bytes) -> bool:
        with self.writing(f"create {key}"):
            if not self._conditional:
                if sync(self._zarr.exists(key)):
                    return False
                sync(self._zarr.set(key, _PROTO.buffer.from_bytes(data)))
                return True
            try:
                sync(self._zarr.fs._pipe_file(self._path(key), data, mode="create"))
            except FileExistsError:
                return False
            return True

    def create_marker(self, key: str, data: bytes) -> None:
        self.create(key, data)

    def delete(self, key: str) -> None:
        with self.writing(f"delete {key}"):
            sync(self._zarr.delete(key))

    def write_pieces(self, pieces: Sequence[ChunkPiece]) -> None:
        if any(p.chunk is None for p in pieces):
            raise StoreError("whole chunks are needed to write to object storage")

        async def put_all() -> None:
            await asyncio.gather(
                *(self._zarr.set(p.key, _PROTO.buffer.from_bytes(p.chunk or b"")) for p in pieces)
            )

        with self.writing(f"write {len(pieces)} chunks under {pieces[0].key if pieces else ''}"):
            sync(put_all())

    def _path(self, key: str) -> str:
        return f"{self._zarr.path}/{key}" if self._zarr.path else key
