"""A store that stops taking writes (read-only, full disk) on a live server: writes answer
UNAVAILABLE with a clear message, reads and watches go on, a metric and a log line say
why, and everything works again once the store does.

Three ways to take writes away, each a fixture variant:

- ``injected``: the local backend's system calls that write fail with EROFS
  (a fault-injecting ``os`` in `gradmix.store.local`); runs everywhere;
- ``read-only``: the store is a real tmpfs, remounted read-only and back;
- ``full``: the store is a real tmpfs filled to the last byte, then freed.

The two tmpfs variants need to mount (root with CAP_SYS_ADMIN); where mounting
is not permitted they are skipped with that reason, and ``injected`` still
covers the behaviour.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.store import SketchSpec, SketchStore, StoreUnavailableError, local
from gradmix.store.local import LocalBackend
from server_support import Watcher, create_job, start, wait_for

TMPFS_BYTES = 4 << 20
WRITES = frozenset({"open", "write", "pwrite", "ftruncate", "link", "unlink", "replace",
                    "rename", "makedirs", "mkdir"})


class ReadOnlyOs:
    """``os`` as the local backend sees it, on a file system that refuses every write."""

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in WRITES:
            return real

        def refuse(*args: Any, **kwargs: Any) -> Any:
            if name == "open" and not args[1] & (os.O_WRONLY | os.O_RDWR):
                return real(*args, **kwargs)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0]) if args else "")

        return refuse


class Outage:
    """Takes writes away from the store folder and gives them back."""

    def __init__(self, kind: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kind, self.root, self._monkeypatch = kind, root, monkeypatch
        self._filler = root / "filler"

    def begin(self) -> None:
        if self.kind == "injected":
            self._monkeypatch.setattr(local, "os", ReadOnlyOs())
        elif self.kind == "read-only":
            _mount("-o", "remount,ro", str(self.root))
        else:
            fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT)
            try:  # fill the 4 MiB tmpfs to the last byte
                for size in (65536, 4096, 1):
                    with pytest.raises(OSError) as full:
                        for _ in range(TMPFS_BYTES // size + 1):
                            os.write(fd, b"\0" * size)
                    assert full.value.errno == errno.ENOSPC
            finally:
                os.close(fd)

    def end(self) -> None:
        if self.kind == "injected":
            self._monkeypatch.undo()
        elif self.kind == "read-only":
            _mount("-o", "remount,rw", str(self.root))
        else:
            self._filler.unlink()


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(params=["injected", "read-only", "full"])
def outage(request: pytest.FixtureRequest, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Outage]:
    root = tmp_path / "store"
    root.mkdir()
    if request.param != "injected":
        try:
            _mount("-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(root))
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"cannot mount a tmpfs here ({exc}); the injected variant covers this")
    yield Outage(request.param, root, monkeypatch)
    if request.param != "injected":
        subprocess.run(["umount", "-l", str(root)], check=False, timeout=30)


def test_writes_fail_unavailable_while_reads_and_watches_go_on(
    outage: Outage, caplog: pytest.LogCaptureFixture
) -> None:
    h = start(outage.root)
    try:
        create_job(h.stub)
        h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="alpha"))
        first = wait_for(lambda: h.stub.GetMixture(pb.GetMixtureRequest(job="job")),
                         lambda m: "alpha" in m.pending_tasks,  # type: ignore[attr-defined]
                         "a version with alpha")
        assert isinstance(first, pb.Mixture)
        watcher = Watcher(h.stub, "job", after_version=first.version)
        writable = {"name": "gradmix_store_writable"}

        outage.begin()
        with caplog.at_level(logging.ERROR, logger="gradmix.server.jobs"):
            for _ in range(2):
                with pytest.raises(grpc.RpcError) as refused:
                    h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="beta"))
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "sketch store is not writable" in refused.value.details()
        assert h.registry.get_sample_value(writable["name"]) == 0
        assert h.registry.get_sample_value("gradmix_store_write_failures_total") == 2
        said = [r.getMessage() for r in caplog.records if "not writable" in r.getMessage()]
        assert len(said) == 1  # one line when it happens, not one per refused write
        assert h.stub.GetMixture(pb.GetMixtureRequest(job="job")) == first
        tasks = h.stub.ListTasks(pb.ListTasksRequest(job="job"))
        assert [t.name for t in tasks.tasks] == ["alpha"]
        assert [j.name for j in h.stub.ListJobs(pb.ListJobsRequest()).jobs] == ["job"]
        assert watcher.received.empty() and watcher.error is None

        outage.end()
        with caplog.at_level(logging.WARNING, logger="gradmix.server.jobs"):
            h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="beta"))
        assert "sketch store takes writes again" in caplog.text
        assert h.registry.get_sample_value(writable["name"]) == 1
        nxt = watcher.next()  # the same stream, open through the outage
        assert nxt.version == first.version + 1 and "beta" in nxt.pending_tasks
        watcher.cancel()
    finally:
        h.close()


def test_the_store_refuses_each_kind_of_write_with_one_error_and_reports_health(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SketchStore.open(str(tmp_path / "store"))
    store.create_job("job", SketchSpec(dim=4, seed=0))
    store.register_task("job", "alpha")
    store.declare_anchor("job", "a0", 0)
    writer = store.writer("job", "a0", "alpha", "w")
    heard: list[StoreUnavailableError | None] = []
    assert isinstance(store.backend, LocalBackend)
    store.backend.on_health(heard.append)

    monkeypatch.setattr(local, "os", ReadOnlyOs())
    writes = [lambda: store.register_task("job", "beta"),
              lambda: store.declare_anchor("job", "a1", 5),
              lambda: store.complete_anchor("job", "a0"),
              lambda: writer.append(np.ones((2, 4)), np.zeros(2), np.arange(2))]
    for write in writes:
        with pytest.raises(StoreUnavailableError, match="Read-only file system"):
            write()
    assert len(heard) == len(writes) and store.backend.unavailable is not None
    assert [t.name for t in store.list_tasks("job")] == ["alpha"]  # reads go on
    monkeypatch.undo()

    assert writer.append(np.ones((2, 4)), np.zeros(2), np.arange(2)).committed == 2
    assert heard[-1] is None and store.backend.unavailable is None
    store.register_task("job", "beta")
    assert len(heard) == len(writes) + 1  # recovery is told once
    assert sorted(os.listdir(tmp_path / "store" / "jobs" / "job" / "tasks")) == [
        "alpha", "beta", "zarr.json"]  # no scratch left by the refused writes
