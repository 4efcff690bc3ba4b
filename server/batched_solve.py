"""Batched one-Newton-step solves for many task weightings at once.

For each row α of an (m, n) weight matrix this computes

    w = -(Σ_t α_t H_t + λI)⁻¹ Σ_t α_t b_t

the estimator's fast mode. The hot path, tuned for m and n in the thousands:

* The operands are the tasks' Hessian *sums* S_t = rows_t·H_t, packed as the
  lower triangle in `LowerBlocks` layout (K block rows of the triangle, the
  diagonal blocks whole), read in place from the `HessianBank`'s pages (per
  page and block row one (tasks, block) array, in float64 and a float32
  mirror). Σ_t (α_t/rows_t) S_t for a chunk of subsets is, per block row,
  one GEMM per page accumulated in place (β = 1), whose output is copied as
  a rectangle into a stack of d×d systems; λ is then added to the
  diagonals. At d = 512 (K = 8) that is 56% of the flops of one GEMM over
  whole d×d matrices, with no gather or scatter, and no copy of the sums
  when a task gains rows or a new task arrives.
* float32 systems are solved together by conjugate gradients preconditioned
  with the chunk's mean system (one Cholesky per chunk): subsets' systems
  differ from their mean by a weighted sum of task Hessians, so 3-4
  iterations (batched matrix-vector products) reach a relative residual of
  `CG_TOLERANCE`, against d³/3 flops per system for a factorisation. A system
  CG does not settle, and every float64 system, is factored and solved in
  place with LAPACK ``posv`` (Cholesky) reading the lower triangle; numpy's
  stacked ``cholesky`` is several times slower here.
* BLAS is pinned to one thread for the call (threadpoolctl; process-wide
  while it runs) and chunks of subsets run on a small thread pool instead
  (GEMM and LAPACK release the GIL), so two cores work on two chunks. Each
  worker reuses one set of buffers for all its chunks.
* float32 is used when the systems are well conditioned enough for it:
  cond(A) ≤ 1 + max_t trace(H_t)/λ ≤ `FLOAT32_MAX_CONDITION` keeps the relative
  error of w near 1e-4 or better; otherwise float64. A system that float32
  fails to factor is re-solved in float64.
* When one task's rows change, `refresh` updates its row count, gradient
  and trace (O(d)); the sums themselves are already current in the bank.
"""

from __future__ import annotations

import functools
import itertools
import os
import queue
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import scipy.linalg
from scipy.linalg import get_blas_funcs, get_lapack_funcs
from threadpoolctl import ThreadpoolController

FLOAT32_MAX_CONDITION = 1e3
CHUNK = 128
MAX_WORKERS = 4
#: Width of a block row of the packed lower triangle (fewer, wider blocks
#: waste flops on the diagonal blocks; narrower ones run GEMMs below peak).
BLOCK = 64
MAX_BLOCKS = 8
#: Float32 systems are solved by conjugate gradients to this relative
#: residual (float32 Cholesky's own error is of this order at cond ≤ 1e3)...
CG_TOLERANCE = 1e-6
#: ...within this many iterations; a system that does not is factored.
CG_MAX_ITERATIONS = 12
#: Systems iterated together (32 × d² float32: 8 MB at d = 256, cache-sized).
CG_BATCH = 32


