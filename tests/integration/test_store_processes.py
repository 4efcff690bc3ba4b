"""Sketch store across real processes: concurrent writers and readers, and SIGKILLed writers.

Every test runs on each backend: a local folder and a bucket on a real
S3-compatible endpoint (moto's server on loopback, see ``store_support``).
Every process opens the store by its location (spawned interpreters, no
shared state); rows are a pure function of their example id, so any process
can check any row bit for bit.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gradmix.store import SketchSpec
from gradmix.store.backend import ChunkPiece, StoreBackend, open_backend
from store_support import (
    BACKENDS_S3_SLOW,
    Location,
    S3Endpoint,
    is_local,
    location,
    s3_endpoint,
)

DIM = 64
SPAWN = mp.get_context("forkserver")
"""Fresh processes forked from a server that imported the store once (no shared state, no
threads inherited; a spawned interpreter would spend seconds importing per child)."""
SPAWN.set_forkserver_preload(["gradmix.store", "s3fs", "store_support"])


def scale(where: Location) -> int:
    """1 on local disk, 4 on the S3 endpoint: moto answers each request in milliseconds,
    so the object-store runs move a quarter of the rows (the same code paths)."""
    return 1 if is_local(where) else 4


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    yield from s3_endpoint()


@pytest.fixture(params=BACKENDS_S3_SLOW)
def where(request: pytest.FixtureRequest, tmp_path: Path, s3: S3Endpoint) -> Location:
    return location(request.param, tmp_path, s3)


def grads_for(ids: np.ndarray) -> np.ndarray:
    """Never-zero float16-exact rows determined by the id (a fill-value row never matches)."""
    ids = np.asarray(ids, dtype=np.float64)[:, None]
    rows = np.cos(ids * 0.731 + np.arange(DIM) * 0.173) + 2.0
    return rows.astype(np.float16).astype(np.float32)


def values_for(ids: np.ndarray) -> np.ndarray:
    return np.asarray(ids, dtype=np.float64) + 0.5


def prepare(where: Location, tasks: tuple[str, ...]) -> None:
    store = where.open()
    store.create_job("job", SketchSpec(dim=DIM, seed=1))
    for task in tasks:
        store.register_task("job", task)
    store.declare_anchor("job", "a0", 0)


def assert_rows_exact(ids: np.ndarray, grads: np.ndarray, values: np.ndarray) -> None:
    np.testing.assert_array_equal(grads, grads_for(ids))
    np.testing.assert_array_equal(values, values_for(ids))


def write_ids(where: Location, task: str, writer: str, ids: list[int], batch: int) -> None:
    """Child: append ``ids`` in batches as one writer id."""
    row_writer = where.open().writer("job", "a0", task, writer)
    for lo in range(0, len(ids), batch):
        part = np.asarray(ids[lo : lo + batch], dtype=np.int64)
        row_writer.append(grads_for(part), values_for(part), part)


def read_until(
    where: Location, tasks: list[str], expected: int, ready: Any, out: mp.Queue
) -> None:
    """Child: poll every task incrementally until ``expected`` rows in all; check each batch."""
    store = where.open()
    ready.set()
    cursors: dict[str, object] = {t: None for t in tasks}
    seen: dict[str, list[int]] = {t: [] for t in tasks}
    polls, deadline = 0, time.monotonic() + 120
    while sum(map(len, seen.values())) < expected and time.monotonic() < deadline:
        for task in tasks:
            rows, cursors[task] = store.read_rows("job", "a0", task, cursors[task])  # type: ignore[arg-type]
            assert_rows_exact(rows.example_ids, rows.grads, rows.values)
            seen[task].extend(rows.example_ids.tolist())
        polls += 1
    out.put((seen, polls))


def test_two_writers_on_two_tasks_and_a_reader_at_once(where: Location) -> None:
    prepare(where, ("alpha", "beta"))
    per_task = 3000 // scale(where)
    out: mp.Queue = SPAWN.Queue()
    ready = SPAWN.Event()
    reader = SPAWN.Process(
        target=read_until, args=(where, ["alpha", "beta"], 2 * per_task, ready, out)
    )
    writers = [
        SPAWN.Process(target=write_ids, args=(where, "alpha", "rank0", list(range(per_task)), 37)),
        SPAWN.Process(target=write_ids,
                      args=(where, "beta", "rank1", list(range(10**6, 10**6 + per_task)), 50)),
    ]
    reader.start()
    assert ready.wait(timeout=120)  # the reader polls from before the first row lands
    for proc in writers:
        proc.start()
    seen, polls = out.get(timeout=180)
    for proc in (reader, *writers):
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert seen["alpha"] == list(range(per_task))
    assert seen["beta"] == list(range(10**6, 10**6 + per_task))
    assert polls > 1  # the reader really read while rows were landing
    store = where.open()
    assert store.committed_rows("job", "a0", "alpha") == per_task
    assert store.committed_rows("job", "a0", "beta") == per_task


def test_several_processes_writing_one_task_lose_and_duplicate_nothing(where: Location) -> None:
    prepare(where, ("alpha",))
    n = 900 // scale(where)
    shared = list(range(5000, 5000 + 4 * n // 9))  # every writer also sends these (re-sent)
    plans = {f"rank{r}": [*range(r * 1000, r * 1000 + n), *shared] for r in range(3)}
    procs = [
        SPAWN.Process(target=write_ids, args=(where, "alpha", name, ids, 64))
        for name, ids in plans.items()
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    store = where.open()
    rows, cursor = store.read_rows("job", "a0", "alpha")
    expected = sorted({i for ids in plans.values() for i in ids})
    assert sorted(rows.example_ids.tolist()) == expected
    assert len(rows) == len(expected)  # nothing returned twice
    assert_rows_exact(rows.example_ids, rows.grads, rows.values)
    assert store.committed_rows("job", "a0", "alpha") == len(expected)
    assert len(store.read_rows("job", "a0", "alpha", cursor)[0]) == 0


def crash_writer(where: Location, report: str, batch: int, stall_at: int) -> None:
    """Child: resume the writer id, re-send its last batch, then append until killed.

    After each append returns, the committed count is appended to ``report``
    (a write(2): it is in the page cache, which outlives a SIGKILL, so no fsync
    is needed and the loop spends its time in appends), so the parent knows a
    lower bound of what was committed.

    With ``stall_at`` > 0 the child stops after its ``stall_at``-th chunk write,
    once the new rows are in the store and before the commit marker, and
    says so in the report (fault injection: the parent then kills it exactly
    mid-write instead of at a random instant).
    """
    if stall_at:
        _stall_after_chunk_write(type(open_backend(where.url, where.options or None)),
                                 report, stall_at)
    row_writer = where.open().writer("job", "a0", "alpha", "crashy")
    start = row_writer.committed
    if start:
        again = np.arange(max(0, start - batch), start)
        if row_writer.append(grads_for(again), values_for(again), again).written != 0:
            os._exit(3)  # a re-sent row was stored twice
    fd = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"ready\n")
    next_id = start
    while True:
        ids = np.arange(next_id, next_id + batch)
        result = row_writer.append(grads_for(ids), values_for(ids), ids)
        next_id = result.committed
        os.write(fd, f"{result.committed}\n".encode())


def _stall_after_chunk_write(backend: type[StoreBackend], report: str, stall_at: int) -> None:
    original = backend.write_pieces
    calls = 0

    def write_then_stall(self: StoreBackend, pieces: list[ChunkPiece]) -> None:
        nonlocal calls
        original(self, pieces)
        calls += 1
        if calls >= stall_at and any("grads" in p.key for p in pieces):
            with open(report, "a") as f:
                f.write("stalled\n")
            time.sleep(600)

    backend.write_pieces = write_then_stall  # type: ignore[method-assign,assignment]


def test_writer_killed_mid_write_loses_nothing_committed(
    where: Location, tmp_path: Path
) -> None:
    prepare(where, ("alpha",))
    rng = random.Random(1234)
    acknowledged = 0
    for kill in range(24 if scale(where) == 1 else 8):  # S3: each restart costs ~2 s
        report = tmp_path / f"report-{kill}.txt"
        batch = rng.choice([7, 33, 64, 100])
        stall_at = rng.randint(4, 40) if kill % 3 == 2 else 0  # every third kill: mid-write
        proc = SPAWN.Process(target=crash_writer, args=(where, str(report), batch, stall_at))
        proc.start()
        wait_for = "stalled" if stall_at else "ready"
        deadline = time.monotonic() + 60
        while not (report.exists() and wait_for in report.read_text().split()):
            assert proc.exitcode is None, f"child exited {proc.exitcode}"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        if not stall_at:
            time.sleep(rng.uniform(0.0, 0.15))
        pid = proc.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        lines = report.read_text().split()
        acknowledged = max([acknowledged, *(int(x) for x in lines if x.isdigit())])

        store = where.open()
        rows, _ = store.read_rows("job", "a0", "alpha")
        committed = store.committed_rows("job", "a0", "alpha")
        assert len(rows) == committed >= acknowledged
        if stall_at:  # the stalled append wrote rows but never committed them
            assert committed == acknowledged
        np.testing.assert_array_equal(rows.example_ids, np.arange(committed))
        assert_rows_exact(rows.example_ids, rows.grads, rows.values)
    assert acknowledged > 0
