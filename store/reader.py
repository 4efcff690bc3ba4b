"""Reading committed rows: per-writer commit markers, the id index of a source,
and incremental reads along a cursor.

A reader first reads a writer's commit marker, then its arrays up to that
count only. Because a writer resizes and fills its arrays before it publishes
the marker, everything below the marker is written data; fill-value rows a
killed append left beyond it are never touched.
"""

from __future__ import annotations

import numpy as np
import zarr
from gradmix.store import layout
from gradmix.store.backend import StoreBackend
from gradmix.store.columns import is_plain, read_range
from gradmix.store.documents import GroupDocs
from gradmix.store.errors import StoreError
from gradmix.store.records import ReadCursor, Rows


class ArrayCache:
    """Opened Zarr arrays (their metadata) by path; rows are read from the chunks directly."""

    def __init__(self, backend: StoreBackend) -> None:
        self._backend = backend
        self._arrays: dict[str, zarr.Array] = {}

    def get(self, path: str) -> zarr.Array:
        """The array at ``path`` (its chunk layout does not change, so it is opened once)."""
        array = self._arrays.get(path)
        if array is None:
            array = zarr.open_array(self._backend.zarr_store, path=path, mode="r")
            if not is_plain(array, tuple(array.shape)[1:]):
                raise StoreError(f"array {path!r} does not have the store's plain row layout")
            self._arrays[path] = array
        return array

    def forget(self, prefix: str) -> None:
        """Drop the arrays under ``prefix`` (they were deleted)."""
        for path in [p for p in self._arrays if p.startswith(prefix)]:
            del self._arrays[path]

    def read(self, writer_path: str, name: str, start: int, stop: int) -> np.ndarray:
        """Committed rows ``[start, stop)`` of one of a writer's arrays."""
        return read_range(self._backend, self.get(f"{writer_path}/{name}"), start, stop)


def committed_count(docs: GroupDocs, writer_path: str) -> int:
    """A writer's committed row count: its largest commit marker (0 without one)."""
    names = docs.children(layout.commits_dir(writer_path))
    return max((int(n) for n in names if n.isdigit()), default=0)


def writer_counts(docs: GroupDocs, writers_path: str) -> dict[str, int]:
    """Committed row count per writer id of one source (writers with rows), in name order."""
    counts: dict[str, int] = {}
    for writer in sorted(docs.children(writers_path)):
        committed = committed_count(docs, f"{writers_path}/{writer}")
        if committed > 0:
            counts[writer] = committed
    return counts


class SourceIndex:
    """The distinct example ids committed to one source, kept up to date incrementally."""

    def __init__(self, docs: GroupDocs, arrays: ArrayCache, writers_path: str) -> None:
        self._docs = docs
        self._arrays = arrays
        self._writers_path = writers_path
        self._offsets: dict[str, int] = {}
        self.ids = np.zeros(0, dtype=np.int64)
        """The distinct ids seen so far, sorted (8 bytes an id)."""

    def refresh(self, skip_writer: str | None = None) -> None:
        """Take in the ids every writer (but ``skip_writer``) committed since the last refresh."""
        for writer, committed in writer_counts(self._docs, self._writers_path).items():
            start = self._offsets.get(writer, 0)
            if writer == skip_writer or committed <= start:
                continue
            path = f"{self._writers_path}/{writer}"
            new = np.unique(self._arrays.read(path, layout.EXAMPLE_IDS, start, committed))
            self.ids = _merge_sorted(self.ids, new[~contains(self.ids, new)])
            self._offsets[writer] = committed


def read_new_rows(
    docs: GroupDocs, arrays: ArrayCache, writers_path: str, cursor: ReadCursor, dim: int,
    *, until: ReadCursor | None = None,
) -> tuple[Rows, ReadCursor]:
    """Committed rows after ``cursor``, minus ids already returned along its lineage;
    with ``until``, no row past where that cursor stood on each writer."""
    offsets = dict(cursor.offsets)
    stops = dict(until.offsets) if until is not None else None
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for writer, committed in writer_counts(docs, writers_path).items():
        if stops is not None:
            committed = min(committed, stops.get(writer, 0))
        start = offsets.get(writer, 0)
        if committed <= start:
            continue
        path = f"{writers_path}/{writer}"
        parts.append(
            (
                arrays.read(path, layout.GRADS, start, committed),
                arrays.read(path, layout.VALUES, start, committed),
                arrays.read(path, layout.EXAMPLE_IDS, start, committed),
            )
        )
        offsets[writer] = committed
    if not parts:
        return Rows.empty(dim), cursor
    ids = _joined([p[2] for p in parts], np.int64)
    keep = _first_unseen(ids, cursor.seen)
    rows = Rows(
        grads=_joined([p[0] for p in parts], np.float32, keep),
        values=_joined([p[1] for p in parts], np.float64, keep),
        example_ids=ids[keep] if keep is not None else ids,
    )
    seen = _merge_sorted(cursor.seen, rows.example_ids)
    new_cursor = ReadCursor(cursor.source, tuple(sorted(offsets.items())), seen)
    return rows, new_cursor


def _joined(
    blocks: list[np.ndarray], dtype: type[np.generic], keep: np.ndarray | None = None
) -> np.ndarray:
    """The blocks end to end as a fresh, writable array of ``dtype``, rows ``keep`` only.

    The blocks are read-only views of chunk bytes; this makes the one copy.
    """
    whole = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    if keep is not None:
        whole = whole[keep]
    if whole.dtype == dtype and not whole.flags.writeable:
        return whole.copy()
    return whole.astype(dtype, copy=False)


def _first_unseen(ids: np.ndarray, seen: np.ndarray) -> np.ndarray | None:
    """Indices (in order) of the first occurrence of each id not in sorted ``seen``.

    None when that is every row (the common case: nothing to drop).
    """
    fresh = ~contains(seen, ids)
    if fresh.all() and np.unique(ids).shape[0] == ids.shape[0]:
        return None
    _, first = np.unique(ids, return_index=True)
    first.sort()
    return first[fresh[first]]


def contains(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Membership of ``ids`` in a sorted array, O(len(ids) log len(sorted_ids))."""
    if sorted_ids.shape[0] == 0:
        return np.zeros(ids.shape[0], dtype=bool)
    at = np.searchsorted(sorted_ids, ids).clip(max=sorted_ids.shape[0] - 1)
    return np.asarray(sorted_ids[at] == ids)


def _merge_sorted(sorted_ids: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``sorted_ids`` with the (absent, distinct) ``new`` ids inserted, still sorted."""
    new = np.sort(new)
    return np.insert(sorted_ids, np.searchsorted(sorted_ids, new), new)
