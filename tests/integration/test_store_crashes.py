"""Crash safety of what the server writes: mixture versions (and the rows beside them)
survive a process killed at any write point, across restarts, on every backend.

Two kinds of fault injection:

- at every write point of a mixture append, in process: a :class:`Crash`
  (a ``BaseException``, so no ``except Exception`` cleanup runs, as with a
  SIGKILL) is raised before the k-th mutating system call of the local
  backend, and before or after each key write of either backend; then the
  store is opened afresh, as a restarted server would;
- SIGKILLs at random instants of a process that appends rows and mixture
  versions in a loop (forked from a preloaded forkserver).

After every crash the versions a fresh open reads are consecutive from 1,
include every acknowledged one, and the next append succeeds.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.store import SketchSpec, SketchStore, layout, local
from gradmix.store.names import scratch_name
from server_support import Watcher, create_job, start, wait_for
from store_support import (
    BACKENDS,
    BACKENDS_S3_SLOW,
    Location,
    S3Endpoint,
    append_until_killed,
    is_local,
    location,
    mixture_record,
    s3_endpoint,
)

DIM = 8
FORK = mp.get_context("forkserver")
FORK.set_forkserver_preload(["gradmix.store", "s3fs", "store_support"])


class Crash(BaseException):
    """A process dying at a write point: unwinds past every ``except Exception``."""


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    yield from s3_endpoint()


@pytest.fixture(params=BACKENDS)
def where(request: pytest.FixtureRequest, tmp_path: Path, s3: S3Endpoint) -> Location:
    return location(request.param, tmp_path, s3)


@pytest.fixture(params=BACKENDS_S3_SLOW)
def killed_where(request: pytest.FixtureRequest, tmp_path: Path, s3: S3Endpoint) -> Location:
    return location(request.param, tmp_path, s3)


record = mixture_record


def with_versions(where: Location, count: int) -> SketchStore:
    store = where.open()
    store.create_job("job", SketchSpec(dim=DIM, seed=1))
    store.register_task("job", "alpha")
    store.declare_anchor("job", "a0", 0)
    for version in range(1, count + 1):
        store.append_mixture("job", record(version))
    return store


def check_after_restart(where: Location, written: int, maybe: int) -> None:
    """A fresh open reads 1..written (or ..maybe), each whole, and takes the next version."""
    store = where.open()
    versions = [r.version for r in store.read_mixtures("job")]
    assert versions in (list(range(1, written + 1)), list(range(1, maybe + 1)))
    assert store.read_mixtures("job") == [record(v) for v in versions]
    store.append_mixture("job", record(versions[-1] + 1))
    again = where.open().read_mixtures("job")
    assert again == [record(v) for v in range(1, versions[-1] + 2)]


# --- fault injection at every write point ----------------------------------------

MUTATING = frozenset({"open", "write", "pwrite", "ftruncate", "link", "unlink", "replace",
                      "rename", "makedirs", "mkdir"})


class CrashingOs:
    """``os`` as the local backend sees it: the ``crash_at``-th mutating call raises Crash."""

    def __init__(self, crash_at: int) -> None:
        self.crash_at = crash_at
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in MUTATING:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            if name == "open" and not args[1] & (os.O_WRONLY | os.O_RDWR):
                return real(*args, **kwargs)
            self.calls.append(name)
            if len(self.calls) == self.crash_at:
                raise Crash(f"killed before {name}{args[:1]}")
            return real(*args, **kwargs)

        return call


def test_a_crash_before_any_system_call_of_a_local_mixture_write_is_harmless(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = CrashingOs(crash_at=0)
    store = with_versions(Location(str(tmp_path / "clean")), 2)
    monkeypatch.setattr(local, "os", clean)
    store.append_mixture("job", record(3))
    monkeypatch.undo()
    assert {"makedirs", "link"} <= set(clean.calls)  # the new version's folder, the publish

    after_mkdir = clean.calls.index("makedirs") + 2
    for k in range(1, len(clean.calls) + 1):
        where = Location(str(tmp_path / f"crash-{k}"))
        store = with_versions(where, 2)
        monkeypatch.setattr(local, "os", CrashingOs(crash_at=k))
        with pytest.raises(Crash):
            store.append_mixture("job", record(3))
        monkeypatch.undo()
        folder = tmp_path / f"crash-{k}" / layout.mixture_dir("job", 3)
        if k == after_mkdir:  # the worst instant: a version folder with no document
            assert folder.is_dir() and not (folder / "zarr.json").exists()
        check_after_restart(where, written=2, maybe=3)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_crash_around_each_key_write_of_a_mixture_append_is_harmless(
    where: Location, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    store = with_versions(where, 2)
    backend = store.backend
    writes: list[str] = []

    def crashing(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(key: str, *args: Any) -> Any:
            writes.append(key)
            if when == "before":
                raise Crash(key)
            method(key, *args)
            raise Crash(key)
        return call

    for name in ("put", "create", "create_marker", "delete", "write_pieces"):
        monkeypatch.setattr(backend, name, crashing(getattr(backend, name)))
    with pytest.raises(Crash):
        store.append_mixture("job", record(3))
    monkeypatch.undo()
    assert writes == [f"{layout.mixture_dir('job', 3)}/zarr.json"]  # one key write in all
    check_after_restart(where, written=2 if when == "before" else 3, maybe=3)


def test_a_version_folder_left_empty_by_a_killed_write_neither_blocks_nor_shows(
    tmp_path: Path,
) -> None:
    """What a SIGKILL at the worst instant used to leave: every later append refused."""
    where = Location(str(tmp_path / "store"))
    with_versions(where, 3)
    folder = tmp_path / "store" / layout.mixture_dir("job", 4)
    folder.mkdir()
    (folder / scratch_name("zarr.json")).write_bytes(b'{"half": ')
    store = where.open()
    assert [r.version for r in store.read_mixtures("job")] == [1, 2, 3]
    store.append_mixture("job", record(4))
    store.append_mixture("job", record(5))
    assert [r.version for r in where.open().read_mixtures("job")] == [1, 2, 3, 4, 5]


def test_a_server_restarted_on_a_half_written_version_publishes_the_next(
    tmp_path: Path,
) -> None:
    h = start(tmp_path / "store")
    try:
        create_job(h.stub)
        h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="alpha"))
        first = wait_for(lambda: h.stub.GetMixture(pb.GetMixtureRequest(job="job")),
                         lambda m: "alpha" in m.pending_tasks,  # type: ignore[attr-defined]
                         "a version with alpha")
        assert isinstance(first, pb.Mixture)
    finally:
        h.close()
    folder = tmp_path / "store" / layout.mixture_dir("job", first.version + 1)
    folder.mkdir()
    (folder / scratch_name("zarr.json")).write_bytes(b"")
    h = start(tmp_path / "store")
    try:
        h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="beta"))
        nxt = wait_for(lambda: h.stub.GetMixture(pb.GetMixtureRequest(job="job")),
                       lambda m: "beta" in m.pending_tasks,  # type: ignore[attr-defined]
                       "a version with beta")
        assert isinstance(nxt, pb.Mixture)
        assert nxt.version == first.version + 1
    finally:
        h.close()


# --- SIGKILL under load ------------------------------------------------------------


def test_random_sigkills_under_load_lose_no_version_and_never_block(
    killed_where: Location, tmp_path: Path
) -> None:
    where = killed_where
    with_versions(where, 0)
    rng = random.Random(7)
    acknowledged = 0
    # S3 (moto): a restart costs ~1 s and a round ~0.1 s, so fewer kills, later ones.
    kills, spread = (24, 0.1) if is_local(where) else (6, 1.0)
    for kill in range(kills):
        report = tmp_path / f"report-{kill}.txt"
        proc = FORK.Process(target=append_until_killed, args=(where, str(report)))
        proc.start()
        deadline = time.monotonic() + 60
        while not (report.exists() and "ready" in report.read_text().split()):
            assert proc.exitcode is None, f"child exited {proc.exitcode}"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, spread))
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        lines = report.read_text().split()
        acknowledged = max([acknowledged, *(int(x) for x in lines if x.isdigit())])
        versions = [r.version for r in where.open().read_mixtures("job")]
        assert versions == list(range(1, len(versions) + 1))
        assert len(versions) >= acknowledged
    assert acknowledged > 0  # the kills landed while versions were being written
    check_after_restart(where, written=acknowledged, maybe=len(
        where.open().read_mixtures("job")))


def test_a_version_whose_write_reply_was_lost_is_published_not_retried_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the version's document lands, then the write raises (an object-store
    PUT whose reply was lost). The server's retry finds it in the store and publishes it,
    instead of re-writing that version number forever."""
    h = start(tmp_path / "store")
    try:
        create_job(h.stub)
        h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="alpha"))
        first = wait_for(lambda: h.stub.GetMixture(pb.GetMixtureRequest(job="job")),
                         lambda m: "alpha" in m.pending_tasks,  # type: ignore[attr-defined]
                         "a version with alpha")
        assert isinstance(first, pb.Mixture)
        watcher = Watcher(h.stub, "job", after_version=first.version)
        real_create = local.LocalBackend.create
        lost: list[str] = []

        def create_then_lose_the_reply(self: local.LocalBackend, key: str, data: bytes) -> bool:
            created = real_create(self, key, data)
            if "/mixtures/" in key and not lost:
                lost.append(key)
                raise OSError(errno.ECONNRESET, "connection reset by peer")
            return created

        monkeypatch.setattr(local.LocalBackend, "create", create_then_lose_the_reply)
        h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="beta"))
        second = watcher.next()
        assert lost == [f"{layout.mixture_dir('job', first.version + 1)}/zarr.json"]
        assert second.version == first.version + 1 and "beta" in second.pending_tasks
        h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="gamma"))
        third = watcher.next()
        assert third.version == first.version + 2 and "gamma" in third.pending_tasks
        assert [r.version for r in SketchStore.open(str(tmp_path / "store")).read_mixtures(
            "job")] == list(range(1, third.version + 1))
        watcher.cancel()
    finally:
        h.close()
