"""Per-task sufficient statistics of sketch rows, built incrementally.

For rows (f_i, g_i) of one task (or of the target) at one anchor this keeps

    n,   Σ_i -σ(-f_i) g_i   (the loss gradient at w = 0, summed),
         Σ_i σ(f_i)σ(-f_i) g_i g_iᵀ   (the loss Hessian at w = 0, summed),

so adding rows costs O(rows·d²) and never revisits old rows. The rows
themselves are needed only by the target loss, the estimator's exact mode and
the bootstrap; by default they are kept as well, and with a `RowReader` they
are not: `grads` and `values` read them back (from the store, on the server),
so a task's memory is its statistics, O(d²), whatever its rows.

The Hessian sums of all of an estimator's tasks live in one `HessianBank`:
float64 pages of 64 tasks each holding only the lower triangle of each sum
(in `LowerBlocks` layout, ~56% of d² at d = 512). A few large allocations
instead of a d×d array per task (and fresh temporaries per add) is what keeps
ingest near BLAS speed: page faults on fresh memory, not arithmetic,
dominated it before (10 s of system time for 1000 tasks at d = 512).
The fast-mode solver reads the bank directly (`gradmix.server.batched_solve`).
"""

from __future__ import annotations

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
PAGE = 64

#: Reads back the rows added to one `TaskStatistics` (those added, in any order):
#: (grads (rows, d), values (rows,)).
RowReader = Callable[[], tuple[np.ndarray, np.ndarray]]
#: The most bytes of read-back rows one exact call or one bootstrap keeps (`RowCache`).
ROW_CACHE_BYTES = 256 << 20


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)), stable for any finite x."""
    return np.logaddexp(0.0, x)


class HessianBank:
    """The Hessian sums of many tasks, lower triangles packed, in fixed-size pages.

    Slot i is row i % PAGE of page i // PAGE. Pages are never reallocated, so
    growing the bank touches no memory beyond the new rows (a doubling array
    would copy, and on the VMs measured here first-touching fresh memory cost
    more than the arithmetic).

    Attributes:
        layout: The packing of one d×d lower triangle (`LowerBlocks`).
        size: Slots handed out so far.
    """

    def __init__(self, dim: int) -> None:
        self.layout = LowerBlocks(dim)
        self.size = 0
        self._pages: list[np.ndarray] = []
        # syrk writes its upper triangle (Fortran order) here; read through
        # the transpose it is the C-order lower triangle the layout packs.
        self._scratch = np.zeros((dim, dim), order="F")

    def allocate(self) -> int:
        """A new zeroed slot; its index."""
        if self.size == len(self._pages) * PAGE:
            # np.zeros maps zero pages lazily: unused rows cost no memory.
            self._pages.append(np.zeros((PAGE, self.layout.size)))
        self.size += 1
        return self.size - 1

    def accumulate(self, slot: int, weighted: np.ndarray) -> None:
        """Adds weightedᵀ·weighted to slot's sum (weighted: (rows, d) float64).

        Callers pin BLAS to one thread around it (`single_threaded_blas`).
        """
        # Upper triangle only (syrk: half the flops of a full product), into
        # a reused buffer: no fresh d×d memory per add.
        syrk(1.0, weighted.T, beta=0.0, c=self._scratch, lower=0, overwrite_c=1)
        self.layout.pack_add(self._scratch.T, self.row(slot))

    def row(self, slot: int) -> np.ndarray:
        """Slot's packed sum, a float64 view (layout.size,)."""
        page, index = divmod(slot, PAGE)
        return self._pages[page][index]

    def pages(self) -> list[np.ndarray]:
        """Views (≤ PAGE, layout.size) covering slots 0..size-1 in order."""
        return [page[: self.size - i * PAGE] for i, page in enumerate(self._pages)]


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
        self._bank = HessianBank(dim) if bank is None else bank
        self._gradient_sum = np.zeros(dim)
        self._loss_sum = 0.0
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self._stacked: dict[np.dtype, np.ndarray] = {}
        self._values: np.ndarray | None = None

    def add(self, grads: np.ndarray, values: np.ndarray) -> None:
        """Validates and adds rows: grads (n, dim), values (n,), n ≥ 1, all finite."""
        g, f = validated_rows(grads, values, self.dim, self.name)
        if self.slot is None:  # only once the rows are valid: no orphan slots
            self.slot = self._bank.allocate()
        p, q = expit(f), expit(-f)
        wide = g.astype(np.float64, copy=False)  # one widening for both products
        with single_threaded_blas():
            self._gradient_sum -= q @ wide
            self._bank.accumulate(self.slot, wide * np.sqrt(p * q)[:, None])
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
        """Σ_i σ(f_i)σ(-f_i) g_i g_iᵀ packed (`HessianBank.layout`), a float64 view."""
        if self.slot is None:
            raise EmptyTaskError(f"{self.name}: no rows")
        return self._bank.row(self.slot)

    def hessian(self) -> np.ndarray:
        """H = mean_i σ(f_i)σ(-f_i) g_i g_iᵀ, float64 (d, d), symmetric."""
        lower = np.tril(self._bank.layout.unpack(self.hessian_sum()))
        return (lower + np.tril(lower, -1).T) / self.rows

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
    grads: np.ndarray, values: np.ndarray, dim: int, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Checks sketch rows; returns copies, grads float32 if given so, else float64.

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
    # Copies (the caller may reuse its buffer). float32 rows stay float32:
    # every use widens them exactly, and they take half the memory.
    g = np.array(g, dtype=np.float32 if g.dtype == np.float32 else np.float64, order="C")
    f = np.array(f, dtype=np.float64)
    # One pass over the rows: a sum is finite iff every entry is.
    if not (np.isfinite(g.sum()) and np.isfinite(f.sum())):
        bad = int((~np.isfinite(g)).any(axis=1).sum() + (~np.isfinite(f)).sum())
        if bad:
            raise NonFiniteError(
                f"{source}: {bad} non-finite entries (NaN or Inf) in grads/values"
            )
    return g, f
