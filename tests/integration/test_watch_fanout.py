"""Many WatchMixture streams of one job: a burst is served whole, past the bound loudly refused.

A real server on loopback (port 0, plaintext), the real client for the bound,
and grpc.aio stubs for the burst (the client's watch holds a thread per stream;
the bench opens its streams the same way).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from client_support import create_job, sketch_job, wait_for
from gradmix.client import SelectionClient, errors
from gradmix.client.retry import RetryPolicy
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.proto.v1 import selection_pb2_grpc as pb_grpc
from grpc import aio
from server_support import Harness, start

#: Streams opened at once: gRPC's own pending-call bound (1000, then dropped at
#: random up to 3000) cancelled some of a burst this size before the server saw them.
BURST = 1500
CHANNELS = 4
#: Streams whose clients leave just before the server stops.
LEAVING = 1000


def _client(h: Harness) -> SelectionClient:
    return SelectionClient(f"127.0.0.1:{h.server.port}", timeout=10.0,
                           retry=RetryPolicy(max_attempts=5, initial_backoff=0.05, max_backoff=0.3))


def _sample(h: Harness, name: str, labels: dict[str, str]) -> float:
    return h.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def two_watchers(tmp_path: Path) -> Iterator[tuple[Harness, SelectionClient]]:
    h = start(tmp_path / "store", max_watchers=2)
    client = _client(h)
    create_job(client)
    sketch_job(client)
    yield h, client
    client.close()
    h.close()


def test_a_watch_past_max_watchers_is_refused_with_the_setting_named(
        two_watchers: tuple[Harness, SelectionClient]) -> None:
    h, client = two_watchers
    watches = [client.watch("job") for _ in range(2)]
    for watch in watches:
        assert next(watch).version >= 1
    third = client.watch("job")
    with pytest.raises(errors.GradmixError) as info:
        next(third)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_watchers" in info.value.details
    refused = {"method": "WatchMixture", "code": "RESOURCE_EXHAUSTED"}
    assert _sample(h, "gradmix_rpc_requests_total", refused) == 1
    assert _sample(h, "gradmix_watchers", {"gradmix_job": "job"}) == 2

    # A closed stream frees its place for the next watcher.
    watches[0].close()
    wait_for(lambda: True if _sample(h, "gradmix_watchers", {"gradmix_job": "job"}) == 1
             else None, "the server to see the closed stream")
    fourth = client.watch("job")
    assert next(fourth).version >= 1
    for watch in (watches[1], third, fourth):
        watch.close()


async def _open_at_once(address: str, job: str, streams: int) -> list[BaseException]:
    """Open `streams` WatchMixture streams together; the errors of those that end
    before delivering a version."""
    channels = [aio.insecure_channel(address) for _ in range(CHANNELS)]
    try:
        stubs = [pb_grpc.SelectionServiceStub(c) for c in channels]
        calls = [stubs[i % CHANNELS].WatchMixture(pb.WatchMixtureRequest(job=job))
                 for i in range(streams)]
        first = await asyncio.wait_for(
            asyncio.gather(*(call.read() for call in calls), return_exceptions=True), 120)
        for call in calls:
            call.cancel()
        return [m for m in first if not isinstance(m, pb.Mixture)]
    finally:
        for channel in channels:
            await channel.close()


def test_a_burst_of_watch_streams_is_served_whole(tmp_path: Path) -> None:
    h = start(tmp_path / "store")
    client = _client(h)
    try:
        create_job(client)
        sketch_job(client)
        ended = asyncio.run(_open_at_once(f"127.0.0.1:{h.server.port}", "job", BURST))
        codes = sorted({e.code().name for e in ended if isinstance(e, grpc.RpcError)})
        assert len(ended) == 0, f"{len(ended)} of {BURST} streams ended: {codes}"
    finally:
        client.close()
        h.close()



class _Records(logging.Handler):
    """Collects the log records of ERROR and above."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_stopping_a_busy_server_as_its_watchers_leave_logs_no_errors(tmp_path: Path) -> None:
    # A server still busy when its watchers leave and it is told to stop (the bench's
    # 6000 streams): gRPC core counts the left calls as over before their handlers have
    # sent their status, and the stop used to close the event loop under those handlers,
    # logging an asyncio error for each ("aclose(): asynchronous generator is already
    # running"). The test makes the server busy by holding its event loop (one callback
    # that waits, on the server's private loop) while the clients leave and the stop is
    # asked for. The pauses only let gRPC core see the clients leave: were they too
    # short, the test would pass without the fix, never fail with it.
    h = start(tmp_path / "store")
    client = _client(h)
    records = _Records()
    logging.getLogger().addHandler(records)
    channels = [grpc.insecure_channel(f"127.0.0.1:{h.server.port}",
                                      options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CHANNELS)]
    held, release = threading.Event(), threading.Event()
    stopper = threading.Thread(target=h.close)
    try:
        create_job(client)
        sketch_job(client)
        stubs = [pb_grpc.SelectionServiceStub(c) for c in channels]
        calls = [stubs[i % CHANNELS].WatchMixture(pb.WatchMixtureRequest(job="job"), timeout=60)
                 for i in range(LEAVING)]
        assert all(next(call).version >= 1 for call in calls)
        h.server._loop.call_soon_threadsafe(lambda: (held.set(), release.wait(30)))
        assert held.wait(10)
        for channel in channels:
            channel.close()
        time.sleep(0.3)
        stopper.start()
        time.sleep(0.1)
    finally:
        release.set()
        if stopper.is_alive():
            stopper.join(60)
        logging.getLogger().removeHandler(records)
        client.close()
        h.close()
    assert not stopper.is_alive()
    errors = [r.getMessage().splitlines()[0] for r in records.records]
    assert errors == [], f"{len(errors)} error records on stop, the first: {errors[0]}"
