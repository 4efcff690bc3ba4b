"""A task whose data cannot be loaded leaves the mixture, on the real server.

ReportTaskFailure marks the task failed with its reason (kept in the store,
so a restarted server still knows), every later mixture gives it weight 0
and state "failed", and an empty reason brings it back. Also: the server
tells where its store is (GetServerInfo).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from client_support import (
    Served,
    create_job,
    mixture_or_none,
    serve,
    sketch_job,
    start_server,
    wait_for,
)
from gradmix.client import Mixture
from gradmix.client.errors import NotFound
from gradmix.store.backend import url_identity


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve(tmp_path)


def test_a_failed_task_gets_weight_zero_until_cleared(served: Served) -> None:
    client = served.client
    create_job(client)
    sketch_job(client)
    client.register_task("job", "broken", {"uri": "s3://nowhere"})
    def broken_pending() -> Mixture | None:
        m = mixture_or_none(client)
        return m if m is not None and m.states.get("broken") == "pending" else None

    pending = wait_for(broken_pending, "the new task pending")
    assert pending.weights["broken"] > 0  # the prior weight: loaders would draw it

    task = client.report_task_failure("job", "broken", "no data file found")
    assert (task.state, task.failure) == ("failed", "no data file found")
    failed = wait_for(
        lambda: m if (m := client.get_mixture("job")).states.get("broken") == "failed" else None,
        "a version without the task",
    )
    assert failed.weights["broken"] == 0.0
    assert sum(failed.weights.values()) == pytest.approx(1.0)
    assert failed.states["help"] == failed.states["harm"] == "active"
    listed = {t.name: t for t in client.list_tasks("job")}
    assert listed["broken"].state == "failed" and listed["broken"].failure

    # A restarted server on the same store still knows.
    served.server.stop(0)
    again, _ = start_server(served.store, served.port)
    try:
        listed = {t.name: t for t in client.list_tasks("job")}
        assert listed["broken"].failure == "no data file found"
        client.report_task_failure("job", "broken", "")
        back = wait_for(
            lambda: m if (m := client.get_mixture("job")).states.get("broken") == "pending"
            else None,
            "the task back, pending",
        )
        assert back.weights["broken"] > 0
        with pytest.raises(NotFound):
            client.report_task_failure("job", "never-registered", "x")
    finally:
        again.stop(0)


def test_the_server_tells_where_its_store_is(served: Served) -> None:
    info = served.client.server_info()
    assert info.store_identity == url_identity(str(served.store))
    assert info.store_identity == f"file:{served.store.resolve()}"
    assert info.store_url == str(served.store)
