"""The server's store keeps task documents (`cache_task_documents`): what it shows, when.

Real Zarr stores in a tmp directory. A second `SketchStore` on the same folder
stands for another process writing the store (it shares nothing in memory).
"""

from __future__ import annotations

import threading
from pathlib import Path

from gradmix.store import SketchSpec, SketchStore

#: Tasks registered elsewhere and then updated through the caching store, one a round.
ROUNDS = 100


def _stores(tmp_path: Path) -> tuple[SketchStore, SketchStore]:
    url = str(tmp_path / "s")
    server = SketchStore.open(url, cache_task_documents=True)
    server.create_job("job", SketchSpec(dim=8, seed=1))
    server.register_task("job", "alpha", {"uri": "a"})
    return server, SketchStore.open(url)


def _state(store: SketchStore) -> dict[str, tuple[dict[str, str], str, bool]]:
    return {t.name: (dict(t.metadata), t.failure, bool(t.retired_at))
            for t in store.list_tasks("job")}


def test_writes_through_the_caching_store_show_at_once(tmp_path: Path) -> None:
    server, _ = _stores(tmp_path)
    assert _state(server) == {"alpha": ({"uri": "a"}, "", False)}
    server.register_task("job", "beta")
    server.set_task_failure("job", "alpha", "no such file")
    assert _state(server) == {"alpha": ({"uri": "a"}, "no such file", False),
                              "beta": ({}, "", False)}
    server.update_task("job", "alpha", metadata={"uri": "b"}, retired=True)
    server.set_task_failure("job", "alpha", "")
    assert _state(server)["alpha"] == ({"uri": "b"}, "", True)
    server.delete_job("job")
    server.create_job("job", SketchSpec(dim=8, seed=1))
    assert server.list_tasks("job") == []
    server.register_task("job", "alpha")
    assert _state(server) == {"alpha": ({}, "", False)}
    # What it keeps is what the store holds: a fresh reader agrees.
    assert _state(SketchStore.open(str(tmp_path / "s"))) == _state(server)


def test_another_process_s_new_task_shows_its_change_to_a_read_task_does_not(
        tmp_path: Path) -> None:
    server, other = _stores(tmp_path)
    assert _state(server) == {"alpha": ({"uri": "a"}, "", False)}
    other.register_task("job", "beta", {"uri": "b"})  # the tasks folder is listed each call
    other.set_task_failure("job", "alpha", "changed elsewhere")
    assert _state(server) == {"alpha": ({"uri": "a"}, "", False),  # kept: not read again
                              "beta": ({"uri": "b"}, "", False)}
    # Without the cache (every other user of the store) each call reads every document.
    assert _state(other)["alpha"] == ({"uri": "a"}, "changed elsewhere", False)
    assert _state(SketchStore.open(str(tmp_path / "s")))["alpha"][1] == "changed elsewhere"


def test_a_write_shows_in_the_next_listing_while_other_threads_list(tmp_path: Path) -> None:
    # Listings running alongside may read a task's document (one not kept yet: another
    # process registered it) just before a write replaces it; what they read must
    # never be kept over what the write put there.
    server, other = _stores(tmp_path)
    done = threading.Event()

    def list_on() -> None:
        while not done.is_set():
            server.list_tasks("job")

    listers = [threading.Thread(target=list_on) for _ in range(2)]
    for thread in listers:
        thread.start()
    try:
        for i in range(ROUNDS):
            other.register_task("job", f"t{i}", {"v": "old"})
            server.update_task("job", f"t{i}", metadata={"v": "new"})
            shown = {t.name: t.metadata["v"] for t in server.list_tasks("job") if t.name != "alpha"}
            assert shown[f"t{i}"] == "new", f"round {i}"
    finally:
        done.set()
        for thread in listers:
            thread.join(timeout=30)


def test_concurrent_changes_to_one_task_all_land(tmp_path: Path) -> None:
    """A trainer's failure reports and an operator's metadata updates at once (the
    server's RPC threads): each reads the task document and writes it whole, so
    without one lock around that a change lands and is then written over."""
    server, _ = _stores(tmp_path)
    errors: list[BaseException] = []

    def update() -> None:
        try:
            for i in range(ROUNDS):
                server.update_task("job", "alpha", metadata={f"k{i}": str(i)})
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    def fail() -> None:
        try:
            for i in range(ROUNDS):
                server.set_task_failure("job", "alpha", f"reason {i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=update), threading.Thread(target=fail)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for store in (server, SketchStore.open(str(tmp_path / "s"))):  # kept, and as written
        alpha = next(t for t in store.list_tasks("job") if t.name == "alpha")
        assert alpha.metadata == {"uri": "a", **{f"k{i}": str(i) for i in range(ROUNDS)}}
        assert alpha.failure == f"reason {ROUNDS - 1}"
