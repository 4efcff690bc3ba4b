"""Shared pieces of the store tests: where a store lives (a local folder, or a bucket on a
real S3-compatible endpoint) and how to open it from any process.

The S3 endpoint is moto's server mode (``moto.server.ThreadedMotoServer``) on
127.0.0.1 with a free port, started by the tests: the store talks to it over
HTTP through s3fs exactly as it would to S3 or MinIO.

Not a test module by itself; the store tests import it.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gradmix.store import MixtureRecord, SketchStore

BACKENDS = ("local", "s3")
"""The backends every contract test runs against."""

BACKENDS_S3_SLOW = ("local", pytest.param("s3", marks=pytest.mark.slow))
"""The same, for multi-process tests: their S3 runs take 15-30 s on a 2-core machine."""


@dataclass(frozen=True)
class Location:
    """A store's URL and fsspec options: all a process needs to open it (picklable)."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)

    def open(self) -> SketchStore:
        return SketchStore.open(self.url, self.options or None)


class S3Endpoint:
    """moto's S3 server on loopback; each :meth:`bucket` is a fresh, empty store location."""

    def __init__(self) -> None:
        import boto3  # imported here: child processes of the tests never need them
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self._client = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                                    aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self) -> Location:
        name = f"gradmix-{uuid.uuid4().hex[:12]}"
        self._client.create_bucket(Bucket=name)
        options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": self.url, "region_name": "us-east-1"}}
        return Location(f"s3://{name}/store", options)

    def stop(self) -> None:
        self._server.stop()


def is_local(where: Location) -> bool:
    return "://" not in where.url


def s3_endpoint() -> Iterator[S3Endpoint]:
    """The body of a module's session-wide ``s3`` fixture."""
    endpoint = S3Endpoint()
    yield endpoint
    endpoint.stop()


def location(kind: str, tmp_path: Path, s3: S3Endpoint) -> Location:
    """A fresh store location of the given backend kind."""
    if kind == "local":
        return Location(str(tmp_path / "store"))
    return s3.bucket()


def mixture_record(version: int) -> MixtureRecord:
    """The mixture record the crash tests write as ``version`` (a pure function of it)."""
    return MixtureRecord(version=version, created_at=float(version), anchor="a0",
                         policy="ensemble", weights={"alpha": 1.0 / version},
                         scores={"alpha": -float(version)}, states={"alpha": "active"},
                         anchor_loss=2.0, estimated_loss=1.5)


def append_until_killed(where: Location, report: str) -> None:
    """Child process: append rows and a mixture version per round until killed.

    After each round the version is appended to ``report`` (a write(2) lands in
    the page cache, which outlives a SIGKILL), so the parent knows what was
    acknowledged.
    """
    store = where.open()
    writer = store.writer("job", "a0", "alpha", "w")
    versions = store.read_mixtures("job")
    last = versions[-1].version if versions else 0
    next_id = writer.committed
    dim = store.get_job("job").spec.dim
    fd = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"ready\n")
    while True:
        ids = np.arange(next_id, next_id + 8)
        grads = np.cos(ids[:, None] * 0.5 + np.arange(dim)).astype(np.float32)
        next_id = writer.append(grads, ids * 1.0, ids).committed
        store.append_mixture("job", mixture_record(last + 1))
        last += 1
        os.write(fd, f"{last}\n".encode())
