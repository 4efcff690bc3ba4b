"""Operator changes on a live server: retire/activate/update tasks, pin and unpin,
delete and archive jobs, the event log; through the real client, the CLI and raw
v1 requests, across a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from client_support import Served, create_job, serve, sketch_job, start_server, wait_for
from gradmix.client import SelectionClient
from gradmix.client.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from gradmix.client.types import Mixture
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.proto.v1 import selection_pb2_grpc as pb_grpc
from gradmix.store import MixtureRecord, SketchStore
from server_support import Harness, Watcher, start

GRADMIX = str(Path(sys.executable).parent / "gradmix")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve(tmp_path)


@pytest.fixture
def alice(served: Served) -> Iterator[SelectionClient]:
    """A second client of the same server that names its actor."""
    with SelectionClient(served.address, actor="alice") as client:
        yield client


def newer(client: SelectionClient, after: int, accept: Any = lambda m: True,
          job: str = "job") -> Mixture:
    """The first mixture version after `after` that `accept`s (waits for it)."""

    def probe() -> Mixture | None:
        for mixture in client.list_mixtures(job, after_version=after):
            if accept(mixture):
                return mixture
        return None

    return wait_for(probe, f"a mixture version after {after}")


def estimated(client: SelectionClient) -> Mixture:
    """The job's first version with both sketched tasks active."""
    return newer(client, 0, lambda m: m.states.get("help") == m.states.get("harm") == "active")


def test_a_retired_task_gets_weight_0_from_the_next_version_and_comes_back(
        served: Served, alice: SelectionClient) -> None:
    client = served.client
    create_job(client)
    client.register_task("job", "web_math.v2", {"url": "s3://typo"})  # the operator's typo
    sketch_job(client)
    before = newer(client, 0, lambda m: m.states.get("help") == "active"
                   and m.states.get("web_math.v2") == "pending")
    assert before.weights["web_math.v2"] > 0.2  # a pending task nobody can load takes a share

    task = alice.retire_task("job", "web_math.v2")
    assert (task.state, task.metadata) == ("retired", {"url": "s3://typo"})
    retired = newer(client, before.version, lambda m: m.states.get("web_math.v2") == "retired")
    assert retired.weights["web_math.v2"] == 0.0
    assert sum(retired.weights.values()) == pytest.approx(1.0)
    assert retired.weights["help"] > retired.weights["harm"] > 0
    assert "web_math.v2" not in retired.pending_tasks
    assert client.get_mixture("job", before.version).weights["web_math.v2"] > 0.2  # history kept
    assert {t.name: t.state for t in client.list_tasks("job")}["web_math.v2"] == "retired"
    assert alice.retire_task("job", "web_math.v2").state == "retired"  # idempotent, no new event

    back = alice.activate_task("job", "web_math.v2")
    assert back.state in ("pending", "active")
    again = newer(client, retired.version, lambda m: m.states.get("web_math.v2") == "pending")
    assert again.weights["web_math.v2"] > 0

    events = client.list_job_events("job")
    assert [(e.sequence, e.action, e.task, e.actor) for e in events] == [
        (1, "retire_task", "web_math.v2", "alice"), (2, "activate_task", "web_math.v2", "alice")]
    assert retired.created_at - 5 < events[0].created_at <= again.created_at
    assert client.list_job_events("job", after_sequence=1) == events[1:]

    with pytest.raises(NotFound, match="not registered"):
        client.retire_task("job", "web_math_v2")


def test_update_task_fixes_metadata_that_re_registering_refuses(
        served: Served, alice: SelectionClient) -> None:
    client = served.client
    create_job(client)
    client.register_task("job", "docs", {"uri": "s3://wrong", "size": "10"})
    with pytest.raises(AlreadyExists):  # unchanged: RegisterTask never rewrites metadata
        client.register_task("job", "docs", {"uri": "s3://right"})
    task = alice.update_task("job", "docs", {"uri": "s3://right"}, remove=["size"])
    assert task.metadata == {"uri": "s3://right"}
    assert client.register_task("job", "docs", {"uri": "s3://right"}).metadata == task.metadata
    assert client.list_tasks("job")[0].metadata == {"uri": "s3://right"}
    [event] = client.list_job_events("job")
    assert (event.action, event.task, event.actor) == ("update_task", "docs", "alice")
    assert event.details == {"metadata.uri": "s3://right", "removed": "size"}
    with pytest.raises(FailedPrecondition, match="last task"):  # a mixture needs one
        client.retire_task("job", "docs")


