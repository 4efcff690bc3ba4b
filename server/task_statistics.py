"""Per-task sufficient statistics of sketch rows, built incrementally.

For rows (f_i, g_i) of one task (or of the target) at one anchor this keeps

    n,   Σ_i -σ(-f_i) g_i   (the loss gradient at w = 0, summed),
         Σ_i c_i g_i g_iᵀ   (the curvature of the loss at w = 0, summed),

with c_i = σ(-f_i)·max(σ(f_i), σ(-f_i)) (`curvature_weights`): the loss
Hessian's σ(f_i)σ(-f_i) where the row's log-odds are on the right side
(f_i ≥ 0), σ(-f_i)² where they are on the wrong side. The estimator's fast
mode takes one Newton step with it. With the Hessian's own weight, a row the
model gets confidently wrong (σ(f_i) small, σ(-f_i) ≈ 1) has a steep, nearly
straight loss: its Newton step asks its log-odds to move by about
1/σ(f_i) (20 at σ(f_i) = 0.05), far beyond where a first-order model of the
network holds or an AdamW run moves them in one horizon; the lower bound
σ(-f_i)² caps that at 1/max(σ(f_i), σ(-f_i)) ≤ 2. Tasks whose rows the model
gets confidently wrong are then no longer rated by how far a Newton step
would go on them: similar-but-wrong tasks (same prompts, wrong answers) were
rated above the target's own distribution at a `make demo` run's later
anchors. bench/outcome.py, gradmix runs only, seeds 0-5 against the Hessian's
weight: near-misses 0.519 against 0.602, complementary 0.868 against 0.892,
sizes-and-noise 1.701 against 1.705; seeds 6-11: 0.614 / 0.818 / 1.753
against 0.643 / 0.885 / 1.735. In bench/fidelity.py's matched regime (small
moves, where the two agree) skill 0.876 against 0.878.

so adding rows costs O(rows·d²) and never revisits old rows. The rows
themselves are needed only by the target loss, the estimator's exact mode and
the bootstrap; by default they are kept as well, and with a `RowReader` they
are not: `grads` and `values` read them back (from the store, on the server),
so a task's memory is its statistics, O(d²), whatever its rows.

The Hessian sums of all of an estimator's tasks live in one `HessianBank`:
pages of `PAGE` tasks holding only the lower triangle of each sum (in
`LowerBlocks` layout, ~56% of d² at d = 512), in float64 and a float32
mirror. What kept ingest far from BLAS speed was memory, not arithmetic: a
d×d array and fresh temporaries per add, and first-touching memory the
process had not used (a page fault per 4 KiB; the README's Performance
section has what it cost, as system time, at 1000 tasks and d = 512). So an add
widens its rows into a reused buffer and runs one syrk into a reused d×d
scratch; the pages are a few large mappings in small pages, and a dropped
bank's pages are kept (up to `POOL_BYTES`, `PagePool`) for the next bank.
The fast-mode solver reads the bank directly (`gradmix.server.batched_solve`).
"""

from __future__ import annotations

import mmap
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from gradmix.server.batched_solve import LowerBlocks, single_threaded_blas
from gradmix.server.errors import (
    DimensionMismatchError,
    EmptyTaskError,
    InvalidArgumentError,
    NonFiniteError,
    PreconditionError,
)
from scipy.linalg.blas import dsyrk as syrk
from scipy.special import expit

#: Slots per page of a `HessianBank`.
PAGE = 128
#: Most bytes of dropped banks' pages kept for reuse (`PagePool`): one bank of
#: 1000 tasks at d = 512 (float64 sums and their float32 mirror) is ~1.8 GB.
POOL_BYTES = 2 << 30
#: Rows widened and multiplied at once by `TaskStatistics.add` (bounds its buffer).
ADD_CHUNK = 4096

#: Reads back the rows added to one `TaskStatistics` (those added, in any order):
#: (grads (rows, d), values (rows,)).
RowReader = Callable[[], tuple[np.ndarray, np.ndarray]]
#: The most bytes of read-back rows one exact call or one bootstrap keeps (`RowCache`).
ROW_CACHE_BYTES = 256 << 20


