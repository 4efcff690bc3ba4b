"""SketchWriter: rows through the store + CommitSketch, or over gRPC, against the real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from client_support import Planted, Served, create_job, serve, wait_for
from gradmix.client import Mixture, SketchWriter, errors
from gradmix.store import SketchStore


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve(tmp_path)


def _prepare(served: Served) -> None:
    create_job(served.client)
    for task in ("help", "harm"):
        served.client.register_task("job", task)
    served.client.declare_anchor("job", "a0", 10)


def _wait_rows(served: Served, task: str, rows: int) -> None:
    """Wait until the server reports `rows` committed rows of `task` at the current anchor."""

    def probe() -> bool | None:
        counts = {t.name: t.sketch_rows for t in served.client.list_tasks("job")}
        return True if counts[task] == rows else None

    wait_for(probe, f"{rows} rows of {task}")


def test_store_path_appends_commits_and_skips_resent_rows(served: Served) -> None:
    _prepare(served)
    store = SketchStore.open(str(served.store))
    planted = Planted()
    rank0 = SketchWriter(served.client, "job", "a0", "help", "rank-0", store=store)
    rank1 = SketchWriter(served.client, "job", "a0", "help", "rank-1", store=store)
    assert rank0.via_store
    first = planted.rows("helpful", 20)
    assert rank0.write(*first) == 20
    assert rank0.write(*first) == 0  # re-sent example ids are not stored twice
    assert rank1.write(*planted.rows("helpful", 12)) == 12
    assert rank1.total_rows == 32  # the server counts every writer of the source
    target = SketchWriter(served.client, "job", "a0", None, "rank-0", store=store)
    assert target.write(*planted.rows("target", 30)) == 30
    SketchWriter(served.client, "job", "a0", "harm", "rank-0", store=store).write(
        *planted.rows("harmful", 16)
    )
    served.client.complete_anchor("job", "a0")
    _wait_rows(served, "help", 32)

    def ranked() -> Mixture | None:
        mixture = served.client.get_mixture("job")
        return None if mixture.pending_tasks else mixture

    mixture = wait_for(ranked, "both tasks active")
    assert mixture.weights["help"] > mixture.weights["harm"]


def test_upload_path_without_store(served: Served) -> None:
    _prepare(served)
    writer = SketchWriter(served.client, "job", "a0", "harm", "remote-0")
    assert not writer.via_store
    rows = Planted().rows("harmful", 40)
    assert writer.write(*rows) == 40
    assert writer.write(*rows) == 0
    served.client.complete_anchor("job", "a0")
    _wait_rows(served, "harm", 40)


def test_store_path_errors_are_client_errors(served: Served) -> None:
    _prepare(served)
    store = SketchStore.open(str(served.store))
    with pytest.raises(errors.NotFound):
        SketchWriter(served.client, "job", "a0", "no-such-task", "rank-0", store=store)
    writer = SketchWriter(served.client, "job", "a0", "help", "rank-0", store=store)
    grads, values, ids = Planted().rows("helpful", 4)
    values[1] = np.inf
    with pytest.raises(errors.InvalidArgument):
        writer.write(grads, values, ids)
    with pytest.raises(errors.InvalidArgument):
        writer.write(grads[:, :3], values, ids)  # wrong dimension