def test_a_pinned_mixture_publishes_its_weights_until_unpinned(
        served: Served, alice: SelectionClient) -> None:
    client = served.client
    create_job(client)
    sketch_job(client)
    first = estimated(client)
    assert not first.pinned and first.weights["help"] > first.weights["harm"]

    event = alice.pin_mixture("job", {"help": 1.0, "harm": 3.0}, reason="incident 42")
    assert (event.action, event.actor) == ("pin", "alice")
    assert event.details == {"weight.harm": "0.75", "weight.help": "0.25", "reason": "incident 42"}
    pinned = newer(client, first.version, lambda m: m.pinned)
    assert pinned.weights == pytest.approx({"help": 0.25, "harm": 0.75})
    assert pinned.states == {"help": "active", "harm": "active"}
    assert pinned.estimated_loss != first.estimated_loss  # L̂ of the pinned weights

    client.register_task("job", "late")  # a re-estimate that must publish: the tasks changed
    late = newer(client, pinned.version, lambda m: "late" in m.weights)
    assert late.pinned
    assert late.weights == pytest.approx({"help": 0.25, "harm": 0.75, "late": 0.0})
    assert client.estimate_subsets("job", [["help"], ["harm"]]).losses  # estimates go on

    client.pin_mixture("job", {"help": 1.0})
    with pytest.raises(FailedPrecondition, match="pin other weights or unpin"):
        client.retire_task("job", "help")
    alice.pin_mixture("job", {"help": 1.0, "harm": 3.0})
    assert client.retire_task("job", "help").state == "retired"  # harm still carries the pin
    only_harm = newer(client, late.version, lambda m: m.states.get("help") == "retired")
    assert only_harm.pinned and only_harm.weights["harm"] == pytest.approx(1.0)
    with pytest.raises(FailedPrecondition, match="retired"):  # its rows left the estimate
        client.estimate_subsets("job", [["help"]])
    with pytest.raises(FailedPrecondition, match="activate it first"):
        client.pin_mixture("job", {"help": 1.0})
    client.activate_task("job", "help")

    unpinned_event = client.unpin_mixture("job", reason="resolved")
    unpinned = newer(client, only_harm.version,
                     lambda m: not m.pinned and m.states.get("help") == "active")
    assert unpinned.weights["help"] > unpinned.weights["harm"]
    assert unpinned.weights["late"] > 0  # pending: the prior weight again
    assert [e.action for e in client.list_job_events("job")] == [
        "pin", "pin", "pin", "retire_task", "activate_task", "unpin"]
    assert unpinned_event.details == {"reason": "resolved"}
    assert unpinned_event.actor.startswith("ipv4:127.0.0.1:")  # no actor sent: the peer

    with pytest.raises(FailedPrecondition, match="not pinned"):
        client.unpin_mixture("job")
    with pytest.raises(NotFound, match="no task 'nope'"):
        client.pin_mixture("job", {"help": 1.0, "nope": 1.0})
    with pytest.raises(InvalidArgument, match="all 0"):
        client.pin_mixture("job", {"help": 0.0})
    with pytest.raises(InvalidArgument, match="finite"):
        client.pin_mixture("job", {"help": -1.0})


def test_retirements_pins_and_events_survive_a_restart(tmp_path: Path) -> None:
    server, port = start_server(tmp_path / "store")
    with SelectionClient(f"127.0.0.1:{port}", actor="bob") as client:
        create_job(client)
        sketch_job(client)
        client.register_task("job", "typo")
        estimated(client)
        client.retire_task("job", "typo")
        client.pin_mixture("job", {"help": 1.0, "harm": 1.0})
        last = newer(client, 0, lambda m: m.pinned and m.states.get("typo") == "retired")
        events = client.list_job_events("job")
    server.stop(1.0)

    server, port = start_server(tmp_path / "store")
    try:
        with SelectionClient(f"127.0.0.1:{port}") as client:
            assert client.get_mixture("job") == last
            assert {t.name: t.state for t in client.list_tasks("job")}["typo"] == "retired"
            assert client.list_job_events("job") == events
            client.register_task("job", "late")
            after = newer(client, last.version, lambda m: "late" in m.weights)
            assert after.pinned
            assert after.weights == pytest.approx({"help": 0.5, "harm": 0.5, "typo": 0.0,
                                                   "late": 0.0})
    finally:
        server.stop(1.0)