def zeroed(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A zero array in its own anonymous mapping, in small (4 KiB) pages.

    Like np.zeros, the kernel maps zero pages lazily (unused rows cost no
    memory), but without numpy's MADV_HUGEPAGE for large arrays (on the VMs
    measured here a transparent huge page fault, zeroing 2 MiB after a
    compaction, was the slower way to first-touch the bank). Unmapped when
    the array and its views are freed.
    """
    count = int(np.prod(shape))
    area = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize),
                     flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        area.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(area, dtype=dtype, count=count).reshape(shape)


class PagePool:
    """Pages of dropped `HessianBank`s, kept for the next bank of the same shape.

    First-touching memory the process has not used recently is what made
    ingest slow on the VMs measured here (a page fault per 4 KiB, ~20 µs each
    once the hypervisor must back the page: ~5 s per GiB, several times the
    arithmetic that fills it). A server drops an anchor's estimator when the
    next anchor starts, and builds one for each query at an old anchor; the
    next bank takes the dropped bank's pages instead of fresh ones. At most
    `limit` bytes are kept idle; past it pages are unmapped (returned to the
    system) as before. Thread-safe.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._idle: list[tuple[tuple[object, ...], list[np.ndarray]]] = []
        self.idle_bytes = 0

    def take(self, key: tuple[object, ...]) -> list[np.ndarray] | None:
        """An idle page of this shape (arrays with stale contents), or None."""
        with self._lock:
            for i, (held, arrays) in enumerate(self._idle):
                # An array still viewed elsewhere (its mapping referenced by
                # more than the array itself) is not handed out again.
                if held == key and all(sys.getrefcount(a.base) <= 2 for a in arrays):
                    del self._idle[i]
                    self.idle_bytes -= sum(a.nbytes for a in arrays)
                    return arrays
        return None

    def give(self, key: tuple[object, ...], pages: list[list[np.ndarray]]) -> None:
        """Keeps dropped pages while they fit under `limit` (the rest are freed)."""
        with self._lock:
            for arrays in pages:
                size = sum(a.nbytes for a in arrays)
                if self.idle_bytes + size <= self.limit:
                    self._idle.append((key, arrays))
                    self.idle_bytes += size


