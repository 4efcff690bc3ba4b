"""watch(), the follower and the torch dataset against the real server, restarts included."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_support import (
    Served,
    create_job,
    free_port,
    serve,
    start_server,
    wait_for,
)
from gradmix.client import MixtureFollower, MixtureSampler, SelectionClient, errors, follow
from gradmix.client.retry import RetryPolicy
from gradmix.client.torch_data import MixtureDataset
from torch.utils.data import DataLoader

FAST_RETRY = RetryPolicy(max_attempts=20, initial_backoff=0.05, max_backoff=0.3)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve(tmp_path)


class Collector:
    """Drains a watch in a background thread, recording versions in order."""

    def __init__(self, client: SelectionClient, job: str, after_version: int = 0) -> None:
        self.stream = client.watch(job, after_version=after_version)
        self.versions: list[int] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for mixture in self.stream:
                self.versions.append(mixture.version)
        except BaseException as error:
            self.error = error

    def wait_version(self, version: int) -> None:
        wait_for(lambda: True if self.versions and self.versions[-1] >= version else None,
                 f"version {version} (seen {self.versions}, error {self.error})")

    def stop(self) -> list[int]:
        self.stream.close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        return self.versions


def _latest(client: SelectionClient) -> int:
    return client.get_job("job").mixture_version


def _add_task(client: SelectionClient, name: str) -> int:
    """Register a task and wait for the version it causes (uniform over one more task)."""
    before = _latest(client)
    client.register_task("job", name)
    return wait_for(lambda: _latest(client) if _latest(client) > before else None,
                    f"a version after registering {name}")


def test_watch_continues_across_server_restart_without_loss_or_repeat(tmp_path: Path) -> None:
    port, store = free_port(), tmp_path / "store"
    server, _ = start_server(store, port)
    client = SelectionClient(f"127.0.0.1:{port}", retry=FAST_RETRY)
    create_job(client)
    for name in ("t0", "t1", "t2"):
        _add_task(client, name)
    collector = Collector(client, "job")
    collector.wait_version(_latest(client))
    before_restart = _latest(client)

    server.stop(0)
    server, _ = start_server(store, port)  # same store, same port
    try:
        # Published right away: some likely land before the watch reconnects,
        # and must come from the history replay.
        for name in ("t3", "t4", "t5"):
            _add_task(client, name)
        last = _latest(client)
        assert last > before_restart
        collector.wait_version(last)
        versions = collector.stop()
        assert collector.error is None
        assert versions == list(range(1, last + 1))
        assert collector.stream.reconnects >= 1
        assert [m.version for m in client.list_mixtures("job")] == versions
    finally:
        client.close()
        server.stop(0)


def test_watch_replays_after_version_then_follows(served: Served) -> None:
    c = served.client
    create_job(c)
    for name in ("a", "b", "c"):
        _add_task(c, name)
    collector = Collector(c, "job", after_version=2)
    collector.wait_version(_latest(c))
    live = _add_task(c, "d")
    collector.wait_version(live)
    assert collector.stop() == list(range(3, live + 1))


def test_watch_of_unknown_job_raises_not_found(served: Served) -> None:
    with pytest.raises(errors.NotFound):
        next(served.client.watch("nope"))


def test_close_ends_a_blocked_watch_and_client_close_ends_all(served: Served) -> None:
    c = served.client
    create_job(c)
    _add_task(c, "a")
    first, second = Collector(c, "job"), Collector(c, "job")
    first.wait_version(1)
    second.wait_version(1)
    first.stream.close()  # from this thread, while the collector blocks in next()
    first.thread.join(timeout=10)
    assert not first.thread.is_alive() and first.error is None
    c.close()
    second.thread.join(timeout=10)
    assert not second.thread.is_alive() and second.error is None


def test_follower_and_follow_switch_to_new_versions(served: Served) -> None:
    c = served.client
    create_job(c)
    _add_task(c, "only")
    with MixtureFollower(c, "job") as follower:
        assert follower.wait(timeout=30).weights == {"only": 1.0}
        assert follower.poll() is None  # nothing newer yet
        version = _add_task(c, "second")
        newer = wait_for(follower.poll, "the follower to see the new version")
        assert newer.version == version and set(newer.weights) == {"only", "second"}

    sampler = MixtureSampler(0)
    draws = follow(sampler, c, "job")

    def switched_to(version: int) -> int | None:
        next(draws)  # each draw first applies the newest version received
        return sampler.version if sampler.version == version else None

    wait_for(lambda: switched_to(_latest(c)), "the sampler to reach the latest version")
    target = _add_task(c, "third")
    wait_for(lambda: switched_to(target), "the sampler to switch to the new version")
    assert set(sampler.weights) == {"only", "second", "third"}
    draws.close()


def test_torch_dataset_workers_follow_the_job(served: Served) -> None:
    create_job(served.client)
    _add_task(served.client, "solo")
    dataset = MixtureDataset(
        1, client_factory=functools.partial(SelectionClient, served.address), job="job", steps=20
    )
    draws = list(DataLoader(dataset, batch_size=None, num_workers=2))
    assert draws == ["solo"] * 40


def test_watch_gives_up_when_asked_and_the_server_stays_down(tmp_path: Path) -> None:
    port = free_port()
    server, _ = start_server(tmp_path / "store", port)
    client = SelectionClient(f"127.0.0.1:{port}", retry=FAST_RETRY)
    try:
        create_job(client)
        _add_task(client, "a")
        stream = client.watch("job", give_up_after=1.0)
        assert next(stream).version == 1
        server.stop(0)
        with pytest.raises(errors.Unavailable, match="last version 1"):
            next(stream)
    finally:
        client.close()
        server.stop(0)
