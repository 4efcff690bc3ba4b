"""The public sketching API (`gradmix.trainer.api`) with the real server and store.

- `projector_for` + `sketch` give the rows `gradmix-train`'s own functions give;
  `check_spec` refuses a job spec with other coordinates.
- `Sketcher` on one plain process: one sketch point creates the job, declares
  the anchor, writes rows of the target and every task and completes it; the
  server then publishes a mixture of the anchor.
- `Sketcher` under torchrun with 2 CPU ranks: each rank writes its half of
  every source's draw, and the anchor completes once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from api_ranks import SKETCHING, tiny_gpt2, tokenizer, write_data
from client_support import Served, serve, wait_for
from gradmix.client import SketchSpec
from gradmix.store import SketchStore
from gradmix.trainer import api
from gradmix.trainer.errors import TrainerError
from gradmix.trainer.projectors import build_projector
from gradmix.trainer.sketch import sketch_examples

HERE = Path(__file__).resolve().parents[1] / "support"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve(tmp_path)


def test_projector_and_sketch_match_the_trainers_functions() -> None:
    model, tok = tiny_gpt2(), tokenizer()
    examples = [api.tokenize(f"{i}+{i}=", str(2 * i), tok, 16) for i in range(5)]
    projector = api.projector_for(model, SKETCHING)
    grads, values = api.sketch(
        model, projector, examples, batch_size=2, pad_id=tok.pad_id, value_kind="log_odds"
    )
    reference = build_projector(model, kind="structured", dim=32, seed=0)
    assert projector.manifest.hash() == reference.manifest.hash()
    ref_grads, ref_values = sketch_examples(
        model, reference, examples, batch_size=2, pad_id=tok.pad_id, value_kind="log_odds"
    )
    assert grads.shape == (5, 32)
    torch.testing.assert_close(grads, ref_grads)
    torch.testing.assert_close(values, ref_values)
    assert float(grads.norm()) > 0


def test_check_spec_names_what_differs() -> None:
    projector = api.projector_for(tiny_gpt2(), SKETCHING)
    same = SketchSpec(
        dim=32, seed=0, projector="structured", manifest_hash=projector.manifest.hash()
    )
    api.check_spec(projector, same)
    with pytest.raises(TrainerError, match="dim: job 64, model 32"):
        api.check_spec(projector, SketchSpec(dim=64, manifest_hash=projector.manifest.hash()))
    with pytest.raises(TrainerError, match="manifest_hash"):
        api.check_spec(projector, SketchSpec(dim=32, manifest_hash="0" * 16))


def test_sketcher_runs_an_anchor_on_one_process(served: Served, tmp_path: Path) -> None:
    paths = write_data(tmp_path / "data")
    sketcher = api.Sketcher(
        job="solo",
        server=served.address,
        store=str(served.store),
        model=tiny_gpt2(),
        tokenizer=tokenizer(),
        target=paths["target"],
        tasks={"add": paths["add"], "mul": paths["mul"]},
        output_dir=tmp_path / "out",
        sketching=SKETCHING,
        steps=10,
        learning_rate=1e-3,
        max_length=16,
    )
    assert sketcher.dist.world_size == 1 and sketcher.due(0)
    sketcher.setup_job()
    state = sketcher.sketch_point(0)
    sketcher.close()
    assert state.complete and state.name == f"{state.run}-anchor-00000000"
    assert sorted(state.sketched) == ["add", "mul", "target"]
    assert not sketcher.due(1)  # interval 0: only until the first anchor is complete

    store = SketchStore.open(str(served.store))
    spec = store.get_job("solo").spec
    assert spec.manifest_hash == sketcher.projector.manifest.hash()
    for task in (None, "add", "mul"):
        rows, _ = store.read_rows("solo", state.name, task)
        assert len(rows) == SKETCHING.examples_per_task
        assert np.isfinite(rows.grads).all() and np.abs(rows.grads).sum() > 0
    job = wait_for(
        lambda: next(
            (j for j in [served.client.get_job("solo")] if j.current_anchor == state.name), None
        ),
        "the anchor to be current",
    )
    mixture = wait_for(
        lambda: next(
            (m for m in [served.client.get_mixture("solo")] if m.anchor == job.current_anchor), None
        ),
        "a mixture of the anchor",
    )
    assert set(mixture.weights) == {"add", "mul"}


@pytest.mark.slow
def test_sketcher_splits_an_anchor_over_two_ranks(served: Served, tmp_path: Path) -> None:
    write_data(tmp_path / "data")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(HERE / "api_ranks.py"),
        served.address,
        str(served.store),
        str(tmp_path / "data"),
        str(out),
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    states = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [(s["rank"], s["world"]) for s in states] == [(0, 2), (1, 2)]
    assert states[0] == {**states[1], "rank": 0}
    assert states[0]["complete"] and sorted(states[0]["sketched"]) == ["add", "mul", "target"]
    store = SketchStore.open(str(served.store))
    for task in (None, "add", "mul"):
        per_writer = [
            store.committed_rows("ranks", states[0]["name"], task, f"rank-{r}") for r in range(2)
        ]
        assert per_writer == [3, 3]  # 6 examples, ids[rank::2]
        assert store.committed_rows("ranks", states[0]["name"], task) == 6