#: Idle bank pages a process keeps for its next banks (`PagePool`).
POOL = PagePool(POOL_BYTES)


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)), stable for any finite x."""
    y: np.ndarray = np.logaddexp(0.0, x)
    return y


class HessianBank:
    """The Hessian sums of many tasks, lower triangles packed, in fixed-size pages.

    Slot i is row i % PAGE of page i // PAGE. Each page holds, per block row
    of the `LowerBlocks` layout, one (PAGE, block size) array in float64 (the
    sums) and one in float32 (their mirror, rewritten with each add): the
    fast-mode solver multiplies by these arrays in place, in the dtype it
    solves in, so neither a new task nor new rows make it copy the sums.
    Pages are never reallocated, so growing the bank touches no memory beyond
    the new rows (a doubling array would copy, and on the VMs measured here
    first-touching fresh memory cost more than the arithmetic).

    Attributes:
        layout: The packing of one d×d lower triangle (`LowerBlocks`).
        size: Slots handed out so far.
    """

    DTYPES = (np.dtype(np.float64), np.dtype(np.float32))

    def __init__(self, dim: int, *, page: int | None = None) -> None:
        self.layout = LowerBlocks(dim)
        self.size = 0
        self._page = PAGE if page is None else page  # a bank's pages all have one size
        #: dtype → pages → one array per block row, (PAGE, block size).
        self._pages: dict[np.dtype, list[list[np.ndarray]]] = {t: [] for t in self.DTYPES}
        self._traces: list[float] = []  # per slot: trace of its sum
        self._pooled: set[tuple[np.dtype, int]] = set()  # pages taken from the pool
        # syrk writes its upper triangle (Fortran order) here; read through
        # the transpose it is the C-order lower triangle the layout packs.
        self._scratch = np.zeros((dim, dim), order="F")
        self._wide = np.empty((0, dim))  # rows widened to float64, reused across adds
        # Dropped, the bank's pages go to the pool (the finalizer holds the
        # lists, not the bank).
        for dtype, pages in self._pages.items():
            weakref.finalize(self, POOL.give, self._key(dtype), pages)

    def _key(self, dtype: np.dtype) -> tuple[object, ...]:
        return (self.layout.dim, self._page, dtype)

    def allocate(self) -> int:
        """A new zeroed slot; its index."""
        page, index = divmod(self.size, self._page)
        if page == len(self._pages[self.DTYPES[0]]):
            for dtype, pages in self._pages.items():
                pooled = POOL.take(self._key(dtype))
                if pooled is not None:
                    self._pooled.add((dtype, page))
                pages.append(pooled or [zeroed((self._page, (hi - lo) * hi), dtype)
                                        for lo, hi, _ in self.layout.blocks])
        for dtype, pages in self._pages.items():
            if (dtype, page) in self._pooled:  # it holds a dropped bank's sums
                for block in pages[page]:
                    block[index] = 0
        self._traces.append(0.0)
        self.size += 1
        return self.size - 1

    def widened(self, grads: np.ndarray) -> np.ndarray:
        """grads (≤ ADD_CHUNK rows) as float64, in a buffer reused by the next call."""
        rows = grads.shape[0]
        if self._wide.shape[0] < rows:
            self._wide = np.empty((max(rows, min(2 * self._wide.shape[0], ADD_CHUNK)),
                                   self.layout.dim))
        wide = self._wide[:rows]
        wide[...] = grads
        return wide

    def accumulate(self, slot: int, weighted: np.ndarray) -> None:
        """Adds weightedᵀ·weighted to slot's sum (weighted: (rows, d) float64).

        Callers pin BLAS to one thread around it (`single_threaded_blas`).
        """
        # Upper triangle only (syrk: half the flops of a full product), into
        # a reused buffer: no fresh d×d memory per add.
        syrk(1.0, weighted.T, beta=0.0, c=self._scratch, lower=0, overwrite_c=1)
        lower = self._scratch.T
        page, index = divmod(slot, self._page)
        wide, narrow = (self._pages[t][page] for t in self.DTYPES)
        for (lo, hi, _), total, mirror in zip(self.layout.blocks, wide, narrow, strict=True):
            row = total[index].reshape(hi - lo, hi)
            row += lower[lo:hi, :hi]
            mirror[index] = total[index]
        self._traces[slot] += float(np.trace(lower))

    def row(self, slot: int) -> np.ndarray:
        """Slot's packed sum, float64 (layout.size,): a copy."""
        page, index = divmod(slot, self._page)
        return np.concatenate([block[index] for block in self._pages[self.DTYPES[0]][page]])

    @property
    def nbytes(self) -> int:
        """Bytes of the pages allocated so far (whole pages, touched or not)."""
        return sum(block.nbytes for pages in self._pages.values() for page in pages
                   for block in page)

    def trace(self, slot: int) -> float:
        """The trace of slot's sum."""
        return self._traces[slot]

    def pages(self, dtype: np.dtype | type = np.float64) -> list[list[np.ndarray]]:
        """Per page, per block row, views (≤ PAGE, block size) of slots 0..size-1 in order."""
        return [[block[: self.size - i * self._page] for block in page]
                for i, page in enumerate(self._pages[np.dtype(dtype)])]


