"""Sketch store, single process: registry, rows, cursors, validation and mixture history.

Real Zarr stores: a directory under tmp_path, and fsspec ``memory://``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import pickle
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from gradmix.store import (
    AppendResult,
    CalibrationRecord,
    Horizon,
    InvalidNameError,
    InvalidRowsError,
    InvalidSpecError,
    MixtureRecord,
    RecordNotFoundError,
    SketchSpec,
    SketchSpecError,
    SketchStore,
    SpecMismatchError,
    StoreError,
    StoreStateError,
    validate_name,
)
from gradmix.store.records import _encode_float

DIM = 16


def grads_for(ids: np.ndarray, dim: int = DIM) -> np.ndarray:
    """Distinct, never-zero rows determined by the example id."""
    ids = np.asarray(ids, dtype=np.float64)[:, None]
    return (np.cos(ids * 0.37 + np.arange(dim) * 0.11) + 2.0).astype(np.float32)


def values_for(ids: np.ndarray) -> np.ndarray:
    return np.asarray(ids, dtype=np.float64) * 0.5 + 0.25


def prepared(url: str, dtype: str = "float16") -> SketchStore:
    store = SketchStore.open(url)
    store.create_job("job", SketchSpec(dim=DIM, seed=3, dtype=dtype), {"policy": "ensemble"})
    store.register_task("job", "alpha", {"source": "a.jsonl"})
    store.register_task("job", "beta")
    store.declare_anchor("job", "a0", 0)
    return store


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(params=["local", "memory"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return f"memory://gradmix-test-{uuid.uuid4().hex}"


def test_basic_flow_round_trips_rows_bit_exact(url: str) -> None:
    store = prepared(url, dtype="float32")
    ids = np.arange(300)
    writer = store.writer("job", "a0", "alpha", "rank0")
    for lo in range(0, 300, 70):
        chunk = ids[lo : lo + 70]
        writer.append(grads_for(chunk), values_for(chunk), chunk)
    target = store.writer("job", "a0", None, "rank0")
    assert target.append(grads_for(ids[:5]), values_for(ids[:5]), ids[:5]).committed == 5

    reopened = SketchStore.open(url)
    rows, _ = reopened.read_rows("job", "a0", "alpha")
    assert len(rows) == 300
    np.testing.assert_array_equal(rows.example_ids, ids)
    np.testing.assert_array_equal(rows.grads, grads_for(ids))
    np.testing.assert_array_equal(rows.values, values_for(ids))
    assert rows.grads.dtype == np.float32 and rows.values.dtype == np.float64
    assert len(reopened.read_rows("job", "a0", None)[0]) == 5
    assert reopened.committed_rows("job", "a0", "alpha") == 300
    assert reopened.committed_rows("job", "a0", None, "rank0") == 5
    assert reopened.sources("job", "a0") == ["alpha"]


def test_rows_spanning_many_chunks_round_trip(url: str) -> None:
    store = SketchStore.open(url)
    dim = 1024  # 64 float16 rows per gradient chunk
    store.create_job("wide", SketchSpec(dim=dim, seed=0))
    store.register_task("wide", "t")
    store.declare_anchor("wide", "a", 0)
    writer = store.writer("wide", "a", "t", "w")
    ids = np.arange(1100)
    cursor, got = None, []
    for lo in range(0, 1100, 50):
        part = ids[lo : lo + 50]
        writer.append(grads_for(part, dim), values_for(part), part)
        rows, cursor = store.read_rows("wide", "a", "t", cursor)
        got.append(rows)
    assert np.concatenate([r.example_ids for r in got]).tolist() == ids.tolist()
    all_rows, _ = SketchStore.open(url).read_rows("wide", "a", "t")
    expected = grads_for(ids, dim).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(all_rows.grads, expected)
    np.testing.assert_array_equal(np.concatenate([r.grads for r in got]), expected)
    np.testing.assert_array_equal(all_rows.values, values_for(ids))


def test_float16_rows_read_back_as_their_float16_values(url: str) -> None:
    store = prepared(url)
    ids = np.arange(10)
    store.writer("job", "a0", "beta", "w").append(grads_for(ids), values_for(ids), ids)
    rows, _ = store.read_rows("job", "a0", "beta")
    np.testing.assert_array_equal(rows.grads, grads_for(ids).astype(np.float16).astype(np.float32))


def test_cursor_returns_only_new_rows_and_survives_pickling(url: str) -> None:
    store = prepared(url)
    writer = store.writer("job", "a0", "alpha", "w")
    writer.append(grads_for(np.arange(4)), values_for(np.arange(4)), np.arange(4))
    first, cursor = store.read_rows("job", "a0", "alpha")
    assert first.example_ids.tolist() == [0, 1, 2, 3]
    empty, cursor = store.read_rows("job", "a0", "alpha", cursor)
    assert len(empty) == 0 and empty.grads.shape == (0, DIM)

    writer.append(grads_for(np.arange(4, 9)), values_for(np.arange(4, 9)), np.arange(4, 9))
    cursor = pickle.loads(pickle.dumps(cursor))
    second, _ = store.read_rows("job", "a0", "alpha", cursor)
    assert second.example_ids.tolist() == [4, 5, 6, 7, 8]
    with pytest.raises(StoreStateError):
        store.read_rows("job", "a0", "beta", cursor)


def test_resent_rows_are_skipped_and_never_read_twice(url: str) -> None:
    store = prepared(url)
    w0 = store.writer("job", "a0", "alpha", "w0")
    assert w0.append(grads_for(np.arange(10)), values_for(np.arange(10)), np.arange(10)) == (
        AppendResult(written=10, committed=10)
    )
    again = np.arange(5, 15)
    assert w0.append(grads_for(again), values_for(again), again) == AppendResult(5, 15)
    # Another writer id of the same source re-sending committed ids: skipped too.
    w1 = store.writer("job", "a0", "alpha", "w1")
    late = np.arange(12, 20)
    assert w1.append(grads_for(late), values_for(late), late).written == 5
    rows, _ = store.read_rows("job", "a0", "alpha")
    assert sorted(rows.example_ids.tolist()) == list(range(20))
    assert store.committed_rows("job", "a0", "alpha") == 20


def test_reader_drops_duplicate_ids_across_writers_along_the_lineage(tmp_path: Path) -> None:
    store = prepared(str(tmp_path / "s"))
    w0 = store.writer("job", "a0", "alpha", "w0")
    w0.append(grads_for(np.arange(6)), values_for(np.arange(6)), np.arange(6))
    _, cursor = store.read_rows("job", "a0", "alpha")
    # A second process whose writer did not yet see w0's ids stores some again
    # (cross-writer skipping is best effort); the reader must not return them twice.
    other = SketchStore.open(str(tmp_path / "s")).writer("job", "a0", "alpha", "w1")
    other._peers_at = time.monotonic() + 3600  # this writer has not looked at w0 yet
    other._peers.ids = other._peers.ids[:0]
    overlap = np.arange(3, 9)
    assert other.append(grads_for(overlap), values_for(overlap), overlap).written == 6
    more, _ = store.read_rows("job", "a0", "alpha", cursor)
    assert more.example_ids.tolist() == [6, 7, 8]
    assert store.committed_rows("job", "a0", "alpha") == 9
    assert store.committed_rows("job", "a0", "alpha", "w1") == 6


def test_arrays_are_plain_zarr_readable_without_the_store(tmp_path: Path) -> None:
    store = prepared(str(tmp_path / "s"))
    ids = np.arange(150)
    writer = store.writer("job", "a0", "alpha", "w")
    for lo in range(0, 150, 37):
        part = ids[lo : lo + 37]
        writer.append(grads_for(part), values_for(part), part)
    base = "jobs/job/anchors/a0/tasks/alpha/writers/w"
    local = str(tmp_path / "s")
    ids_array = zarr.open_array(local, path=f"{base}/example_ids", mode="r")
    grads_array = zarr.open_array(local, path=f"{base}/grads", mode="r")
    np.testing.assert_array_equal(ids_array[:150], ids)
    np.testing.assert_array_equal(grads_array[:150], grads_for(ids).astype(np.float16))


def test_writer_resumes_after_uncommitted_garbage(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    store = prepared(url)
    writer = store.writer("job", "a0", "alpha", "w")
    writer.append(grads_for(np.arange(5)), values_for(np.arange(5)), np.arange(5))
    # What a killed append leaves: rows written past the committed count, no marker.
    garbage = np.arange(99, 102)
    blocks = (grads_for(garbage).astype(np.float16), values_for(garbage), garbage)
    for column, rows in zip(writer._columns, blocks, strict=True):
        column.grow(8)
        store.backend.write_pieces(column.pieces(5, rows, whole=False))
    del writer, column  # the process that held the writer is gone
    gc.collect()

    fresh = SketchStore.open(url)
    assert len(fresh.read_rows("job", "a0", "alpha")[0]) == 5
    resumed = fresh.writer("job", "a0", "alpha", "w")
    assert resumed.committed == 5
    resumed.append(grads_for(np.arange(5, 7)), values_for(np.arange(5, 7)), np.arange(5, 7))
    rows, _ = SketchStore.open(url).read_rows("job", "a0", "alpha")
    np.testing.assert_array_equal(rows.example_ids, np.arange(7))
    np.testing.assert_array_equal(rows.values, values_for(np.arange(7)))
    np.testing.assert_array_equal(rows.grads, grads_for(np.arange(7)).astype(np.float16))


@pytest.mark.parametrize("marker_landed", [True, False])
def test_failed_commit_never_writes_over_committed_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, marker_landed: bool
) -> None:
    """Fault injection: the commit marker step raises, after or before the marker landed."""
    url = str(tmp_path / "s")
    store = prepared(url)
    writer = store.writer("job", "a0", "alpha", "w")
    writer.append(grads_for(np.arange(4)), values_for(np.arange(4)), np.arange(4))
    backend = store.backend
    original = type(backend).create_marker

    def flaky(self: object, key: str, data: bytes) -> None:
        if marker_landed:
            original(backend, key, data)
        raise OSError("connection reset while committing")

    monkeypatch.setattr(type(backend), "create_marker", flaky)
    with pytest.raises(OSError):
        writer.append(grads_for(np.arange(4, 8)), values_for(np.arange(4, 8)), np.arange(4, 8))
    monkeypatch.undo()
    assert writer.committed == (8 if marker_landed else 4)
    # The caller retries the same rows, then goes on.
    retry = writer.append(grads_for(np.arange(4, 8)), values_for(np.arange(4, 8)), np.arange(4, 8))
    assert retry == AppendResult(written=0 if marker_landed else 4, committed=8)
    writer.append(grads_for(np.arange(8, 11)), values_for(np.arange(8, 11)), np.arange(8, 11))
    rows, _ = SketchStore.open(url).read_rows("job", "a0", "alpha")
    np.testing.assert_array_equal(rows.example_ids, np.arange(11))
    np.testing.assert_array_equal(rows.grads, grads_for(np.arange(11)).astype(np.float16))


def test_threads_sharing_a_writer_id_in_one_process_lose_nothing(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    prepared(url)

    def work(thread: int) -> None:
        writer = SketchStore.open(url).writer("job", "a0", "alpha", "shared")
        for batch in range(15):
            ids = np.arange(10) + 1000 * thread + 10 * batch
            writer.append(grads_for(ids), values_for(ids), ids)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows, _ = SketchStore.open(url).read_rows("job", "a0", "alpha")
    assert sorted(rows.example_ids.tolist()) == sorted(
        int(i) for t in range(4) for i in np.arange(150) + 1000 * t
    )
    np.testing.assert_array_equal(rows.grads, grads_for(rows.example_ids).astype(np.float16))


# --- validation: typed errors, store unchanged --------------------------------


@pytest.mark.parametrize(
    "name", ["", "../x", "a/b", "..", "a..b", ".hidden", "-x", "x" * 129, "a b", "zarr.json", "é",
             "w.partial", "x.PARTIAL.partial"]
)
def test_bad_names_are_refused_everywhere(tmp_path: Path, name: str) -> None:
    root = tmp_path / "s"
    store = prepared(str(root))
    before = snapshot(root)
    calls = [
        lambda: store.create_job(name, SketchSpec(dim=4, seed=0)),
        lambda: store.register_task("job", name),
        lambda: store.declare_anchor("job", name, 1),
        lambda: store.writer("job", "a0", "alpha", name),
        lambda: store.get_job(name),
    ]
    for call in calls:
        with pytest.raises(InvalidNameError):
            call()
    assert snapshot(root) == before
    assert not (tmp_path / "x").exists()


def test_open_refuses_a_bad_url(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        SketchStore.open("")
    with pytest.raises(StoreError):
        SketchStore.open(str(tmp_path / "s"), storage_options={"anon": True})
    with pytest.raises(StoreError):
        SketchStore.open("nosuchprotocol-xyz://bucket/prefix")


def test_validate_name_accepts_the_allowed_set() -> None:
    assert validate_name("Task_1.v2-final") == "Task_1.v2-final"
    assert validate_name("x" * 128) == "x" * 128
    with pytest.raises(InvalidNameError):
        validate_name(3)


def test_no_task_takes_the_targets_name(tmp_path: Path) -> None:
    """The target is a source of its own: a task named like it would share its labels."""
    store = SketchStore.open(str(tmp_path / "store"))
    store.create_job("job", SketchSpec(dim=4, seed=0))
    with pytest.raises(InvalidNameError, match="target"):
        store.register_task("job", "target")
    assert validate_name("target", "job") == "target"  # a job or anchor may be called so


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"dim": 32}, "dim"),
        ({"seed": 4}, "seed"),
        ({"manifest_hash": "abc"}, "manifest_hash"),
        ({"dtype": "float32"}, "dtype"),
        ({"projector": "dense"}, "projector"),
        ({"value_kind": "log_odds"}, "value_kind"),
    ],
)
def test_reopening_a_job_with_another_spec_names_the_field(
    tmp_path: Path, change: dict[str, object], field: str
) -> None:
    root = tmp_path / "s"
    prepared(str(root))
    before = snapshot(root)
    spec = {"dim": DIM, "seed": 3, "dtype": "float16", **change}
    with pytest.raises(SpecMismatchError) as err:
        SketchStore.open(str(root)).create_job("job", SketchSpec(**spec))  # type: ignore[arg-type]
    assert err.value.field == field
    assert err.value.stored == {"dim": DIM, "seed": 3, "manifest_hash": "", "dtype": "float16",
                                "projector": "structured",
                                "value_kind": "geometric_log_odds"}[field]
    assert err.value.requested == change[field]
    assert snapshot(root) == before


def test_settings_task_metadata_and_anchor_step_mismatches(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = prepared(str(root))
    before = snapshot(root)
    with pytest.raises(SpecMismatchError) as err:
        store.create_job("job", SketchSpec(dim=DIM, seed=3), {"policy": "uniform"})
    assert err.value.field == "settings.policy"
    with pytest.raises(SpecMismatchError) as err:
        store.register_task("job", "alpha", {"source": "other.jsonl"})
    assert err.value.field == "metadata.source"
    with pytest.raises(SpecMismatchError) as err:
        store.declare_anchor("job", "a0", 7)
    assert err.value.field == "step"
    assert snapshot(root) == before
    # The same declarations again are idempotent.
    spec = SketchSpec(dim=DIM, seed=3)
    assert store.create_job("job", spec, {"policy": "ensemble"}).spec.dim == DIM
    assert store.create_job("job", SketchSpec(dim=DIM, seed=3)).settings == {"policy": "ensemble"}
    assert store.register_task("job", "alpha").metadata == {"source": "a.jsonl"}
    assert store.declare_anchor("job", "a0", 0).state == "open"
    assert snapshot(root) == before


def test_invalid_specs_are_refused() -> None:
    for bad in (
        {"dim": 0, "seed": 0},
        {"dim": 4, "seed": -1},
        {"dim": 4, "seed": 0, "dtype": "int8"},
        {"dim": 4, "seed": 0, "projector": "sparse"},
        {"dim": 4, "seed": 0, "value_kind": "mean_probability"},
        {"dim": True, "seed": 0},
    ):
        with pytest.raises(SketchSpecError):
            SketchSpec(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "rows",
    [
        "nan_grad", "inf_value", "wrong_dim", "ids_shape", "empty", "dup_ids",
        "int_grads", "float_ids", "f16_overflow", "one_dim",
    ],
)
def test_bad_rows_are_refused_before_anything_is_written(tmp_path: Path, rows: str) -> None:
    root = tmp_path / "s"
    store = prepared(str(root))
    writer = store.writer("job", "a0", "alpha", "w")
    writer.append(grads_for(np.arange(3)), values_for(np.arange(3)), np.arange(3))
    ids = np.arange(10, 14)
    g, v = grads_for(ids), values_for(ids)
    if rows == "nan_grad":
        g[2, 5] = np.nan
    elif rows == "inf_value":
        v[1] = np.inf
    elif rows == "wrong_dim":
        g = grads_for(ids, DIM + 1)
    elif rows == "ids_shape":
        ids = ids[:3]
    elif rows == "empty":
        g, v, ids = g[:0], v[:0], ids[:0]
    elif rows == "dup_ids":
        ids = np.array([10, 11, 11, 12])
    elif rows == "int_grads":
        g = np.ones((4, DIM), dtype=np.int32)
    elif rows == "float_ids":
        ids = ids.astype(np.float64)
    elif rows == "f16_overflow":
        g[0, 0] = 1e6
    elif rows == "one_dim":
        g = g[0]
    before = snapshot(root)
    with pytest.raises(InvalidRowsError):
        writer.append(g, v, ids)
    assert snapshot(root) == before
    assert writer.committed == 3
    assert store.committed_rows("job", "a0", "alpha") == 3


def test_unknown_objects_raise_not_found(tmp_path: Path) -> None:
    store = prepared(str(tmp_path / "s"))
    with pytest.raises(RecordNotFoundError) as err:
        store.get_job("nope")
    assert str(err.value) == "job 'nope' not found"
    for call in (
        lambda: store.writer("job", "a9", "alpha", "w"),
        lambda: store.writer("job", "a0", "gamma", "w"),
        lambda: store.read_rows("job", "a0", "gamma"),
        lambda: store.complete_anchor("job", "a9"),
        lambda: store.register_task("nope", "t"),
        lambda: store.read_mixtures("nope"),
    ):
        with pytest.raises(RecordNotFoundError):
            call()
    assert isinstance(RecordNotFoundError("x"), KeyError)
    assert issubclass(InvalidRowsError, ValueError) and issubclass(RecordNotFoundError, StoreError)


# --- registry ordering and anchors ---------------------------------------------


def test_listing_orders_and_anchor_completion(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    store = prepared(url)
    store.create_job("another", SketchSpec(dim=4, seed=0))
    for name in ("zeta", "eta", "a-task"):
        store.register_task("job", name)
    store.declare_anchor("job", "z-anchor", 100)
    store.declare_anchor("job", "b-anchor", 200)
    done = store.complete_anchor("job", "z-anchor")
    assert done.state == "complete" and store.complete_anchor("job", "z-anchor") == done

    reopened = SketchStore.open(url)
    assert [j.name for j in reopened.list_jobs()] == ["another", "job"]
    tasks = [t.name for t in reopened.list_tasks("job")]
    assert tasks == ["alpha", "beta", "zeta", "eta", "a-task"]
    anchors = reopened.list_anchors("job")
    assert [(a.name, a.step, a.state) for a in anchors] == [
        ("a0", 0, "open"), ("z-anchor", 100, "complete"), ("b-anchor", 200, "open")
    ]
    assert reopened.get_job("job").settings == {"policy": "ensemble"}
    assert reopened.get_job("job").created_at <= time.time()


def test_an_anchors_horizon_is_kept_through_completion_and_reopen(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    store = prepared(url)  # a0 declared without a horizon, as anchors were before them
    horizon = Horizon(learning_rate=2e-4, steps=40, optimizer="AdamW", parameters=1000)
    assert horizon.optimizer == "adamw"
    assert store.declare_anchor("job", "h", 5, horizon).horizon == horizon
    # The first declaration's horizon stays.
    assert store.declare_anchor("job", "h", 5, Horizon(learning_rate=1.0, steps=1,
                                                       optimizer="sgd")).horizon == horizon
    assert store.complete_anchor("job", "h").horizon == horizon
    anchors = {a.name: a for a in SketchStore.open(url).list_anchors("job")}
    assert anchors["h"].horizon == horizon and anchors["h"].state == "complete"
    assert anchors["a0"].horizon is None
    for bad in ({"learning_rate": 0.0}, {"steps": 0}, {"optimizer": " "}, {"parameters": -1}):
        with pytest.raises(InvalidSpecError):
            Horizon(**{"learning_rate": 1e-3, "steps": 10, "optimizer": "sgd", **bad})


def test_rows_may_be_added_to_a_complete_anchor_for_a_later_task(tmp_path: Path) -> None:
    store = prepared(str(tmp_path / "s"))
    store.complete_anchor("job", "a0")
    store.register_task("job", "late")
    ids = np.arange(3)
    store.writer("job", "a0", "late", "w").append(grads_for(ids), values_for(ids), ids)
    assert store.sources("job", "a0") == ["late"]


# --- mixture history ------------------------------------------------------------


def record(version: int, **weights: float) -> MixtureRecord:
    return MixtureRecord(
        version=version, created_at=time.time(), anchor="a0", policy="ensemble",
        weights=weights, scores={k: -w for k, w in weights.items()},
        states={k: "active" for k in weights}, anchor_loss=0.7,
        estimated_loss=float("nan") if version == 11 else 0.6,
    )


def test_mixture_history_round_trips_in_order_across_reopen(url: str) -> None:
    store = prepared(url)
    records = [record(v, alpha=v / 20, beta=1 - v / 20) for v in (1, 2, 5, 11)]
    for rec in records:
        store.append_mixture("job", rec)
    with pytest.raises(StoreStateError):
        store.append_mixture("job", record(5, alpha=1.0))
    with pytest.raises(StoreStateError):
        store.append_mixture("job", record(3, alpha=1.0))
    reopened = SketchStore.open(url)
    got = reopened.read_mixtures("job")
    assert [r.version for r in got] == [1, 2, 5, 11]
    assert got[:3] == records[:3]  # NaN estimated_loss differs by identity only
    assert np.isnan(got[3].estimated_loss) and got[3].weights == records[3].weights
    assert [r.version for r in reopened.read_mixtures("job", after_version=2)] == [5, 11]
    reopened.append_mixture("job", record(12, alpha=1.0))
    assert [r.version for r in store.read_mixtures("job", after_version=5)] == [11, 12]


def test_calibration_round_trips_and_older_records_still_load(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    store = prepared(url)
    calibration = CalibrationRecord(regularization=0.5, prior=1.0, prior_source="sgd",
                                    factor=0.5, observations=2, predicted_change=-0.1,
                                    realized_change=-0.4, ratio=4.0, note="corrected")
    calibrated = MixtureRecord(
        version=1, created_at=1.0, anchor="a0", policy="ensemble", weights={"alpha": 1.0},
        scores={"alpha": -0.1}, states={"alpha": "active"}, anchor_loss=0.7,
        estimated_loss=0.6, score_error=0.02, calibration=calibration)
    store.append_mixture("job", calibrated)
    assert SketchStore.open(url).read_mixtures("job") == [calibrated]
    # A record written before score_error and calibration existed.
    old = record(2, alpha=1.0).to_dict()
    del old["score_error"]
    assert "calibration" not in old  # None is not written
    loaded = MixtureRecord.from_dict(old)
    assert (loaded.score_error, loaded.calibration) == (0.0, None)
    with pytest.raises(InvalidSpecError):
        CalibrationRecord(regularization=0.0, prior=1.0)


def _asdict_document(rec: MixtureRecord) -> dict[str, object]:
    """What MixtureRecord.to_dict wrote while it started from `dataclasses.asdict`
    (the reference the explicit conversion must match byte for byte)."""
    doc = dataclasses.asdict(rec)
    doc["weights"] = {k: float(v) for k, v in rec.weights.items()}
    doc["scores"] = {k: _encode_float(v) for k, v in rec.scores.items()}
    for name in ("anchor_loss", "estimated_loss", "score_error", "held_estimated_loss"):
        doc[name] = _encode_float(getattr(rec, name))
    doc["stale"] = list(rec.stale)
    if rec.calibration is None:
        del doc["calibration"]
    else:
        doc["calibration"] = rec.calibration.to_dict()
    return doc


@pytest.mark.parametrize("calibrated", [True, False])
def test_a_stored_mixture_document_is_byte_identical_to_the_asdict_one(
        tmp_path: Path, calibrated: bool) -> None:
    root = tmp_path / "s"
    store = prepared(str(root))
    calibration = CalibrationRecord(regularization=0.5, prior=1.0, prior_source="sgd",
                                    factor=0.5, observations=2, predicted_change=float("nan"),
                                    realized_change=-0.4, ratio=float("inf"), note="corrected")
    rec = MixtureRecord(
        version=1, created_at=1.5, anchor="a0", policy="ensemble",
        weights={"alpha": 0.75, "beta": np.float64(0.25), "gamma": 0.0},
        scores={"alpha": -0.1, "beta": float("nan"), "gamma": float("-inf")},
        states={"alpha": "active", "beta": "active", "gamma": "pending"},
        anchor_loss=0.7, estimated_loss=float("inf"), score_error=0.02,
        calibration=calibration if calibrated else None, pinned=True, held=True,
        held_reason="predicted loss rose", held_estimated_loss=float("nan"),
        pending_anchors={"gamma": 3}, stale=("gamma",))
    store.append_mixture("job", rec)

    stored = (root / "jobs/job/mixtures/000000000001/zarr.json").read_bytes()
    expected = {"zarr_format": 3, "node_type": "group", "attributes": _asdict_document(rec)}
    assert stored == json.dumps(expected, allow_nan=False, sort_keys=True).encode()
    # Every field is written (a field added later must be added to to_dict too).
    names = {f.name for f in dataclasses.fields(MixtureRecord)} - (
        set() if calibrated else {"calibration"})
    assert set(rec.to_dict()) == names
    [back] = SketchStore.open(str(root)).read_mixtures("job")
    assert back.to_dict() == rec.to_dict()  # non-finite floats are strings there


def test_reading_until_a_cursor_gives_back_exactly_its_lineages_rows(url: str) -> None:
    store = prepared(url)
    first = store.writer("job", "a0", "alpha", "w1")
    second = store.writer("job", "a0", "alpha", "w2")
    first.append(grads_for(np.arange(4)), values_for(np.arange(4)), np.arange(4))
    read, cursor = store.read_rows("job", "a0", "alpha")
    ids = np.arange(3, 9)  # id 3 again (a retried upload): returned once
    second.append(grads_for(ids), values_for(ids), ids)
    more, cursor = store.read_rows("job", "a0", "alpha", cursor)
    returned = np.concatenate([read.example_ids, more.example_ids])
    later = np.arange(20, 25)  # committed after the cursor: not part of its lineage
    first.append(grads_for(later), values_for(later), later)
    second.append(grads_for(later + 10), values_for(later + 10), later + 10)

    again, _ = store.read_rows("job", "a0", "alpha", until=cursor)

    assert sorted(again.example_ids.tolist()) == sorted(returned.tolist()) == list(range(9))
    np.testing.assert_array_equal(again.values, values_for(again.example_ids))
    everything, _ = store.read_rows("job", "a0", "alpha")
    assert len(everything) == 19
    with pytest.raises(StoreStateError):
        store.read_rows("job", "a0", "beta", until=cursor)


def test_a_job_stored_before_the_spec_had_its_enums_keeps_their_first_meaning(
    tmp_path: Path,
) -> None:
    """A spec document without projector, dtype or value_kind means dense, float16,
    log_odds (what the first clients sent), not today's defaults."""
    root = tmp_path / "s"
    store = SketchStore.open(str(root))
    store.create_job("old", SketchSpec(dim=DIM, seed=1))
    doc_path = root / "jobs" / "old" / "zarr.json"
    doc = json.loads(doc_path.read_text())
    doc["attributes"]["spec"] = {"dim": DIM, "seed": 1, "manifest_hash": ""}
    doc_path.write_text(json.dumps(doc))
    spec = SketchStore.open(str(root)).get_job("old").spec
    assert (spec.projector, spec.dtype, spec.value_kind) == ("dense", "float16", "log_odds")
    # Reopening it with a spec built today (structured) names the difference.
    with pytest.raises(SpecMismatchError) as err:
        SketchStore.open(str(root)).create_job("old", SketchSpec(dim=DIM, seed=1))
    assert (err.value.field, err.value.stored) == ("projector", "dense")
