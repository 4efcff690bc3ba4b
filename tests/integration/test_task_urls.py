"""Task data at fsspec URLs, read by the anchor code `gradmix-train` runs.

Tasks registered with the real server with metadata `path=` a `memory://`
URL (this process's in-memory filesystem) and an `s3://` URL (moto's S3
server on loopback, see `store_support`), and a target at a `file://` URL,
are found by `TaskFiles`, read by `TaskPool` and sketched at the anchor by
`AnchorProtocol` (through the public `Sketcher`, which is it); their rows
equal those of the same files read from local paths. A URL with nothing
behind it makes the task fail with the server, as a missing local file does.
A job TOML keeps URLs as they are (local paths are made absolute).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
from api_ranks import SKETCHING, tiny_gpt2, tokenizer, write_data
from client_support import Served, serve, wait_for
from gradmix.store import SketchStore
from gradmix.trainer import api
from gradmix.trainer.config import load_config
from gradmix.trainer.data import read_jsonl
from store_support import S3Endpoint, s3_endpoint


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve(tmp_path)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    yield from s3_endpoint()


def test_tasks_at_fsspec_urls_are_found_read_and_sketched(
    served: Served, tmp_path: Path, s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_data(tmp_path / "data")
    memory = fsspec.filesystem("memory")
    memory.pipe("/gradmix-urls/add.jsonl", paths["add"].read_bytes())
    where = s3.bucket()  # s3://<fresh bucket>/store
    bucket = where.url.removeprefix("s3://").split("/")[0]
    # The trainer takes endpoints and credentials from fsspec's configuration (or the
    # environment): FSSPEC_S3_* variables land in this same dict.
    monkeypatch.setitem(fsspec.config.conf, "s3", dict(where.options))
    fsspec.filesystem("s3").pipe(f"{bucket}/tasks/mul.jsonl", paths["mul"].read_bytes())
    urls = {
        "add": "memory://gradmix-urls/add.jsonl",
        "mul": f"s3://{bucket}/tasks/mul.jsonl",
        "gone": "memory://gradmix-urls/gone.jsonl",
    }

    sketcher = api.Sketcher(
        job="urls",
        server=served.address,
        store=str(served.store),
        model=tiny_gpt2(),
        tokenizer=tokenizer(),
        target=f"file://{paths['target']}",
        output_dir=tmp_path / "out",
        sketching=SKETCHING,
        steps=10,
        learning_rate=1e-3,
        max_length=16,
    )
    sketcher.setup_job()
    for task, url in urls.items():  # registered by someone else, after the job was set up
        served.client.register_task("urls", task, {"path": url})
    state = sketcher.sketch_point(0)
    sketcher.close()
    assert state.complete and sorted(state.sketched) == ["add", "mul", "target"]

    # The rows are those of the same files read from local paths.
    store = SketchStore.open(str(served.store))
    tok = tokenizer()
    for task, local in ((None, paths["target"]), ("add", paths["add"]), ("mul", paths["mul"])):
        rows, _ = store.read_rows("urls", state.name, task)
        assert len(rows) == SKETCHING.examples_per_task
        examples = read_jsonl(local, tok, 16)
        grads, values = api.sketch(
            sketcher.protocol.module,
            sketcher.projector,
            [examples[i] for i in rows.example_ids],
            batch_size=SKETCHING.batch_size,
            pad_id=tok.pad_id,
            value_kind=SKETCHING.value_kind,
        )
        np.testing.assert_allclose(rows.grads, grads.numpy(), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(rows.values, values.double().numpy(), rtol=1e-3, atol=1e-3)

    gone = wait_for(
        lambda: next((t for t in served.client.list_tasks("urls")
                      if t.name == "gone" and t.state == "failed"), None),
        "the task without data to fail",
    )
    assert "no data file found" in gone.failure


def test_a_job_toml_keeps_urls_and_resolves_local_paths(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text("""
job = "j"
output_dir = "out"
server = "127.0.0.1:1"
[model]
config = { model_type = "gpt2" }
[data]
target = "target.jsonl"
tasks = { add = "s3://bucket/tasks/add.jsonl", mul = "mul.jsonl" }
task_dir = "gs://bucket/tasks/"
""")
    data = load_config(path, env={}).data
    assert data.target == str(tmp_path / "target.jsonl")
    assert data.tasks == {"add": "s3://bucket/tasks/add.jsonl", "mul": str(tmp_path / "mul.jsonl")}
    assert data.task_dir == "gs://bucket/tasks/"
