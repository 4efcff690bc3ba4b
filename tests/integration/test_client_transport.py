"""Transport behaviour: retries, deadlines, bearer tokens and TLS.

Retries run against the real server. Tokens, deadlines and TLS run against a
small stand-in SelectionService (the real server has no authentication or TLS
yet): it checks the `authorization` header and can be made slow, which the
real server cannot be made on demand.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from client_support import create_job, free_port, start_server
from gradmix.client import SelectionClient, errors
from gradmix.client.retry import RetryPolicy
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.proto.v1 import selection_pb2_grpc as pb_grpc

TOKEN = "s3cret-token"
FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)


class _StandIn(pb_grpc.SelectionServiceServicer):
    """GetJob only: demands the bearer token; the job named "slow" takes 1 s."""

    def __init__(self) -> None:
        self.calls = 0

    def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.Job:
        self.calls += 1
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if request.name == "slow":
            time.sleep(1.0)
        return pb.Job(name=request.name, spec=pb.JobSpec(sketch=pb.SketchSpec(dim=4)))


def _stand_in(credentials: grpc.ServerCredentials | None = None) -> tuple[Any, _StandIn, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = _StandIn()
    pb_grpc.add_SelectionServiceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, servicer, port


@pytest.fixture
def stand_in() -> Iterator[tuple[_StandIn, int]]:
    server, servicer, port = _stand_in()
    yield servicer, port
    server.stop(0)


def test_safe_call_retries_until_the_server_comes_up(tmp_path: Path) -> None:
    port = free_port()
    started: list[Any] = []
    timer = threading.Timer(0.5, lambda: started.append(start_server(tmp_path / "s", port)[0]))
    timer.start()
    patient = RetryPolicy(max_attempts=100, initial_backoff=0.05, max_backoff=0.2)
    try:
        with SelectionClient(f"127.0.0.1:{port}", timeout=2.0, retry=patient) as client:
            assert client.list_jobs() == []  # failed with UNAVAILABLE until the server started
            create_job(client)
            assert client.get_job("job").name == "job"
    finally:
        timer.join()
        for server in started:
            server.stop(0)


def test_unreachable_server_is_unavailable_after_the_retries() -> None:
    client = SelectionClient(f"127.0.0.1:{free_port()}", timeout=1.0, retry=FAST)
    with client, pytest.raises(errors.Unavailable) as failure:
        client.list_jobs()
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE


def test_bearer_token_is_sent_on_an_insecure_channel(stand_in: tuple[_StandIn, int]) -> None:
    _, port = stand_in
    with SelectionClient(f"127.0.0.1:{port}", token=TOKEN) as client:
        assert client.get_job("j").name == "j"
    wrong = SelectionClient(f"127.0.0.1:{port}", token="wrong")
    with wrong, pytest.raises(errors.Unauthenticated) as refused:
        wrong.get_job("j")
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in refused.value.details


def test_deadline_applies_to_every_attempt_and_is_retried(stand_in: tuple[_StandIn, int]) -> None:
    servicer, port = stand_in
    client = SelectionClient(f"127.0.0.1:{port}", token=TOKEN, timeout=0.2, retry=FAST)
    with client, pytest.raises(errors.DeadlineExceeded) as late:
        client.get_job("slow")
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert servicer.calls == FAST.max_attempts


def _self_signed(tmp_path: Path) -> tuple[bytes, bytes]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return key.read_bytes(), cert.read_bytes()


def test_tls_with_bearer_token(tmp_path: Path) -> None:
    try:
        key, cert = _self_signed(tmp_path)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"openssl cannot make a test certificate here: {error}")
    server, _, port = _stand_in(grpc.ssl_server_credentials([(key, cert)]))
    try:
        with SelectionClient(
            f"127.0.0.1:{port}", tls=True, root_certificates=cert, token=TOKEN
        ) as client:
            assert client.get_job("j").name == "j"
        untrusted = SelectionClient(f"127.0.0.1:{port}", tls=True, token=TOKEN, timeout=2.0,
                                    retry=RetryPolicy(max_attempts=1))
        with untrusted, pytest.raises(errors.Unavailable):
            untrusted.get_job("j")  # the self-signed certificate is not in the system roots
    finally:
        server.stop(0)


def test_client_side_argument_errors() -> None:
    with pytest.raises(errors.InvalidArgument):
        SelectionClient("127.0.0.1:1", timeout=0)
    with pytest.raises(errors.InvalidArgument):
        SelectionClient("127.0.0.1:1", root_certificates=b"x")  # needs tls=True
    with pytest.raises(errors.InvalidArgument):
        RetryPolicy(max_attempts=0)


def test_backoff_is_exponential_with_full_jitter() -> None:
    import random

    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    rng = random.Random(0)
    for retry, cap in ((0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (30, 1.0)):
        delays = [policy.delay(retry, rng) for _ in range(2000)]
        assert min(delays) >= 0.0 and max(delays) <= cap
        # Full jitter: spread over the whole [0, cap], not clustered at the cap.
        assert min(delays) < 0.05 * cap and max(delays) > 0.95 * cap
