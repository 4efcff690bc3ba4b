"""Shared pieces of the store tests: where a store lives (a local folder, or a bucket on a
real S3-compatible endpoint) and how to open it from any process.

The S3 endpoint is moto's server mode (``moto.server.ThreadedMotoServer``) on
127.0.0.1 with a free port, started by the tests: the store talks to it over
HTTP through s3fs exactly as it would to S3 or MinIO.

Not a test module by itself; the store tests import it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from gradmix.store import SketchStore
from moto.server import ThreadedMotoServer

BACKENDS = ("local", "s3")
"""The backends every contract test runs against."""


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
