"""Row columns: the growing Zarr arrays a writer appends to, and how their chunks are written.

A column is a Zarr v3 array of rows (``grads`` (n, d), ``values`` (n,),
``example_ids`` (n,)) with an uncompressed little-endian ``bytes`` codec and
a regular chunk grid along the rows. For such an array a chunk's stored bytes
are exactly the C-order little-endian bytes of the full chunk block, so the
column's one writer encodes chunks itself instead of going through Zarr's
async codec pipeline on every call. Reads of committed rows go straight to
the chunks the same way (any Zarr reader can read the arrays too).

Chunks are uncompressed on purpose: projected gradients are dense and
Gaussian-like, so general-purpose codecs (zstd, lz4, blosc with shuffle) save
little on them, while uncompressed chunks are what allow the in-place writes
below.

How a chunk is written is the backend's business
(``StoreBackend.write_pieces``), and both ways leave every committed row of a
chunk intact at every instant: a backend that ``writes_in_place`` (a local
directory) gets the new rows' bytes and their offset; any other gets each
touched chunk whole (committed rows, new rows, zeros), kept in memory here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import zarr
from gradmix.store.backend import ChunkPiece, StoreBackend
from gradmix.store.errors import StoreError
from zarr.abc.store import Store
from zarr.codecs import BytesCodec
from zarr.codecs.bytes import Endian
from zarr.errors import ContainsArrayError
from zarr.types import AnyArray

INITIAL_ROWS = 1 << 16
"""Rows a new array's metadata spans. Unwritten chunks cost nothing, and every
resize rewrites the metadata key, which on ext4 (a rename over an existing
file) waits for a data flush: a generous span keeps resizes rare."""


class RowColumn:
    """One growing array of rows, appended to by exactly one writer."""

    def __init__(
        self,
        backend: StoreBackend,
        path: str,
        row_shape: tuple[int, ...],
        dtype: str,
        chunk_rows: int,
    ) -> None:
        self.path = path
        self._backend = backend
        with backend.writing(f"create the array {path}"):
            self.array = _open_or_create(
                backend.zarr_store, path, row_shape, dtype, chunk_rows
            )
        self._row_shape = row_shape
        self._rows = int(self.array.chunks[0])
        self._dtype = np.dtype(self.array.dtype).newbyteorder("<")
        self._tail = np.zeros((self._rows, *row_shape), dtype=self._dtype)
        self._row_bytes = self._tail[:1].nbytes
        self._tail_index = -1  # the chunk held in _tail; -1: none yet

    @property
    def capacity(self) -> int:
        """Rows the array's metadata currently spans (committed or not)."""
        return int(self.array.shape[0])

    def load_tail(self, committed: int) -> None:
        """Load the committed part of the chunk that row ``committed`` falls in."""
        index = committed // self._rows
        self._tail[:] = 0
        start = index * self._rows
        if committed > start:
            self._tail[: committed - start] = self.array[start:committed]
        self._tail_index = index

    def pieces(self, start: int, rows: np.ndarray, *, whole: bool) -> list[ChunkPiece]:
        """The chunk writes that put ``rows`` at ``[start, start + len(rows))``.

        ``whole`` asks for each touched chunk's full bytes as well.

        Calls must cover consecutive ranges, the first starting at the count
        given to :meth:`load_tail`.
        """
        out: list[ChunkPiece] = []
        pos, done = start, 0
        zeros = (0,) * len(self._row_shape)
        while done < rows.shape[0]:
            index, first = divmod(pos, self._rows)
            if index != self._tail_index:
                self._tail[:] = 0
                self._tail_index = index
            take = min(self._rows - first, rows.shape[0] - done)
            self._tail[first : first + take] = rows[done : done + take]
            key = f"{self.path}/{self.array.metadata.encode_chunk_key((index, *zeros))}"
            data = self._tail[first : first + take].tobytes()
            chunk = self._tail.tobytes() if whole else None
            out.append(ChunkPiece(key, first * self._row_bytes, data, self._tail.nbytes, chunk))
            pos, done = pos + take, done + take
        return out

    def grow(self, rows: int) -> None:
        """Make the metadata span at least ``rows`` rows (never shrinks)."""
        if self.array.shape[0] < rows:
            with self._backend.writing(f"resize the array {self.path}"):
                self.array.resize((rows, *self._row_shape))


def _open_or_create(
    store: Store, path: str, row_shape: tuple[int, ...], dtype: str, chunk_rows: int
) -> AnyArray:
    try:
        array = zarr.create_array(
            store, name=path, shape=(INITIAL_ROWS, *row_shape), chunks=(chunk_rows, *row_shape),
            dtype=dtype, filters=None, compressors=None,
            serializer=BytesCodec(endian="little"), fill_value=0,
        )
    except ContainsArrayError:
        array = zarr.open_array(store, path=path, mode="r+")
    if not is_plain(array, row_shape):
        raise StoreError(f"array {path!r} does not have the store's plain row layout")
    return array


def is_plain(array: AnyArray, row_shape: tuple[int, ...]) -> bool:
    """True if chunks are whole rows, stored uncompressed and little-endian."""
    codecs: tuple[object, ...] = tuple(getattr(array.metadata, "codecs", ()))
    return (
        tuple(array.shape)[1:] == row_shape
        and tuple(array.chunks)[1:] == row_shape
        and len(codecs) == 1
        and isinstance(codecs[0], BytesCodec)
        and codecs[0].endian in (None, Endian.little)
    )


def read_range(backend: StoreBackend, array: AnyArray, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a plain row array, read from its chunks directly.

    Only for rows below a writer's committed count: their chunks exist in full.

    Raises:
        StoreError: a chunk is missing or short (the store was damaged).
    """
    rows, row_shape = int(array.chunks[0]), tuple(array.shape)[1:]
    dtype = np.dtype(array.dtype).newbyteorder("<")
    row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
    zeros = (0,) * len(row_shape)
    spans = []  # (chunk key, first row in chunk, row count)
    pos = start
    while pos < stop:
        index, first = divmod(pos, rows)
        take = min(rows - first, stop - pos)
        key = f"{array.path}/{array.metadata.encode_chunk_key((index, *zeros))}"
        spans.append((key, first, take))
        pos += take
    blobs = _read_spans(backend, [(k, f * row_bytes, t * row_bytes) for k, f, t in spans])
    data = blobs[0] if len(blobs) == 1 else b"".join(blobs)
    # A read-only view of the bytes; callers copy once when they assemble rows.
    return np.frombuffer(data, dtype=dtype).reshape((stop - start, *row_shape))


def _read_spans(backend: StoreBackend, spans: Sequence[tuple[str, int, int]]) -> list[bytes]:
    """Byte ranges (key, offset, length) of chunks, each checked to be complete."""
    blobs = backend.get_ranges(spans)
    for (key, _, length), blob in zip(spans, blobs, strict=True):
        if len(blob) != length:
            raise StoreError(f"chunk {key!r} is missing or short: committed rows unreadable")
    return blobs
