"""Shared helpers of the client tests: a real server on a real store, planted sketch rows."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from gradmix.client import Mixture, SelectionClient, SketchSpec
from gradmix.client.errors import NotFound
from gradmix.client.retry import RetryPolicy
from gradmix.server.app import RunningServer, build_server
from gradmix.server.config import ServerConfig
from prometheus_client import CollectorRegistry

DIM = 8
T = TypeVar("T")


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(store: Path, port: int = 0) -> tuple[RunningServer, int]:
    """The real selection server on `store`, gRPC on `port` (0: a free one)."""
    config = ServerConfig(store=str(store), port=port, metrics_port=0, debounce_seconds=0.05,
                          insecure=True)
    return build_server(config, CollectorRegistry())


@dataclass
class Served:
    """A running server, its store path and a client of it."""

    server: RunningServer
    port: int
    store: Path
    client: SelectionClient

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def serve(tmp_path: Path) -> Iterator[Served]:
    """A real server on a fresh store in tmp_path, and a client of it (a fixture body)."""
    server, port = start_server(tmp_path / "store")
    client = SelectionClient(
        f"127.0.0.1:{port}", timeout=10.0,
        retry=RetryPolicy(max_attempts=10, initial_backoff=0.05, max_backoff=0.5),
    )
    try:
        yield Served(server, port, tmp_path / "store", client)
    finally:
        client.close()
        server.stop(0)


def create_job(client: SelectionClient, name: str = "job") -> None:
    client.create_job(name, sketch=SketchSpec(dim=DIM, seed=7, dtype="float32"), target="t.jsonl")


class Planted:
    """Sketch rows with a planted effect: helpful tasks' gradients point along the
    target's direction, harmful ones against it."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        u = self.rng.normal(size=DIM)
        self.direction = u / np.linalg.norm(u)
        self._next_id = 0

    def rows(self, kind: str, n: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sign = {"target": 1.0, "helpful": 1.0, "harmful": -1.0}[kind]
        grads = 2.0 * sign * self.direction + 0.5 * self.rng.normal(size=(n, DIM))
        values = 0.1 * self.rng.normal(size=n)
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        self._next_id += n
        return grads.astype(np.float32), values, ids


def sketch_job(client: SelectionClient, job: str = "job", anchor: str = "a0") -> Planted:
    """Register help/harm tasks, upload target and task rows, complete the anchor."""
    planted = Planted()
    for task in ("help", "harm"):
        client.register_task(job, task)
    client.declare_anchor(job, anchor, 100)
    client.upload_sketch(job, anchor, None, "w0", *planted.rows("target", 64))
    client.upload_sketch(job, anchor, "help", "w0", *planted.rows("helpful"))
    client.upload_sketch(job, anchor, "harm", "w0", *planted.rows("harmful"))
    client.complete_anchor(job, anchor)
    return planted


def mixture_or_none(client: SelectionClient, job: str = "job") -> Mixture | None:
    """The job's latest mixture, or None while the server has yet to publish its
    first (a registration's version is published after the debounce, not at once)."""
    try:
        return client.get_mixture(job)
    except NotFound:
        return None


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Poll `probe` until it returns something (not a timed assertion: a hang guard)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
