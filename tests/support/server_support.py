"""Shared pieces of the server tests: a real server on loopback, stubs, planted sketches.

Not a test module by itself (it has no tests); the server tests import it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from gradmix.demo.planted import planted_tasks
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.proto.v1 import selection_pb2_grpc as pb_grpc
from gradmix.server.app import RunningServer, build_server
from gradmix.server.config import ServerConfig
from gradmix.server.rows import encode_rows
from gradmix.store import SketchStore
from prometheus_client import CollectorRegistry

DIM = 16
WAIT_S = 20.0


@dataclass
class Harness:
    """A running server, a stub on it, and the store it serves."""

    server: RunningServer
    stub: pb_grpc.SelectionServiceStub
    channel: grpc.Channel
    store: SketchStore
    registry: CollectorRegistry
    config: ServerConfig

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=1.0)


def start(store_dir: Path, **overrides: object) -> Harness:
    """A real server on 127.0.0.1, port 0, on the store at `store_dir`."""
    settings: dict[str, object] = {"store": str(store_dir), "port": 0, "metrics_port": 0,
                                   "debounce_seconds": 0.02, "insecure": True}
    settings.update(overrides)
    config = ServerConfig(**settings)  # type: ignore[arg-type]
    registry = CollectorRegistry()
    server, port = build_server(config, registry)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return Harness(server, pb_grpc.SelectionServiceStub(channel), channel,
                   SketchStore.open(str(store_dir)), registry, config)


def serve(tmp_path: Path) -> Iterator[Harness]:
    """The body of each test module's `harness` fixture: a server for one test."""
    h = start(tmp_path / "store")
    yield h
    h.close()


def create_job(stub: pb_grpc.SelectionServiceStub, name: str = "job", dim: int = DIM,
               **policy: object) -> pb.Job:
    spec = pb.JobSpec(sketch=pb.SketchSpec(dim=dim, seed=7),
                      policy=pb.PolicySettings(**policy), target="val.jsonl")  # type: ignore[arg-type]
    return stub.CreateJob(pb.CreateJobRequest(name=name, spec=spec))


def source(job: str, anchor: str, task: str | None) -> pb.SketchSource:
    if task is None:
        return pb.SketchSource(job=job, anchor=anchor, target=True)
    return pb.SketchSource(job=job, anchor=anchor, task=task)


Rows = tuple[np.ndarray, np.ndarray, np.ndarray]


def random_rows(n: int, dim: int = DIM, seed: int = 0, first_id: int = 0) -> Rows:
    """n rows of (grads float32, values, example ids first_id..) with no planted effect."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, dim)).astype(np.float32), 0.5 * rng.normal(size=n),
            np.arange(first_id, first_id + n, dtype=np.int64))


class Planted:
    """Sketches with a planted effect on the target (`gradmix.demo.planted`).

    Tasks are named "helpful-<i>", "harmful-<i>", "neutral-<i>".
    """

    def __init__(self, helpful: int = 2, harmful: int = 2, neutral: int = 0, *,
                 rows: int = 48, dim: int = DIM, seed: int = 0) -> None:
        grads, values, tasks, labels = planted_tasks(helpful, harmful, neutral, rows, dim, seed)
        self.sources: dict[str | None, tuple[np.ndarray, np.ndarray]] = {None: (grads, values)}
        self.sources.update(tasks)
        self.labels = labels

    def names(self, kind: str) -> list[str]:
        return sorted(t for t, k in self.labels.items() if k == kind)

    def rows(self, task: str | None, start: int = 0, stop: int | None = None) -> Rows:
        """Rows [start, stop) of a task (None: the target), example ids = row numbers."""
        grads, values = self.sources[task]
        stop = len(values) if stop is None else stop
        return grads[start:stop], values[start:stop], np.arange(start, stop, dtype=np.int64)


def commit_via_store(h: Harness, job: str, anchor: str, task: str | None,
                     rows: Rows, writer: str = "w0") -> int:
    """Append rows with the store's RowWriter, then CommitSketch; the source's total."""
    result = h.store.writer(job, anchor, task, writer).append(*rows)
    response = h.stub.CommitSketch(pb.CommitSketchRequest(
        source=source(job, anchor, task), writer=writer, committed_rows=result.committed))
    return int(response.total_rows)


def upload_requests(job: str, anchor: str, task: str | None,
                    chunks: list[Rows],
                    writer: str = "up0") -> Iterator[pb.UploadSketchRequest]:
    yield pb.UploadSketchRequest(header=pb.UploadSketchHeader(
        source=source(job, anchor, task), writer=writer))
    for grads, values, ids in chunks:
        yield pb.UploadSketchRequest(rows=encode_rows(grads, values, ids))


def wait_for(fetch: Callable[[], object], accept: Callable[[object], bool],
             what: str, timeout: float = WAIT_S) -> object:
    """Poll `fetch` until `accept` holds (a deadline, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = fetch()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        else:
            if accept(last):
                return last
        time.sleep(0.02)
    raise AssertionError(f"gave up waiting for {what}; last: {last}")


def weights(mixture: pb.Mixture) -> dict[str, float]:
    return {w.task: w.weight for w in mixture.weights}


def states(mixture: pb.Mixture) -> dict[str, int]:
    return {w.task: w.state for w in mixture.weights}


class Watcher:
    """A WatchMixture stream read on a thread into a queue."""

    def __init__(self, stub: pb_grpc.SelectionServiceStub, job: str, after_version: int = 0):
        self._call = stub.WatchMixture(pb.WatchMixtureRequest(job=job,
                                                              after_version=after_version))
        self.received: queue.Queue[pb.Mixture] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for mixture in self._call:
                self.received.put(mixture)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc

    def next(self, timeout: float = WAIT_S) -> pb.Mixture:
        return self.received.get(timeout=timeout)

    def until(self, accept: Callable[[pb.Mixture], bool], what: str) -> pb.Mixture:
        deadline = time.monotonic() + WAIT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"watcher never received {what}")
            try:
                mixture = self.received.get(timeout=remaining)
            except queue.Empty as exc:
                raise AssertionError(f"watcher never received {what}") from exc
            if accept(mixture):
                return mixture

    def cancel(self) -> None:
        self._call.cancel()
        self._thread.join(timeout=5.0)
