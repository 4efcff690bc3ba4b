"""RowWriter: appends sketch rows for one (job, anchor, source, writer id).

The commit protocol, per append:

1. validate the whole batch (nothing is written if it is refused);
2. drop rows whose example id this source already has committed;
3. grow the writer's arrays if needed (metadata) and write the new rows
   past the committed count (see :mod:`gradmix.store.columns`);
4. publish the new committed count: create the marker ``commits/<count>``,
   then delete the one before the previous (see :mod:`gradmix.store.layout`).
   Two markers stay, so a directory listing that races with the create and
   the delete still finds the previous count: a reader's view of a count
   lags by at most one append and never goes back.

A process killed anywhere before the marker exists leaves the count where
it was: the rows it was writing are invisible and the next append
overwrites them.

A writer id must be used by one process at a time: each writer id owns its
arrays, and two appenders on one array would overwrite each other's rows.
Within a process, :meth:`SketchStore.writer` hands out one live RowWriter
per writer id, and its appends are serialised by a lock, so threads may share it.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import numpy as np
from gradmix.store import layout
from gradmix.store.columns import RowColumn
from gradmix.store.documents import GroupDocs
from gradmix.store.errors import InvalidRowsError
from gradmix.store.reader import ArrayCache, SourceIndex, committed_count, contains
from gradmix.store.records import AppendResult
from gradmix.vocabulary.sketch_spec import SketchSpec

CHUNK_BYTES = 128 * 1024
"""Target size of one gradient chunk: 64 rows at d=1024 float16 (a typical append)."""

META_CHUNK_ROWS = 1024
"""Rows per chunk of the ``values`` and ``example_ids`` arrays."""

PEER_REFRESH_SECONDS = 1.0
"""How often an append looks at the ids other writers of its source committed.

