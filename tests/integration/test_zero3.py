"""Sketching under DeepSpeed ZeRO stage 3 on 2 CPU ranks (gloo): real engines, server, store.

- Public API (`tests/support/zero3_ranks.py`): a stage 3 engine with every
  parameter partitioned gives the same sketches and values as a stage 1
  engine of the same model, for uneven rank shares (one rank runs a filler
  batch), before and after both take the same optimizer step (so sketching
  left no gradient behind either); the dense projector is refused by name.
- `gradmix-train` with stage 3: a short run completes its anchor with rows
  from both ranks, and those rows equal the sketches of the same examples
  computed in this process on the whole, unsharded model.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from client_support import Served, serve
from gradmix.store import SketchStore
from gradmix.trainer.config import load_config
from gradmix.trainer.projectors import build_projector
from gradmix.trainer.runlog import log_path, read_log
from gradmix.trainer.setup import build_model, build_pool, build_tokenizer
from gradmix.trainer.sketch import sketch_examples

pytestmark = pytest.mark.slow
SUPPORT = Path(__file__).resolve().parents[1] / "support"


def _env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve(tmp_path)


def test_stage_3_sketches_equal_stage_1_through_the_api(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SUPPORT / "zero3_ranks.py"),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank, rows in ((0, 3), (1, 2)):
        seen = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert seen["sharded"] == [False, True]
        assert seen["placeholders"] == seen["parameters"] > 0  # every weight partitioned
        assert seen["same_manifest"]
        assert seen["losses"][0] == pytest.approx(seen["losses"][1], rel=1e-5)
        for when in ("before", "after"):
            got = seen[when]
            assert got["rows"] == rows
            assert got["grad_scale"] > 0
            assert got["grad_diff"] <= 1e-5 * got["grad_scale"], (when, got)
            assert got["value_diff"] <= 1e-5, (when, got)
        assert "use projector = \"structured\"" in seen["dense_refused"]


TASKS = {
    "target": lambda a, b: (f"{a}+{b}=", str(a + b)),
    "add": lambda a, b: (f"{b}+{a}=", str(a + b)),
    "mul": lambda a, b: (f"{a}*{b}=", str(a * b)),
}


def _job(root: Path, address: str, store: Path) -> Path:
    rng = random.Random(0)
    for name, make in TASKS.items():
        pairs = [make(rng.randint(0, 99), rng.randint(0, 99)) for _ in range(24)]
        lines = [json.dumps({"prompt": p, "completion": c}) for p, c in pairs]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    path = root / "job.toml"
    path.write_text(f"""
job = "zero3"
output_dir = "out"
server = "{address}"
store = "{store}"
[model.config]
model_type = "gpt2"
n_embd = 32
n_layer = 2
n_head = 2
n_positions = 32
resid_pdrop = 0.0
embd_pdrop = 0.0
attn_pdrop = 0.0
[tokenizer]
alphabet = "0123456789+*= "
[data]
target = "target.jsonl"
tasks = {{ add = "add.jsonl", mul = "mul.jsonl" }}
max_length = 16
[deepspeed]
zero_optimization = {{ stage = 3, stage3_param_persistence_threshold = 0 }}
[training]
steps = 4
lr = 0.003
batch_size = 2
eval_every = 2
eval_examples = 4
[sketching]
dim = 32
interval = 0
examples_per_task = 5
batch_size = 2
dtype = "float32"
""")
    return path


def test_gradmix_train_with_stage_3_completes_an_anchor(served: Served, tmp_path: Path) -> None:
    root = tmp_path / "job"
    root.mkdir()
    path = _job(root, served.address, served.store)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "gradmix.trainer.main", "--config", str(path),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    out = root / "out"
    assert [e["step"] for e in read_log(log_path(out, 0)) if e["event"] == "eval"] == [0, 2, 4]
    assert not [e for e in read_log(log_path(out, 1)) if e["event"] == "eval"]
    steps = [e["step"] for e in read_log(log_path(out, 1)) if e["event"] == "step"]
    assert steps == [0, 1, 2, 3]
    assert (out / "checkpoints" / "latest").is_file()

    store = SketchStore.open(str(served.store))
    (anchor,) = store.list_anchors("zero3")
    assert anchor.state == "complete" and anchor.step == 0

    # The same rows from the whole model, here: same seed, same draws, same projector.
    config = load_config(path, env={})
    torch.manual_seed(config.training.seed)
    tokenizer = build_tokenizer(config.tokenizer)
    model = build_model(config.model, tokenizer)
    pool = build_pool(config, tokenizer)
    cfg = config.sketching
    projector = build_projector(model, kind=cfg.projector, dim=cfg.dim, seed=cfg.seed)
    assert store.get_job("zero3").spec.manifest_hash == projector.manifest.hash()
    for task in (None, "add", "mul"):
        for rank, count in ((0, 3), (1, 2)):  # 5 examples, ids[rank::2]
            assert store.committed_rows("zero3", anchor.name, task, f"rank-{rank}") == count
        rows, _ = store.read_rows("zero3", anchor.name, task)
        order = np.argsort(rows.example_ids)
        ids = pool.sketch_draw(task, "anchor-00000000", cfg.examples_per_task)
        examples = pool.examples(task)
        grads, values = sketch_examples(
            model, projector, [examples[i] for i in sorted(ids)], batch_size=cfg.batch_size,
            pad_id=tokenizer.pad_id, value_kind=cfg.value_kind,
        )  # fmt: skip
        np.testing.assert_array_equal(rows.example_ids[order], sorted(ids))
        assert np.abs(rows.grads).max() > 0
        np.testing.assert_allclose(rows.grads[order], grads.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rows.values[order], values.double().numpy(), rtol=1e-5)