class LowerBlocks:
    """Packing of the lower triangle of a d×d matrix as K block rows.

    Block row k holds rows [lo_k, hi_k) and columns [0, hi_k) of the matrix
    (C order), so it covers the lower triangle and the diagonal block's
    upper part. The packed vector concatenates the blocks.

    Attributes:
        dim: d.
        blocks: (lo, hi, offset) per block row; offset into the packed vector.
        size: Length of the packed vector.
        diagonal: Packed positions of the d diagonal entries.
    """

    def __init__(self, dim: int) -> None:
        count = max(1, min(MAX_BLOCKS, dim // BLOCK))
        edges = [k * dim // count for k in range(count + 1)]
        self.dim = dim
        self.blocks: list[tuple[int, int, int]] = []
        offset = 0
        diagonal: list[int] = []
        for lo, hi in itertools.pairwise(edges):
            self.blocks.append((lo, hi, offset))
            diagonal.extend(offset + (i - lo) * hi + i for i in range(lo, hi))
            offset += (hi - lo) * hi
        self.size = offset
        self.diagonal = np.array(diagonal, dtype=np.intp)

    def pack_add(self, matrix: np.ndarray, packed: np.ndarray) -> None:
        """packed += the packed lower triangle of `matrix` (d, d)."""
        for lo, hi, offset in self.blocks:
            segment = packed[offset : offset + (hi - lo) * hi].reshape(hi - lo, hi)
            segment += matrix[lo:hi, :hi]

    def pack(self, matrix: np.ndarray, dtype: np.dtype | type = np.float64) -> np.ndarray:
        """The packed lower triangle of `matrix` (d, d)."""
        packed = np.zeros(self.size, dtype)
        self.pack_add(matrix, packed)
        return packed

    def segments(self) -> list[slice]:
        """The packed vector's slice of each block row."""
        return [slice(offset, offset + (hi - lo) * hi) for lo, hi, offset in self.blocks]

    def unpack_into(self, packed: np.ndarray, out: np.ndarray) -> None:
        """Writes packed rows (count, size) into the lower triangles of out (count, d, d)."""
        for lo, hi, offset in self.blocks:
            block = packed[:, offset : offset + (hi - lo) * hi]
            out[:, lo:hi, :hi] = block.reshape(-1, hi - lo, hi)

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """(d, d) with the packed entries in place and zeros strictly above the blocks."""
        out = np.zeros((1, self.dim, self.dim), packed.dtype)
        self.unpack_into(packed[None, :], out)
        square: np.ndarray = out[0]
        return square


class FastSolver:
    """Solves the fast-mode systems for fixed per-task statistics.

    Args:
        layout: The packing of the sums.
        pages: dtype → pages → per block row, (tasks in page, block size):
            stacked over pages, row t of block k is block k of task t's
            packed Hessian sum S_t (views of a `HessianBank`'s pages, in
            float64 and float32; read in place, never copied).
        rows: (n,) rows behind each sum (H_t = S_t / rows_t).
        gradients: (n, d) float64, row t is b_t.
        traces: (n,) trace of each S_t.
    """

    def __init__(
        self,
        layout: LowerBlocks,
        pages: dict[np.dtype, list[list[np.ndarray]]],
        rows: np.ndarray,
        gradients: np.ndarray,
        traces: np.ndarray,
    ) -> None:
        self._pages = {np.dtype(t): list(p) for t, p in pages.items()}
        wide = self._pages[np.dtype(np.float64)]
        self.tasks = sum(page[0].shape[0] for page in wide)
        self.dim = layout.dim
        self._layout = layout
        self._starts = np.cumsum([0] + [page[0].shape[0] for page in wide])
        self._rows = np.asarray(rows, dtype=np.float64).copy()
        self._gradients = np.array(gradients, dtype=np.float64).reshape(self.tasks, self.dim)
        self._trace_sums = np.asarray(traces, dtype=np.float64).copy()

    def dtype_for(self, regularization: float) -> np.dtype:
        """float32 when the systems are well conditioned for λ, else float64."""
        traces = self._trace_sums / np.maximum(self._rows, 1.0)
        max_trace = float(traces.max()) if self.tasks else 0.0
        condition = 1.0 + max_trace / regularization
        return np.dtype(np.float32 if condition <= FLOAT32_MAX_CONDITION else np.float64)

    def prepare(self, regularization: float) -> None:
        """Nothing to build: the solver reads the bank's pages in place (kept for callers)."""
        self.dtype_for(regularization)

    def refresh(self, task: int, rows: int, gradient: np.ndarray, trace: float) -> None:
        """Task `task`'s rows changed: its sum is read in place; O(d) here."""
        self._rows[task] = rows
        self._gradients[task] = gradient
        self._trace_sums[task] = trace

    def solve(self, alpha: np.ndarray, regularization: float) -> np.ndarray:
        """Returns w (m, d), one row per row of `alpha` (m, n), in `dtype_for(λ)`."""
        dtype = self.dtype_for(regularization)
        m, d = alpha.shape[0], self.dim
        weights = (alpha / self._rows).astype(dtype)
        rhs = -(alpha @ self._gradients).astype(dtype)
        out = np.empty((m, d), dtype)
        chunks = [(lo, min(lo + CHUNK, m)) for lo in range(0, m, CHUNK)]
        operand = _Operand(self._pages[dtype], self._starts)
        workers = min(MAX_WORKERS, os.cpu_count() or 1, len(chunks))

        def work(bounds: tuple[int, int]) -> None:
            lo, hi = bounds
            buffer = _take_buffers(self._layout, dtype)
            try:
                out[lo:hi] = buffer.solve(operand, weights[lo:hi], rhs[lo:hi], regularization)
            finally:
                _BUFFERS.put(buffer)

        # Parallelism comes from chunks, not from BLAS threads (see below).
        with single_threaded_blas():
            if workers > 1:
                list(_pool().map(work, chunks))
            else:
                for bounds in chunks:
                    work(bounds)
        failed = np.flatnonzero(~np.isfinite(out).all(axis=1))
        for i in failed:  # float32 could not factor it: redo in float64
            out[i] = self._solve_float64(alpha[i], regularization)
        return out

    def solve_linearized(self, alpha: np.ndarray, regularization: float) -> np.ndarray:
        """w to first order in α around the rows' mean weighting ᾱ, (m, d) float64.

        With A(α) = Σ_t α_t H_t + λI and w(α) = -A(α)⁻¹ Σ_t α_t b_t:

            w(α) ≈ w(ᾱ) + Σ_t (α_t - ᾱ_t) J_t,   J_t = -A(ᾱ)⁻¹ (H_t w(ᾱ) + b_t)

        One factorisation and one pass over the operands, then an (m, n) @
        (n, d) product: O(n·d² + m·n·d) against O(m·n·d²) for `solve`. An
        approximation: its error grows with how far subsets' systems are from
        the mean one (second order in α - ᾱ).
        """
        center = alpha.mean(axis=0)
        # Small factorisations and products: BLAS's own threads only contend
        # (a 256² Cholesky took 0.18 s instead of < 1 ms on a loaded machine).
        with single_threaded_blas():
            factor = scipy.linalg.cho_factor(self._system(center, regularization), lower=True)
            w0 = -scipy.linalg.cho_solve(factor, center @ self._gradients)
            curvature = self._hessian_products(w0) / self._rows[:, None]
            jacobian: np.ndarray = -scipy.linalg.cho_solve(
                factor, (curvature + self._gradients).T).T
            solution: np.ndarray = w0 + (alpha - center) @ jacobian
        return solution

    def _hessian_products(self, v: np.ndarray) -> np.ndarray:
        """S_t v for every task t, (n, d) float64, from the packed lower triangles."""
        out = np.zeros((self.tasks, self.dim))
        for page, start in zip(self._pages[np.dtype(np.float64)], self._starts, strict=False):
            part = out[start : start + page[0].shape[0]]
            for (lo, hi, _), packed in zip(self._layout.blocks, page, strict=True):
                block = packed.reshape(packed.shape[0], hi - lo, hi)
                # Rows lo..hi of the lower triangle, and their transposes;
                # the diagonal block's upper part is zero, its diagonal
                # counted twice.
                part[:, lo:hi] += block @ v[:hi]
                part[:, :hi] += np.einsum("tij,i->tj", block, v[lo:hi])
                span = np.arange(lo, hi)
                part[:, lo:hi] -= block[:, span - lo, span] * v[lo:hi]
        return out

    def _system(self, weights: np.ndarray, regularization: float) -> np.ndarray:
        """Σ_t (weights_t / rows_t) S_t + λI, float64 (d, d), symmetric."""
        lower = np.tril(self._layout.unpack(self._combine(weights / self._rows)))
        system: np.ndarray = lower + np.tril(lower, -1).T
        system[np.diag_indices_from(system)] += regularization
        return system

    def _combine(self, weights: np.ndarray) -> np.ndarray:
        """Σ_t weights_t S_t, packed float64."""
        total = np.zeros(self._layout.size)
        for page, start in zip(self._pages[np.dtype(np.float64)], self._starts, strict=False):
            part = weights[start : start + page[0].shape[0]]
            for columns, block in zip(self._layout.segments(), page, strict=True):
                total[columns] += part @ block
        return total

    def _solve_float64(self, alpha: np.ndarray, regularization: float) -> np.ndarray:
        return np.linalg.solve(self._system(alpha, regularization), -(alpha @ self._gradients))


class _Operand:
    """The paged sums of one dtype as GEMM operands: W @ S summed over pages."""

    def __init__(self, pages: list[list[np.ndarray]], starts: np.ndarray) -> None:
        self.pages = pages
        self.starts = starts
        dtype = pages[0][0].dtype if pages else np.dtype(np.float64)
        (self.gemm,) = get_blas_funcs(("gemm",), dtype=dtype)

    def multiply(self, weights: np.ndarray, block: int, out: np.ndarray) -> None:
        """out[:] = Σ_t weights[:, t] · S_t's block `block`, (count, block size).

        The first page's product is written by numpy's matmul, the others
        accumulated by GEMM with β = 1 on the transposes (out is C-ordered,
        so outᵀ is the Fortran-ordered C that BLAS updates in place).
        """
        for i, page in enumerate(self.pages):
            lo, hi = self.starts[i], self.starts[i + 1]
            if i == 0:
                np.matmul(weights[:, lo:hi], page[block], out=out)
            else:
                self.gemm(1.0, page[block].T, weights[:, lo:hi].T, beta=1.0, c=out.T,
                          overwrite_c=1)

    def mean(self, weights: np.ndarray, layout: LowerBlocks) -> np.ndarray:
        """Σ_t weights_t S_t for a (n,) weight vector, packed; GEMVs in the pages'
        dtype (no widened copy of the sums), summed in float64."""
        total = np.zeros(layout.size)
        for i, page in enumerate(self.pages):
            part = weights[self.starts[i] : self.starts[i + 1]].astype(page[0].dtype)
            for columns, block in zip(layout.segments(), page, strict=True):
                total[columns] += part @ block
        return total


class _Buffers:
    """One worker's scratch for a chunk: packed GEMM outputs and d×d systems.

    Kept in `_BUFFERS` between solves (CHUNK·d²·(1 + ~0.56) values each, at
    most one per concurrently running chunk): fresh memory costs a page fault
    per page on first touch, which at d = 512 took longer than the solve.
    """

    def __init__(self, count: int, layout: LowerBlocks, dtype: np.dtype) -> None:
        self.layout = layout
        self.packed = [np.empty((count, c.stop - c.start), dtype) for c in layout.segments()]
        # Zeros: `_multiply` relies on the entries no GEMM writes being zero.
        self.systems = np.zeros((count, layout.dim, layout.dim), dtype)
        (self.posv,) = get_lapack_funcs(("posv",), dtype=dtype)

    def solve(self, operand: _Operand, weights: np.ndarray, rhs: np.ndarray,
              regularization: float) -> np.ndarray:
        """Builds one chunk's systems (K paged GEMMs, then λ on the diagonals) and
        solves them: conjugate gradients in float32, else (or failing that) posv."""
        count, d = rhs.shape[0], self.layout.dim
        systems = self.systems[:count]
        for k, ((lo, hi, _), packed) in enumerate(zip(self.layout.blocks, self.packed,
                                                      strict=True)):
            operand.multiply(weights, k, packed[:count])
            systems[:, lo:hi, :hi] = packed[:count].reshape(count, hi - lo, hi)
        systems.reshape(count, d * d)[:, :: d + 1] += systems.dtype.type(regularization)
        if systems.dtype == np.float32 and count > 1:
            # The preconditioner: the chunk's mean system, from one GEMV per page.
            mean = self.layout.unpack(operand.mean(weights.mean(axis=0), self.layout))
            mean = np.tril(mean) + np.tril(mean, -1).T
            mean[np.diag_indices_from(mean)] += regularization
            factor = (scipy.linalg.cholesky(mean, lower=True).astype(np.float32), True)
            result = np.empty_like(rhs)
            converged = np.empty(count, dtype=bool)
            for lo in range(0, count, CG_BATCH):
                part = slice(lo, min(lo + CG_BATCH, count))
                result[part], converged[part] = self._conjugate_gradients(
                    systems[part], rhs[part], factor
                )
            pending = np.flatnonzero(~converged)
        else:
            result, pending = np.empty_like(rhs), np.arange(count)
        for i in pending:
            # posv reads the upper triangle of a Fortran-ordered matrix: the
            # transpose of systems[i] (a view, no copy) has the packed lower
            # triangle there.
            _, solution, info = self.posv(systems[i].T, rhs[i], lower=0, overwrite_a=1)
            result[i] = solution if info == 0 else np.nan
        return result

    def _conjugate_gradients(
        self, systems: np.ndarray, rhs: np.ndarray, factor: tuple[np.ndarray, bool]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Preconditioned CG on a batch of a chunk's systems at once (float32).

        `factor` is the lower Cholesky factor of the chunk's mean system: the
        subsets' systems differ from their mean by a weighted sum of task
        Hessians, so CG needs a few iterations where a factorisation per
        system costs d³/3 each. Batches of `CG_BATCH` systems stay in cache
        across the iterations' products. Returns x and which systems reached
        ‖Ax - b‖ ≤ `CG_TOLERANCE`·‖b‖ within `CG_MAX_ITERATIONS`.
        """

        def precondition(r: np.ndarray) -> np.ndarray:
            solved: np.ndarray = scipy.linalg.cho_solve(factor, r.T, check_finite=False)
            return solved.T

        target = CG_TOLERANCE * np.linalg.norm(rhs, axis=1)
        x = np.zeros_like(rhs)
        r = rhs.copy()
        z = precondition(r)
        p = z.copy()
        rz = np.einsum("ij,ij->i", r, z)
        converged = np.linalg.norm(r, axis=1) <= target
        for _ in range(CG_MAX_ITERATIONS):
            if converged.all():
                break
            q = self._multiply(systems, p)
            pq = np.einsum("ij,ij->i", p, q)
            step = np.divide(rz, pq, out=np.zeros_like(rz), where=~converged & (pq > 0))
            x += step[:, None] * p
            r -= step[:, None] * q
            converged |= np.linalg.norm(r, axis=1) <= target
            z = precondition(r)
            rz_next = np.einsum("ij,ij->i", r, z)
            p = z + np.divide(rz_next, rz, out=np.zeros_like(rz), where=rz > 0)[:, None] * p
            rz = rz_next
        # The recurrence's residual drifts from the true one: check that.
        true = np.linalg.norm(rhs - self._multiply(systems, x), axis=1)
        return x, converged & (true <= 2 * target) & np.isfinite(x).all(axis=1)

    def _multiply(self, systems: np.ndarray, v: np.ndarray) -> np.ndarray:
        """A v per system, A symmetric with only its lower triangle stored.

        Every operand row is a lower triangle (syrk fills one triangle; the
        packed diagonal blocks hold zeros above the diagonal) and nothing
        writes above the block rows, so the stored S is tril(A) and
        A = S + Sᵀ - diag(A).
        """
        out: np.ndarray = np.matmul(systems, v[:, :, None])[:, :, 0]
        out += np.matmul(v[:, None, :], systems)[:, 0, :]
        out -= np.einsum("kii->ki", systems) * v
        return out


_BUFFERS: queue.SimpleQueue[_Buffers] = queue.SimpleQueue()


def _take_buffers(layout: LowerBlocks, dtype: np.dtype) -> _Buffers:
    """Pooled buffers for `layout` and `dtype`; others met on the way are dropped.

    Estimates mostly repeat one d and dtype, so a pool of one kind suffices;
    a different kind frees the old buffers rather than holding both.
    """
    while True:
        try:
            buffer = _BUFFERS.get_nowait()
        except queue.Empty:
            return _Buffers(CHUNK, layout, dtype)
        if buffer.layout.dim == layout.dim and buffer.systems.dtype == dtype:
            return buffer


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """The worker threads chunks run on, started once per process (starting threads
    for every solve cost milliseconds of a commit's re-estimate). A chunk never
    submits work itself, so concurrent solves (several jobs) only queue."""
    return ThreadPoolExecutor(min(MAX_WORKERS, os.cpu_count() or 1),
                              thread_name_prefix="gradmix-solve")


@functools.cache
def _blas_controller() -> ThreadpoolController:
    # Inspecting the loaded libraries is not free: do it once per process.
    return ThreadpoolController()


def single_threaded_blas() -> AbstractContextManager[Any]:
    """Pins BLAS/LAPACK to one thread while the returned context is entered.

    OpenBLAS's own threads busy-wait; on a shared machine a d = 256 Cholesky
    then runs 10-50x slower than on one thread. Process-wide while active.
    """
    limited: AbstractContextManager[Any] = _blas_controller().limit(limits=1, user_api="blas")
    return limited
