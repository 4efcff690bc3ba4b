"""gradmix in the Hugging Face Trainer, with the real server and store.

- `MixtureStream`: draws follow the schedule exactly; a stream rebuilt from
  `state_dict` continues the same draws; ranks and workers read disjoint draws.
- A real `transformers.Trainer` (tiny GPT-2 from a config, CPU) with
  `GradmixCallback`, alone and under torchrun with 2 ranks: the first
  anchor is sketched and completed at step 0, the server's mixture of it
  takes effect `lag` steps later on every rank at the same step, and a run
  resumed from the mid-run Trainer checkpoint trains on the same batches as
  the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch
from api_ranks import tokenizer, write_data
from client_support import Served, serve
from gradmix.client.errors import SamplerError, UnknownTaskError
from gradmix.trainer.errors import DataError
from gradmix.trainer.mixture_stream import MixtureStream, completion_example, pad_collator
from hf_ranks import train_and_resume

HERE = Path(__file__).resolve().parents[1] / "support"
TASKS: dict[str, list[Any]] = {"a": [("a", i) for i in range(5)], "b": [("b", i) for i in range(7)]}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve(tmp_path)


def test_stream_follows_the_schedule_at_the_exact_draw() -> None:
    stream = MixtureStream(TASKS, seed=3, mixture={"a": 1.0})
    stream.update({"b": 1.0}, at_draw=40)
    draws = list(islice(iter(stream), 60))
    assert {t for t, _ in draws[:40]} == {"a"} and {t for t, _ in draws[40:]} == {"b"}
    stream.update({"a": 1.0, "b": 1.0}, at_draw=100)
    mixed = Counter(t for t, _ in islice(iter(stream), 200))
    assert 60 < mixed["a"] < 140  # 40 draws of b, then ~half of 160
    with pytest.raises(SamplerError, match="already at"):
        stream.update({"a": 1.0}, at_draw=10)
    with pytest.raises(UnknownTaskError):
        stream.update({"c": 1.0}, at_draw=500)


def test_stream_resumes_the_same_draws_from_its_state() -> None:
    stream = MixtureStream(TASKS, seed=1, mixture={"a": 1.0, "b": 3.0})
    stream.update({"a": 2.0, "b": 1.0}, at_draw=25)
    it = iter(stream)
    head = list(islice(it, 30))
    saved = json.loads(json.dumps(stream.state_dict()))
    tail = list(islice(it, 30))
    again = MixtureStream(TASKS, seed=1)
    again.load_state_dict(saved)
    assert list(islice(iter(again), 30)) == tail
    fresh = MixtureStream(TASKS, seed=1, mixture={"a": 1.0, "b": 3.0})
    fresh.update({"a": 2.0, "b": 1.0}, at_draw=25)
    assert list(islice(iter(fresh), 60)) == head + tail


def test_ranks_and_workers_read_disjoint_draws() -> None:
    whole = list(islice(iter(MixtureStream(TASKS, seed=2, mixture={"a": 1, "b": 1})), 40))
    parts = [
        list(
            islice(
                iter(MixtureStream(TASKS, seed=2, mixture={"a": 1, "b": 1}, rank=r, world_size=2)),
                20,
            )
        )
        for r in range(2)
    ]
    assert parts[0] == whole[0::2] and parts[1] == whole[1::2]
    loader = torch.utils.data.DataLoader(
        MixtureStream(TASKS, seed=2, mixture={"a": 1, "b": 1}),
        batch_size=None,
        num_workers=2,
        collate_fn=lambda x: x,
    )
    by_worker = list(islice(iter(loader), 40))  # batches alternate between the workers
    assert sorted(by_worker[0::2] + by_worker[1::2]) == sorted(whole)


def test_completion_rows_score_the_completion_and_pad() -> None:
    tok = tokenizer()
    row = completion_example("1+2=", "3", tok, 16)
    assert row["labels"] == [-100] * 4 + [tok.encode("3")[0], tok.eos_id]
    batch = pad_collator(tok.pad_id)([row, completion_example("10+20=", "30", tok, 16)])
    assert batch["input_ids"].shape == (2, 9)
    assert batch["attention_mask"][0].tolist() == [1] * 6 + [0] * 3
    assert batch["labels"][0, 6:].tolist() == [-100] * 3
    fixed = pad_collator(tok.pad_id, width=12)([row])
    assert fixed["input_ids"].shape == (1, 12)
    with pytest.raises(DataError, match="width 4"):
        pad_collator(tok.pad_id, width=4)([row])


def _check_run(result: dict[str, Any], steps: int = 6, lag: int = 2) -> None:
    full, resumed = result["full"], result["resumed"]
    assert full["anchor"]["complete"] and full["anchor"]["step"] == 0
    versions = [h for h in full["history"] if h["version"] > 0]
    assert versions and versions[-1]["step"] == lag  # the anchor's mixture, lag steps on
    assert resumed["history"] == full["history"]
    half = steps // 2
    assert len(full["trained"]) == steps
    assert resumed["trained"][-half:] == full["trained"][half:]
    assert resumed["losses"][-half:] == full["losses"][half:]


def test_trainer_follows_the_job_and_resumes_the_same_draws(served: Served, tmp_path: Path) -> None:
    write_data(tmp_path / "data")
    result = train_and_resume(
        served.address, str(served.store), tmp_path / "data", tmp_path / "out"
    )
    _check_run(result)
    job = served.client.get_job("hf")
    assert job.current_anchor == result["full"]["anchor"]["name"]


@pytest.mark.slow
def test_trainer_under_torchrun_with_two_ranks(served: Served, tmp_path: Path) -> None:
    write_data(tmp_path / "data")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(HERE / "hf_ranks.py"),
        served.address,
        str(served.store),
        str(tmp_path / "data"),
        str(out),
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        _check_run(result)
    assert ranks[0]["full"]["history"] == ranks[1]["full"]["history"]  # one switch step
    assert ranks[0]["full"]["trained"] != ranks[1]["full"]["trained"]  # distinct batches