def curvature_weights(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """c = q·max(p, q) per row, p = σ(f), q = σ(-f): the loss Hessian's weight p·q
    where the log-odds are on the right side, q² where they are on the wrong one
    (see the module docstring)."""
    weights: np.ndarray = q * np.maximum(p, q)
    return weights


class TaskStatistics:
    """Running sums of one task's sketch (or the target's), and its rows unless read back.

    Attributes:
        dim: Sketch dimension d.
        name: The task name (used in error messages); "target" for the target.
        rows: Number of rows added so far.
        slot: Row of the Hessian bank holding this task's sum (None: no rows yet).
        reader: None: rows are kept in memory; else how `grads`/`values` read them back.
    """

    def __init__(self, dim: int, *, name: str, bank: HessianBank | None = None,
                 reader: RowReader | None = None) -> None:
        self.dim = dim
        self.name = name
        self.rows = 0
        self.slot: int | None = None
        self.reader = reader
        # Alone (the target's), a bank of one-slot pages.
        self._bank = HessianBank(dim, page=1) if bank is None else bank
        self._gradient_sum = np.zeros(dim)
        self._loss_sum = 0.0
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self._stacked: dict[np.dtype, np.ndarray] = {}
        self._values: np.ndarray | None = None

    def add(self, grads: np.ndarray, values: np.ndarray) -> None:
        """Validates and adds rows: grads (n, dim), values (n,), n ≥ 1, all finite."""
        # Rows read back later need no copy of their own here.
        g, f = validated_rows(grads, values, self.dim, self.name, copy=self.reader is None)
        if self.slot is None:  # only once the rows are valid: no orphan slots
            self.slot = self._bank.allocate()
        p, q = expit(f), expit(-f)
        scale = np.sqrt(curvature_weights(p, q))
        with single_threaded_blas():
            for lo in range(0, f.shape[0], ADD_CHUNK):
                part = slice(lo, lo + ADD_CHUNK)
                wide = self._bank.widened(g[part])  # scaled in place below
                self._gradient_sum -= q[part] @ wide
                wide *= scale[part, None]
                self._bank.accumulate(self.slot, wide)
        self._loss_sum += float(softplus(-f).sum())
        if self.reader is None:
            self._chunks.append((g, f))
        self.rows += f.shape[0]
        self._stacked.clear()
        self._values = None

    @property
    def held_bytes(self) -> int:
        """Bytes of rows this object holds (0 when they are read back)."""
        arrays = [a for chunk in self._chunks for a in chunk] + list(self._stacked.values())
        if self._values is not None:
            arrays.append(self._values)
        return sum(a.nbytes for a in arrays)

    def loss_gradient(self) -> np.ndarray:
        """b = mean_i -σ(-f_i) g_i, float64 (d,)."""
        return self._gradient_sum / self.rows

    def hessian_sum(self) -> np.ndarray:
        """Σ_i c_i g_i g_iᵀ packed (`HessianBank.layout`; c_i: `curvature_weights`),
        float64 (a copy)."""
        if self.slot is None:
            raise EmptyTaskError(f"{self.name}: no rows")
        return self._bank.row(self.slot)

    def hessian(self) -> np.ndarray:
        """H = mean_i c_i g_i g_iᵀ (c_i: `curvature_weights`), float64 (d, d), symmetric."""
        lower = np.tril(self._bank.layout.unpack(self.hessian_sum()))
        symmetric: np.ndarray = (lower + np.tril(lower, -1).T) / self.rows
        return symmetric

    def loss(self) -> float:
        """Mean loss at the anchor, mean_i softplus(-f_i)."""
        return self._loss_sum / self.rows

    def grads(self, dtype: np.dtype | type = np.float64) -> np.ndarray:
        """All rows' gradients stacked, (rows, d), in `dtype` (cached while rows are kept;
        read back on every call otherwise)."""
        key = np.dtype(dtype)
        if self.reader is not None:
            return self.read_back()[0].astype(key)
        if key not in self._stacked:
            self._stacked[key] = np.concatenate([g for g, _ in self._chunks]).astype(key)
        return self._stacked[key]

    def values(self) -> np.ndarray:
        """All rows' values stacked, float64 (rows,)."""
        if self.reader is not None:
            return self.read_back()[1]
        if self._values is None:
            self._values = np.concatenate([f for _, f in self._chunks])
        return self._values

    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """(grads float64, values) of every row, read back once when they are not kept."""
        if self.reader is None:
            return self.grads(), self.values()
        grads, values = self.read_back()
        return grads.astype(np.float64), values

    def read_back(self) -> tuple[np.ndarray, np.ndarray]:
        """(grads, values) from `reader`, checked to be as many rows as were added.

        Raises:
            PreconditionError: the reader gave another number of rows (the
                source changed under this task's statistics).
        """
        assert self.reader is not None
        grads, values = self.reader()
        if len(values) != self.rows or grads.shape != (self.rows, self.dim):
            raise PreconditionError(
                f"{self.name}: {len(values)} rows read back, {self.rows} were added; "
                "its rows changed since: retry once the job has re-estimated")
        return grads, np.asarray(values, dtype=np.float64)


class RowCache:
    """Rows read back for one computation (an exact call, a bootstrap), by task.

    Holds at most `limit` bytes (float64 grads and values), dropping the least
    recently used; rows kept in memory by their statistics are taken from
    there, uncounted. Dropped with the computation: nothing stays after it.
    """

    def __init__(self, limit: int = ROW_CACHE_BYTES) -> None:
        self.limit = limit
        self._held: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._bytes = 0

    def rows(self, stats: TaskStatistics) -> tuple[np.ndarray, np.ndarray]:
        """`stats.stacked()`, from the cache when it holds them."""
        if stats.reader is None:
            return stats.stacked()
        held = self._held.get(stats.name)
        if held is not None:
            self._held.move_to_end(stats.name)
            return held
        held = stats.stacked()
        size = held[0].nbytes + held[1].nbytes
        while self._held and self._bytes + size > self.limit:
            _, (g, f) = self._held.popitem(last=False)
            self._bytes -= g.nbytes + f.nbytes
        if size <= self.limit:
            self._held[stats.name] = held
            self._bytes += size
        return held


def validated_rows(
    grads: np.ndarray, values: np.ndarray, dim: int, source: str, *, copy: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Checks sketch rows; returns them (copies unless `copy` is False), grads float32
    if given so, else float64.

    Raises:
        DimensionMismatchError: grads has a second dimension other than `dim`.
        EmptyTaskError: zero rows.
        NonFiniteError: NaN or Inf anywhere.
        InvalidArgumentError: wrong ranks, mismatched lengths, non-numeric data.
    """
    g = np.asarray(grads)
    f = np.asarray(values)
    if g.ndim != 2:
        raise InvalidArgumentError(f"{source}: grads must be 2-D (rows, dim), got shape {g.shape}")
    if g.shape[1] != dim:
        raise DimensionMismatchError(
            f"{source}: grads have dim {g.shape[1]}, the job's dim is {dim}"
        )
    if g.shape[0] == 0:
        raise EmptyTaskError(f"{source}: no rows")
    if f.shape != (g.shape[0],):
        raise InvalidArgumentError(
            f"{source}: values must have shape ({g.shape[0]},) to match grads, got {f.shape}"
        )
    for array, what in ((g, "grads"), (f, "values")):
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise InvalidArgumentError(f"{source}: {what} must be real numbers, got {array.dtype}")
    # Copies (the caller may reuse its buffer) when they are kept. float32 rows stay float32:
    # every use widens them exactly, and they take half the memory.
    kind = np.float32 if g.dtype == np.float32 else np.float64
    g = np.array(g, dtype=kind, order="C") if copy else np.ascontiguousarray(g, dtype=kind)
    f = np.array(f, dtype=np.float64)
    # One pass over the rows: a sum is finite iff every entry is.
    if not (np.isfinite(g.sum()) and np.isfinite(f.sum())):
        bad = int((~np.isfinite(g)).any(axis=1).sum() + (~np.isfinite(f)).sum())
        if bad:
            raise NonFiniteError(
                f"{source}: {bad} non-finite entries (NaN or Inf) in grads/values"
            )
    return g, f