def test_deleting_a_job_ends_its_watchers_and_removes_its_data_and_series(
        tmp_path: Path) -> None:
    h = start(tmp_path / "store")
    client = SelectionClient(f"127.0.0.1:{h.server.port}", actor="alice")
    try:
        deleted_and_recreated(h, client, tmp_path / "store")
    finally:
        client.close()
        h.close()


def deleted_and_recreated(h: Harness, client: SelectionClient, store: Path) -> None:
    def metric(name: str) -> float | None:  # whatever the job's label is named
        return next((s.value for family in h.registry.collect() for s in family.samples
                     if s.name == name and "job" in s.labels.values()), None)

    create_job(client)
    sketch_job(client)
    estimated(client)
    watcher = Watcher(h.stub, "job")
    watcher.next()
    wait_for(lambda: metric("gradmix_watchers") or None, "the watcher counted")
    assert metric("gradmix_mixture_version")
    assert metric("gradmix_mixture_pinned") == 0.0

    event = client.delete_job("job", reason="finished")
    assert (event.action, event.actor, event.details) == ("delete_job", "alice",
                                                          {"reason": "finished"})
    wait_for(lambda: watcher.error, "the watch stream to end")
    assert watcher.error is not None and watcher.error.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFound):
        client.get_job("job")
    with pytest.raises(NotFound):
        client.get_mixture("job")
    assert client.list_jobs() == []
    assert not (store / "jobs" / "job").exists()
    assert not [s for family in h.registry.collect() for s in family.samples
                if "job" in s.labels.values()]
    with pytest.raises(NotFound):
        client.delete_job("job")

    create_job(client)  # the name is free again, with a fresh history
    client.register_task("job", "docs")
    assert newer(client, 0).version == 1
    assert client.list_job_events("job") == []


def test_an_archived_job_keeps_its_data_but_is_no_longer_served(tmp_path: Path) -> None:
    server, port = start_server(tmp_path / "store")
    with SelectionClient(f"127.0.0.1:{port}", actor="carol") as client:
        create_job(client)
        sketch_job(client)
        last = estimated(client)
        event = client.archive_job("job")
        assert event.action == "archive_job"
        with pytest.raises(NotFound, match="archived"):
            client.get_job("job")
        with pytest.raises(FailedPrecondition, match="already archived"):
            client.archive_job("job")
        with pytest.raises(AlreadyExists, match="archived"):
            create_job(client)
        assert client.list_jobs() == []
    server.stop(1.0)

    store = SketchStore.open(str(tmp_path / "store"))  # the data, readable offline
    assert [r.version for r in store.read_mixtures("job")][-1] >= last.version
    assert [e.action for e in store.list_events("job")] == ["archive_job"]
    assert store.committed_rows("job", "a0", "help") == 48

    server, port = start_server(tmp_path / "store")  # not served after a restart either
    try:
        with SelectionClient(f"127.0.0.1:{port}") as client:
            assert client.list_jobs() == []
            with pytest.raises(NotFound, match="archived"):
                client.list_tasks("job")
            client.delete_job("job")  # an archived job can be deleted for good
            create_job(client)
            assert client.get_job("job").mixture_version == 0
    finally:
        server.stop(1.0)


