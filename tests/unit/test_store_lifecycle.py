"""The store's side of operator changes: task updates, the job's control document,
its event log, and deleting a job; on a directory and on fsspec ``memory://``."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from gradmix.store import (
    InvalidSpecError,
    JobControl,
    RecordNotFoundError,
    SketchSpec,
    SketchStore,
)

DIM = 4


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> SketchStore:
    url = (str(tmp_path / "store") if request.param == "local"
           else f"memory://gradmix-lifecycle-{uuid.uuid4().hex}")
    store = SketchStore.open(url)
    store.create_job("job", SketchSpec(dim=DIM, seed=1), {"policy": {}})
    store.register_task("job", "alpha", {"uri": "a", "size": "3"})
    store.declare_anchor("job", "a0", 0)
    ids = np.arange(5)
    store.writer("job", "a0", "alpha", "w").append(np.ones((5, DIM), np.float32),
                                                   np.zeros(5), ids)
    return store


def test_update_task_merges_removes_retires_and_persists(store: SketchStore) -> None:
    info = store.update_task("job", "alpha", metadata={"uri": "b"}, remove=["size", "absent"])
    assert (info.metadata, info.retired_at) == ({"uri": "b"}, 0.0)
    retired = store.update_task("job", "alpha", retired=True)
    assert retired.retired_at > 0 and retired.metadata == {"uri": "b"}
    assert store.update_task("job", "alpha", retired=True).retired_at == retired.retired_at
    reopened = SketchStore.open(store.url)
    [task] = reopened.list_tasks("job")
    assert (task.metadata, task.retired_at) == ({"uri": "b"}, retired.retired_at)
    assert task.registered_at == info.registered_at
    assert reopened.update_task("job", "alpha", retired=False).retired_at == 0.0
    assert reopened.register_task("job", "alpha", {"uri": "b"}).metadata == {"uri": "b"}
    with pytest.raises(RecordNotFoundError):
        store.update_task("job", "nope", retired=True)
    with pytest.raises(InvalidSpecError):
        store.update_task("job", "alpha", metadata={"k": 1})  # type: ignore[dict-item]


def test_control_document_and_events_round_trip(store: SketchStore) -> None:
    assert store.job_control("job") == JobControl()
    store.set_job_control("job", JobControl(pin={"alpha": 1.0}))
    first = store.append_event("job", actor="ann", action="pin", details={"weight.alpha": "1"})
    second = store.append_event("job", actor="ben", action="unpin", task="")
    reopened = SketchStore.open(store.url)
    assert reopened.job_control("job").pin == {"alpha": 1.0}
    assert reopened.list_events("job") == [first, second]
    assert (first.sequence, second.sequence) == (1, 2)
    assert reopened.list_events("job", after_sequence=1) == [second]
    with pytest.raises(InvalidSpecError):
        JobControl(pin={"alpha": 0.0})


def test_delete_job_removes_everything_and_frees_the_name(store: SketchStore) -> None:
    store.append_event("job", actor="ann", action="archive_job")
    assert store.committed_rows("job", "a0", "alpha") == 5
    store.delete_job("job")
    with pytest.raises(RecordNotFoundError):
        store.get_job("job")
    assert store.list_jobs() == []
    assert SketchStore.open(store.url).list_jobs() == []
    store.create_job("job", SketchSpec(dim=DIM, seed=2), {"policy": {}})
    assert store.list_tasks("job") == [] and store.list_events("job") == []
    assert store.read_mixtures("job") == []
    with pytest.raises(RecordNotFoundError):
        store.delete_job("other")
