"""Checkpoint and resume: the DeepSpeed checkpoint plus the run's own state.

Next to the model and optimizer, `client_state["gradmix"]` holds the run's
`gradmix.trainer.train_state.TrainState` (what makes a resumed run continue
the same draws and stay auditable) and the next step; `TrainState.save` and
`TrainState.resume` are the callers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradmix.trainer.errors import TrainerError

#: Key of the trainer's state in DeepSpeed's client_state.
STATE_KEY = "gradmix"


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Where checkpoints of a run go (DeepSpeed layout: <tag>/ and `latest`)."""
    return Path(output_dir) / "checkpoints"


def has_checkpoint(output_dir: str | Path) -> bool:
    """Whether the run has a checkpoint to resume from."""
    return (checkpoint_dir(output_dir) / "latest").is_file()


def save(engine: Any, output_dir: str | Path, step: int, state: dict[str, Any]) -> str:
    """Collective: save the engine and `state` (the next step is `step`). Returns the tag."""
    tag = f"step-{step:08d}"
    engine.save_checkpoint(
        str(checkpoint_dir(output_dir)), tag=tag, client_state={STATE_KEY: {"step": step, **state}}
    )
    return tag


def load(engine: Any, output_dir: str | Path, world_size: int) -> dict[str, Any]:
    """Collective: load the latest checkpoint into the engine; returns the trainer state.

    Raises:
        TrainerError: the checkpoint cannot be read, lacks the trainer state, or was
            written by another number of ranks (the per-rank draws would not continue).
    """
    path, client_state = engine.load_checkpoint(str(checkpoint_dir(output_dir)))
    if path is None or not client_state or STATE_KEY not in client_state:
        raise TrainerError(f"no usable checkpoint under {checkpoint_dir(output_dir)}")
    state = dict(client_state[STATE_KEY])
    saved_world = len(state.get("samplers", []))
    if saved_world != world_size:
        raise TrainerError(
            f"checkpoint was written by {saved_world} ranks; resume with the same number "
            f"(got {world_size})"
        )
    return state
