"""The store backend contract, run against every backend: a local folder and a bucket on a
real S3-compatible endpoint (moto's server mode on loopback, see ``store_support``).

The first tests pin the seam itself (`gradmix.store.backend.StoreBackend`); the
rest run the sketch store's own flow on each backend, so ``s3://`` stores are
exercised over HTTP exactly like local ones.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gradmix.store import (
    InvalidNameError,
    MixtureRecord,
    SketchSpec,
    SketchStore,
    StoreStateError,
)
from gradmix.store.backend import ChunkPiece, StoreBackend, open_backend
from gradmix.store.local import LocalBackend
from gradmix.store.names import scratch_name
from gradmix.store.objects import ObjectBackend
from store_support import BACKENDS, Location, S3Endpoint, location, s3_endpoint

DIM = 24


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    yield from s3_endpoint()


@pytest.fixture(params=BACKENDS)
def where(request: pytest.FixtureRequest, tmp_path: Path, s3: S3Endpoint) -> Location:
    return location(request.param, tmp_path, s3)


def backend_of(where: Location) -> StoreBackend:
    return open_backend(where.url, where.options or None)


def grads_for(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.float64)[:, None]
    return (np.sin(ids * 0.29 + np.arange(DIM) * 0.07) + 2.0).astype(np.float32)


def record(version: int, anchor: str = "a0") -> MixtureRecord:
    return MixtureRecord(version=version, created_at=1000.0 + version, anchor=anchor,
                         policy="ensemble", weights={"alpha": 0.25, "beta": 0.75},
                         scores={"alpha": -0.1 * version, "beta": 0.2}, states={},
                         anchor_loss=1.5, estimated_loss=1.25)


# --- the seam ------------------------------------------------------------------


def test_open_backend_picks_the_implementation_from_the_url(where: Location) -> None:
    backend = backend_of(where)
    expected = LocalBackend if "://" not in where.url else ObjectBackend
    assert type(backend) is expected
    assert backend.writes_in_place is (expected is LocalBackend)
    assert backend_of(where).identity() == backend.identity()  # same place, same identity


def test_put_replaces_whole_and_get_reads_back(where: Location) -> None:
    backend = backend_of(where)
    assert backend.get("a/b/key") is None
    backend.put("a/b/key", b"first")
    backend.put("a/b/key", b"second, longer")
    assert backend.get("a/b/key") == b"second, longer"
    assert backend_of(where).get("a/b/key") == b"second, longer"  # another open sees it
    assert backend.get_ranges([("a/b/key", 8, 6), ("a/none", 0, 4)]) == [b"longer", b""]
    backend.delete("a/b/key")
    backend.delete("a/b/key")  # deleting what is gone is fine
    assert backend.get("a/b/key") is None


def test_create_is_first_writer_wins(where: Location) -> None:
    backend = backend_of(where)
    assert backend.create("once/zarr.json", b"first") is True
    assert backend_of(where).create("once/zarr.json", b"second") is False
    assert backend.get("once/zarr.json") == b"first"


def test_create_is_exclusive_when_racing_on_local_disk(tmp_path: Path) -> None:
    """Local disk only: moto's server checks If-None-Match and stores in two steps, so two
    racing creators can both succeed there (S3 itself decides atomically)."""
    where = Location(str(tmp_path / "store"))
    backends = [backend_of(where) for _ in range(6)]
    start = threading.Barrier(len(backends))
    won: list[bool] = [False] * len(backends)

    def race(i: int) -> None:
        start.wait(timeout=30)
        won[i] = backends[i].create("race/zarr.json", f"creator {i}".encode())

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(backends))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(won) == 1
    assert backend_of(where).get("race/zarr.json") == f"creator {won.index(True)}".encode()
    assert backend_of(where).create("race/zarr.json", b"late") is False


def test_listing_names_children_and_hides_bookkeeping(where: Location) -> None:
    backend = backend_of(where)
    for key in ("d/one/zarr.json", "d/two", "d/zarr.json", f"d/{scratch_name('x')}",
                "d/zarr.1234abcd.partial", "d/three/deeper/key"):
        backend.put(key, b"x")
    assert sorted(backend.list_dir("d")) == ["one", "three", "two"]
    assert backend.list_dir("nothing/here") == []
    backend.create_marker("d/one/commits/000000000000005", b"note")
    backend.create_marker("d/one/commits/000000000000005", b"again")  # already there: no-op
    assert backend_of(where).list_dir("d/one/commits") == ["000000000000005"]


def test_chunk_pieces_land_in_place_or_whole(where: Location) -> None:
    backend = backend_of(where)
    head = ChunkPiece("arr/c/0", 0, b"\x01" * 4, 16, b"\x01" * 4 + b"\x00" * 12)
    tail = ChunkPiece("arr/c/0", 4, b"\x02" * 4, 16, b"\x01" * 4 + b"\x02" * 4 + b"\x00" * 8)
    backend.write_pieces([head])
    backend.write_pieces([tail])
    assert backend_of(where).get("arr/c/0") == b"\x01" * 4 + b"\x02" * 4 + b"\x00" * 8


# --- the sketch store on each backend --------------------------------------------


def prepared(where: Location) -> SketchStore:
    store = where.open()
    store.create_job("job", SketchSpec(dim=DIM, seed=5, dtype="float32"), {"policy": "ensemble"})
    store.register_task("job", "alpha")
    store.register_task("job", "beta", {"source": "b.jsonl"})
    store.declare_anchor("job", "a0", 0)
    return store


def test_rows_registry_and_mixtures_round_trip(where: Location) -> None:
    store = prepared(where)
    writer = store.writer("job", "a0", "alpha", "rank0")
    for lo in range(0, 1500, 300):  # several gradient chunks (d=24 float32: 1360 rows each)
        ids = np.arange(lo, lo + 300)
        writer.append(grads_for(ids), ids * 0.5, ids)
    target = store.writer("job", "a0", None, "rank0")
    target.append(grads_for(np.arange(7)), np.arange(7.0), np.arange(7))
    store.complete_anchor("job", "a0")
    store.append_mixture("job", record(1))

    again = where.open()
    assert [t.name for t in again.list_tasks("job")] == ["alpha", "beta"]
    assert again.list_anchors("job")[0].state == "complete"
    rows, cursor = again.read_rows("job", "a0", "alpha")
    np.testing.assert_array_equal(rows.example_ids, np.arange(1500))
    np.testing.assert_array_equal(rows.grads, grads_for(np.arange(1500)))
    assert again.sources("job", "a0") == ["alpha"]
    assert again.committed_rows("job", "a0", None) == 7
    writer.append(grads_for(np.arange(1500, 1510)), np.zeros(10), np.arange(1500, 1510))
    new, _ = again.read_rows("job", "a0", "alpha", cursor)
    np.testing.assert_array_equal(new.example_ids, np.arange(1500, 1510))
    assert again.read_mixtures("job") == [record(1)]
    with pytest.raises(StoreStateError):
        again.append_mixture("job", record(1))


def test_a_resumed_writer_continues_after_its_last_commit(where: Location) -> None:
    store = prepared(where)
    first = store.writer("job", "a0", "beta", "w")
    first.append(grads_for(np.arange(40)), np.ones(40), np.arange(40))
    del first
    resumed = where.open().writer("job", "a0", "beta", "w")
    assert resumed.committed == 40
    result = resumed.append(grads_for(np.arange(30, 60)), np.ones(30), np.arange(30, 60))
    assert (result.written, result.committed) == (20, 60)
    rows, _ = where.open().read_rows("job", "a0", "beta")
    np.testing.assert_array_equal(rows.grads, grads_for(np.arange(60)))


@pytest.mark.parametrize("name", ["w.partial", "zarr.json", ".hidden"])
def test_names_that_look_like_bookkeeping_are_refused(where: Location, name: str) -> None:
    store = prepared(where)
    for call in (lambda: store.create_job(name, SketchSpec(dim=4, seed=0)),
                 lambda: store.register_task("job", name),
                 lambda: store.declare_anchor("job", name, 3),
                 lambda: store.writer("job", "a0", "alpha", name)):
        with pytest.raises(InvalidNameError, match="invalid"):
            call()
    assert [t.name for t in store.list_tasks("job")] == ["alpha", "beta"]
    assert [j.name for j in store.list_jobs()] == ["job"]
