"""Benchmark of the sketch store: append and incremental read throughput.

Appends d=1024 float16 rows in batches of 64 from one writer, then from two
writer processes at once (same task, own writer ids), and reads them back
incrementally the way the server does (``read_rows`` with a cursor after
every few batches). The baseline is the same bytes written and read as plain
files with numpy, on the same disk, in the same run.

    python bench/store.py [--root DIR] [--rows N]

Last line: ``store: write_mb_s=<...> read_mb_s=<...> baseline_write_mb_s=<...>
baseline_read_mb_s=<...> write_ratio=<...> read_ratio=<...>`` (one writer, median
of three rounds; incremental reads; MB are stored float16 gradient bytes; the
ratios are store / baseline from the same run).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from gradmix.store import SketchSpec, SketchStore

DIM = 1024
BATCH = 64
JOB, ANCHOR, TASK = "bench", "a0", "t0"


def _batches(rows: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, rows, BATCH):
        n = min(BATCH, rows - start)
        grads = rng.standard_normal((n, DIM), dtype=np.float32).astype(np.float16)
        ids = np.arange(start, start + n, dtype=np.int64) + seed * 10**9
        out.append((grads, rng.standard_normal(n), ids))
    return out


def _prepare(url: str) -> None:
    store = SketchStore.open(url)
    store.create_job(JOB, SketchSpec(dim=DIM, seed=0, dtype="float16"))
    store.register_task(JOB, TASK)
    store.declare_anchor(JOB, ANCHOR, 0)


def _write(url: str, writer: str, rows: int, seed: int, start_at: float = 0.0) -> float:
    """Append ``rows`` rows as one writer; returns the seconds the appends took."""
    batches = _batches(rows, seed)
    row_writer = SketchStore.open(url).writer(JOB, ANCHOR, TASK, writer)
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.perf_counter()
    for grads, values, ids in batches:
        row_writer.append(grads, values, ids)
    return time.perf_counter() - t0


def _write_child(url: str, writer: str, rows: int, seed: int, start_at: float, q: mp.Queue) -> None:
    q.put(_write(url, writer, rows, seed, start_at))


def _two_writers(url: str, rows: int) -> float:
    """Aggregate append MB/s of two writer processes started together."""
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    start_at = time.time() + 3.0
    procs = [
        ctx.Process(target=_write_child, args=(url, f"w{i}", rows, i + 1, start_at, q))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    seconds = max(q.get(), q.get())
    for p in procs:
        p.join()
    return 2 * rows * DIM * 2 / seconds / 1e6


def _incremental_read(url: str, rows: int) -> float:
    """Write with one writer and read incrementally every 8 batches; MB/s of the reads."""
    store = SketchStore.open(url)
    store.register_task(JOB, "incremental")
    row_writer = store.writer(JOB, ANCHOR, "incremental", "incr")
    cursor, read_s, read_bytes = None, 0.0, 0
    for i, (grads, values, ids) in enumerate(_batches(rows, 7), start=1):
        row_writer.append(grads, values, ids)
        if i % 8 == 0:
            t0 = time.perf_counter()
            got, cursor = store.read_rows(JOB, ANCHOR, "incremental", cursor)
            read_s += time.perf_counter() - t0
            read_bytes += got.grads.shape[0] * DIM * 2
    return read_bytes / read_s / 1e6


def _baseline(root: Path, rows: int) -> tuple[float, float]:
    """Plain numpy files, one per batch: (write MB/s, read MB/s)."""
    batches = _batches(rows, 9)
    folder = root / "baseline"
    folder.mkdir()
    t0 = time.perf_counter()
    for i, (grads, _, _) in enumerate(batches):
        np.save(folder / f"{i}.npy", grads)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    total = sum(np.load(folder / f"{i}.npy").nbytes for i in range(len(batches)))
    read_s = time.perf_counter() - t0
    return total / write_s / 1e6, total / read_s / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="directory on the disk to measure")
    parser.add_argument("--rows", type=int, default=16384, help="rows per writer")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gradmix-bench-", dir=args.root))
    try:
        base_w, base_r = _baseline(root, args.rows)
        print(f"baseline numpy files: write_mb_s={base_w:.1f} read_mb_s={base_r:.1f}")
        url = str(root / "store")
        _prepare(url)
        # The machine may be shared: three rounds (fresh writer ids), the median reported.
        rounds = [
            args.rows * DIM * 2 / _write(url, f"single{r}", args.rows, 100 + r) / 1e6
            for r in range(3)
        ]
        one = statistics.median(rounds)
        shown = " ".join(f"{x:.1f}" for x in rounds)
        print(f"one writer: write_mb_s={one:.1f} (median of {shown}; "
              f"{args.rows} rows of d={DIM} float16 per round)")
        two = _two_writers(url, args.rows)
        print(f"two writer processes: aggregate write_mb_s={two:.1f}")
        read = _incremental_read(url, args.rows)
        print(f"incremental read (every 8 batches of {BATCH}): read_mb_s={read:.1f}")
        print(f"store: write_mb_s={one:.1f} read_mb_s={read:.1f} "
              f"baseline_write_mb_s={base_w:.1f} baseline_read_mb_s={base_r:.1f} "
              f"write_ratio={one / base_w:.2f} read_ratio={read / base_r:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