Ids this writer committed itself are always skipped exactly; re-sent ids that
another writer id committed within the last interval may be stored twice,
and readers drop such duplicates.
"""


def grad_chunk_rows(spec: SketchSpec) -> int:
    """Rows per gradient chunk for a spec (at least 16, a multiple of 16)."""
    rows = CHUNK_BYTES // (spec.dim * np.dtype(spec.dtype).itemsize)
    return max(16, rows - rows % 16)


class RowWriter:
    """Appends rows for one writer id of one source; see the module docstring."""

    def __init__(self, docs: GroupDocs, writers_path: str, writer: str, spec: SketchSpec) -> None:
        self._docs = docs
        self._spec = spec
        self._path = f"{writers_path}/{writer}"
        self._writer = writer
        self._peers = SourceIndex(docs, ArrayCache(docs.backend), writers_path)
        self._peers_at = -np.inf
        store, d = docs.backend, spec.dim
        self._whole_chunks = not docs.backend.writes_in_place
        self._lock = threading.Lock()
        self._columns = (
            RowColumn(
                store, f"{self._path}/{layout.GRADS}", (d,), spec.dtype, grad_chunk_rows(spec)
            ),
            RowColumn(store, f"{self._path}/{layout.VALUES}", (), "float64", META_CHUNK_ROWS),
            RowColumn(store, f"{self._path}/{layout.EXAMPLE_IDS}", (), "int64", META_CHUNK_ROWS),
        )
        docs.ensure(layout.commits_dir(self._path))
        self.committed: int = 0
        """Rows this writer id has committed (across restarts of the writer)."""
        self._markers: list[int] = []
        self._own_ids: set[int] = set()
        self._stale = True
        self._resync()

    def _resync(self) -> None:
        """Take the committed count, markers, chunk tails and own ids from the store."""
        self._stale = True
        self.committed = committed_count(self._docs, self._path)
        self._markers = self._drop_stale_markers()
        for column in self._columns:
            column.load_tail(self.committed)
        ids = self._columns[2].array
        own = np.asarray(ids[: self.committed]) if self.committed else np.zeros(0, np.int64)
        self._own_ids = set(own.tolist())
        self._stale = False

    def append(
        self, grads: np.ndarray, values: np.ndarray, example_ids: np.ndarray
    ) -> AppendResult:
        """Store the rows whose ids this source does not have yet, then commit them.

        Args:
            grads: (n, d) floating sketch rows, n >= 1, d = the job's dim.
            values: (n,) per-row values.
            example_ids: (n,) integer ids, unique within the call.

        Returns:
            rows newly written and this writer's committed total.

        Raises:
            InvalidRowsError: the batch is malformed (nothing is written).
        """
        g, v, ids = validate_rows(grads, values, example_ids, self._spec)
        with self._lock:
            return self._append_valid(g, v, ids)

    def _append_valid(self, g: np.ndarray, v: np.ndarray, ids: np.ndarray) -> AppendResult:
        if self._stale:  # an earlier append failed in a way that left the state unknown
            self._resync()
        if time.monotonic() - self._peers_at >= PEER_REFRESH_SECONDS:
            self._peers.refresh(skip_writer=self._writer)
            self._peers_at = time.monotonic()
        known = self._own_ids
        fresh = np.fromiter((i not in known for i in ids.tolist()), dtype=bool, count=len(ids))
        fresh &= ~contains(self._peers.ids, ids)
        if not fresh.all():
            g, v, ids = g[fresh], v[fresh], ids[fresh]
        if len(ids):
            self._write((g, v, ids))
        return AppendResult(written=len(ids), committed=self.committed)

    def _write(self, data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        start, stop = self.committed, self.committed + len(data[2])
        self._ensure_capacity(stop)
        pieces = [
            piece
            for column, rows in zip(self._columns, data, strict=True)
            for piece in column.pieces(start, rows, whole=self._whole_chunks)
        ]
        try:
            self._docs.backend.write_pieces(pieces)
            marker = json.dumps({"committed": stop, "at": time.time()}).encode()
            self._docs.backend.create_marker(layout.commit_key(self._path, stop), marker)
        except BaseException:
            # The marker may or may not have landed (an object-store PUT whose reply
            # was lost, a local write that failed after the create): what the store
            # says wins, so committed rows are never written over. Until that is
            # known, the next append re-reads it.
            self._stale = True
            with contextlib.suppress(Exception):
                self._resync()
            raise
        self.committed = stop
        self._own_ids.update(data[2].tolist())
        self._markers.append(stop)
        while len(self._markers) > 2:
            self._docs.backend.delete(layout.commit_key(self._path, self._markers.pop(0)))

    def _drop_stale_markers(self) -> list[int]:
        """Delete markers older than the last two (a killed append may leave some); the rest."""
        names = self._docs.children(layout.commits_dir(self._path))
        markers = sorted(int(n) for n in names if n.isdigit())
        for count in markers[:-2]:
            self._docs.backend.delete(layout.commit_key(self._path, count))
        return markers[-2:]

    def _ensure_capacity(self, rows: int) -> None:
        """Grow the arrays (metadata only, doubling) to hold ``rows`` rows."""
        capacity = min(col.capacity for col in self._columns)
        if rows <= capacity:
            return
        target = max(capacity, META_CHUNK_ROWS)
        while target < rows:
            target *= 2
        for column in self._columns:
            column.grow(target)


def validate_rows(
    grads: np.ndarray, values: np.ndarray, example_ids: np.ndarray, spec: SketchSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check a batch against the spec; return it in storage dtypes.

    Raises:
        InvalidRowsError: naming the first problem found.
    """
    g, v, ids = np.asarray(grads), np.asarray(values), np.asarray(example_ids)
    if g.ndim != 2 or g.shape[1] != spec.dim:
        raise InvalidRowsError(f"grads must have shape (n, {spec.dim}), got {g.shape}")
    n = g.shape[0]
    if n < 1:
        raise InvalidRowsError("an append needs at least one row")
    if not np.issubdtype(g.dtype, np.floating):
        raise InvalidRowsError(f"grads must be floating point, got dtype {g.dtype}")
    if v.shape != (n,) or ids.shape != (n,):
        raise InvalidRowsError(
            f"values and example_ids must have shape ({n},), got {v.shape} and {ids.shape}"
        )
    if not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)):
        raise InvalidRowsError(f"values must be real numbers, got dtype {v.dtype}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InvalidRowsError(f"example_ids must be integers, got dtype {ids.dtype}")
    if ids.dtype == np.uint64 and (ids > np.iinfo(np.int64).max).any():
        raise InvalidRowsError("example_ids must fit in int64")
    if not np.isfinite(g).all():
        raise InvalidRowsError("grads contain NaN or infinite entries")
    if not np.isfinite(v).all():
        raise InvalidRowsError("values contain NaN or infinite entries")
    with np.errstate(over="ignore"):
        stored = g.astype(spec.dtype, copy=False)
    if stored is not g and not np.isfinite(stored).all():
        raise InvalidRowsError(f"grads overflow the store's {spec.dtype} range")
    ids64 = ids.astype(np.int64, copy=False)
    if np.unique(ids64).shape[0] != n:
        raise InvalidRowsError("example_ids repeat within one append")
    return stored, v.astype(np.float64, copy=False), ids64
