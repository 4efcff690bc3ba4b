"""The trainer's state: everything a checkpoint holds beside the DeepSpeed engine.

One `TrainState` per rank, made before the collaborators that change it and
handed to them: `MixtureSync` records each mixture it applies (`history`,
`applied_version`) and schedules it on the `sampler`; `AnchorProtocol` keeps
the current anchor (`anchor`); the loop advances `step`. `save` checkpoints
it whole and `resume` loads it whole, so nothing else reaches into another
object's fields to save or restore a run.

In the checkpoint (`client_state["gradmix"]`): the next step, every rank's
sampler state (gathered to rank 0, which writes the client state), the
mixture history, the mixture version in force and the anchor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradmix.client import MixtureSampler
from gradmix.trainer import checkpoint
from gradmix.trainer.distributed import Dist

if TYPE_CHECKING:
    from gradmix.trainer.mixture_sync import Schedule


@dataclass
class AnchorState:
    """The current anchor as every rank knows it (saved with checkpoints)."""

    name: str = ""
    step: int = -1
    complete: bool = False
    sketched: list[str] = field(default_factory=list)
    """Sources with rows from every rank at this anchor (the target as
    `gradmix.vocabulary.TARGET`)."""
    unusable: list[str] = field(default_factory=list)
    """Tasks whose data could not be read at this anchor (not retried until the next)."""
    run: str = ""
    """This training run (kept across resumes): every anchor it declares carries it, so a
    second run of the job on the same store never reuses this run's anchors."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)



@dataclass
class TrainState:
    """A run's state on this rank.

    Attributes:
        sampler: this rank's task sampler (the Hugging Face callback's: its stream's
            `Schedule`, which the Trainer's checkpoint saves; None in a loop gradmix
            does not drive: `gradmix.trainer.api.Sketcher` keeps only the anchor).
        step: the next step to train.
        history: every mixture applied: version, step it took effect, anchor, weights.
        applied_version: the mixture version in force (0: none from the server yet).
        anchor: the current anchor.
    """

    sampler: MixtureSampler | Schedule | None = None
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    applied_version: int = 0
    anchor: AnchorState = field(default_factory=AnchorState)

    def save(self, engine: Any, output_dir: str | Path, dist: Dist) -> str:
        """Collective: checkpoint the engine with this state (at `step`). Returns the tag."""
        assert isinstance(self.sampler, MixtureSampler), "only gradmix-train checkpoints here"
        saved = {
            "samplers": dist.all_gather(self.sampler.state_dict()),
            "history": self.history,
            "applied_version": self.applied_version,
            "anchor": self.anchor.to_dict(),
        }
        return checkpoint.save(engine, output_dir, self.step, saved)

    def resume(self, engine: Any, output_dir: str | Path, dist: Dist) -> bool:
        """Collective: load the latest checkpoint into the engine and this state.

        Returns:
            False if the run has no checkpoint (nothing is loaded).

        Raises:
            TrainerError: the checkpoint is unusable (see `checkpoint.load`).
        """
        assert isinstance(self.sampler, MixtureSampler), "only gradmix-train resumes here"
        if not checkpoint.has_checkpoint(output_dir):
            return False
        saved = checkpoint.load(engine, output_dir, dist.world_size)
        self.sampler.load_state_dict(saved["samplers"][dist.rank])
        self.step = int(saved["step"])
        self.history = list(saved["history"])
        self.applied_version = int(saved["applied_version"])
        self.anchor = AnchorState(**saved["anchor"])
        return True
