"""The horizon the trainer declares its anchors with (trainer/anchors.py; no DeepSpeed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gradmix.client import Horizon
from gradmix.trainer.anchors import anchor_horizon, optimizer_name, planned_steps
from gradmix.trainer.config import SketchingConfig, TrainConfig, load_config

JOB = """
job = "arith"
output_dir = "out"
[model]
config = {{ model_type = "gpt2", n_embd = 32, n_layer = 2, n_head = 2 }}
[data]
target = "target.jsonl"
[deepspeed]
{deepspeed}
[training]
steps = 100
lr = 0.003
[sketching]
interval = 5
reanchor_every = 30
"""


def config(tmp_path: Path, deepspeed: str = "") -> TrainConfig:
    path = tmp_path / "job.toml"
    path.write_text(JOB.format(deepspeed=deepspeed))
    return load_config(path, env={})


def test_planned_steps_reach_the_next_sketch_point_due_for_a_new_anchor() -> None:
    every = SketchingConfig(interval=5, reanchor_every=30)
    assert planned_steps(every, 0, 100) == 30
    assert planned_steps(every, 30, 100) == 30
    assert planned_steps(every, 80, 100) == 20  # the run ends first
    odd = SketchingConfig(interval=7, reanchor_every=10, first_anchor=3)
    assert planned_steps(odd, 3, 1000) == 14  # sketch points 3, 10, 17: 17 is due
    # No re-anchoring by age: the anchor holds until the end of training.
    assert planned_steps(SketchingConfig(interval=5), 20, 100) == 80
    assert planned_steps(SketchingConfig(interval=0, reanchor_every=10), 0, 50) == 50
    assert planned_steps(SketchingConfig(), 100, 100) == 1


def test_optimizer_names_map_to_what_the_server_knows() -> None:
    assert optimizer_name("AdamW") == "adamw"
    assert optimizer_name("FusedAdam") == "adam"
    assert optimizer_name("OneBitAdam") == "adam"
    assert optimizer_name("SGD") == "sgd"
    assert optimizer_name("Lamb") == "lamb"


def test_the_horizon_takes_the_current_lr_else_the_configured_one(tmp_path: Path) -> None:
    job = config(tmp_path)
    assert anchor_horizon(job, 0, 1234) == Horizon(
        learning_rate=0.003, steps=30, optimizer="adamw", parameters=1234)
    assert anchor_horizon(job, 30, 1234, current_lr=0.001).learning_rate == 0.001
    # A warm-up at 0 (or an unknown lr) falls back to the configured one.
    assert anchor_horizon(job, 0, 1234, current_lr=0.0).learning_rate == 0.003
    assert anchor_horizon(job, 0, 1234, current_lr=float("nan")).learning_rate == 0.003


def test_a_deepspeed_optimizer_names_the_horizons_optimizer_and_lr(tmp_path: Path) -> None:
    job = config(tmp_path, 'optimizer = { type = "SGD", params = { lr = 0.05 } }')
    horizon = anchor_horizon(job, 0, 10)
    assert (horizon.optimizer, horizon.learning_rate) == ("sgd", 0.05)


@pytest.mark.parametrize("lr", ["0.0", "-1.0"])
def test_a_bad_configured_lr_gives_no_horizon_rather_than_a_bad_one(
        tmp_path: Path, lr: str) -> None:
    job = config(tmp_path, f'optimizer = {{ type = "AdamW", params = {{ lr = {lr} }} }}')
    from gradmix.client.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        anchor_horizon(job, 0, 10)