def test_an_archived_job_is_listed_on_request_and_can_be_served_again(tmp_path: Path) -> None:
    h = start(tmp_path / "store")
    client = SelectionClient(f"127.0.0.1:{h.server.port}", actor="carol")
    try:
        create_job(client)
        create_job(client, "other")
        sketch_job(client)
        last = estimated(client)
        client.archive_job("job", reason="paused")
        assert [j.name for j in client.list_jobs()] == ["other"]
        listed = {j.name: j for j in client.list_jobs(include_archived=True)}
        assert set(listed) == {"job", "other"} and listed["other"].archived_at == 0.0
        archived = listed["job"]
        assert archived.archived_at > 0 and archived.mixture_version == last.version
        assert (archived.task_count, archived.current_anchor) == (2, "a0")
        # Its event log stays readable while it is archived.
        assert [e.action for e in client.list_job_events("job")] == ["archive_job"]
        assert h.registry.get_sample_value("gradmix_mixture_version",
                                           {"gradmix_job": "job"}) is None
        with pytest.raises(FailedPrecondition, match="not archived"):
            client.unarchive_job("other")
        with pytest.raises(NotFound):
            client.unarchive_job("never")

        event = client.unarchive_job("job", reason="resumed")
        assert (event.action, event.actor, event.details) == ("unarchive_job", "carol",
                                                              {"reason": "resumed"})
        assert client.get_job("job").mixture_version >= last.version
        assert client.get_mixture("job").weights == last.weights
        assert {j.name: j.archived_at for j in client.list_jobs()} == {"job": 0.0, "other": 0.0}
        wait_for(lambda: h.registry.get_sample_value("gradmix_mixture_version",
                                                     {"gradmix_job": "job"}), "its series back")
        # Served again: new rows re-estimate it.
        client.register_task("job", "docs")
        assert newer(client, last.version, lambda m: "docs" in m.weights).anchor == "a0"
        assert [e.action for e in client.list_job_events("job")] == ["archive_job",
                                                                    "unarchive_job"]
    finally:
        client.close()
        h.close()


def test_requests_from_before_the_lifecycle_api_mean_what_they_meant(served: Served) -> None:
    """Raw v1 messages without the new fields; stored records without them."""
    create_job(served.client)
    with grpc.insecure_channel(served.address) as channel:
        stub = pb_grpc.SelectionServiceStub(channel)
        stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="docs", metadata={"k": "v"}))
        task = stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="docs"))
        assert task.state == pb.TASK_STATE_PENDING and dict(task.metadata) == {"k": "v"}
        mixture = newer(served.client, 0)
        assert not mixture.pinned
        # An UpdateTask that sets nothing changes nothing and logs nothing.
        same = stub.UpdateTask(pb.UpdateTaskRequest(job="job", name="docs"))
        assert same.state == pb.TASK_STATE_PENDING and dict(same.metadata) == {"k": "v"}
    assert served.client.list_job_events("job") == []
    old = {"version": 1, "created_at": 1.0, "anchor": "", "policy": "ensemble",
           "weights": {"a": 1.0}, "scores": {"a": 0.0}, "states": {"a": "pending"},
           "anchor_loss": 0.0, "estimated_loss": 0.0}
    assert MixtureRecord.from_dict(old).pinned is False


def run_cli(served: Served, *args: str) -> Any:
    env = {**os.environ, "GRADMIX_SERVER": served.address, "GRADMIX_ACTOR": "dave"}
    done = subprocess.run([GRADMIX, *args, "--json"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_cli_makes_each_change(served: Served) -> None:
    client = served.client
    create_job(client)
    sketch_job(client)
    client.register_task("job", "typo", {"uri": "x"})
    first = estimated(client)
    assert run_cli(served, "retire-task", "job", "typo")["state"] == "retired"
    assert run_cli(served, "activate-task", "job", "typo")["state"] != "retired"
    task = run_cli(served, "update-task", "job", "typo", "--meta", "url=s3://y",
                   "--remove-meta", "uri")
    assert task["metadata"] == {"url": "s3://y"}
    pin = run_cli(served, "pin", "job", "--weight", "help=3", "--weight", "harm=1",
                  "--actor", "erin")
    assert (pin["action"], pin["actor"]) == ("pin", "erin")
    assert newer(client, first.version, lambda m: m.pinned).weights["help"] == 0.75
    assert run_cli(served, "unpin", "job", "--reason", "done")["action"] == "unpin"
    events = run_cli(served, "events", "job")
    assert [(e["action"], e["actor"]) for e in events] == [
        ("retire_task", "dave"), ("activate_task", "dave"), ("update_task", "dave"),
        ("pin", "erin"), ("unpin", "dave")]
    assert run_cli(served, "archive-job", "job")["action"] == "archive_job"
    assert run_cli(served, "jobs") == []
    (archived,) = run_cli(served, "jobs", "--archived")
    assert archived["name"] == "job" and archived["archived_at"] > 0
    assert run_cli(served, "unarchive-job", "job")["action"] == "unarchive_job"
    assert [j["name"] for j in run_cli(served, "jobs")] == ["job"]
    assert run_cli(served, "delete-job", "job")["action"] == "delete_job"
    assert run_cli(served, "jobs") == []
