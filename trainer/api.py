"""The public sketching API: gradmix anchors from any training loop.

`gradmix-train` is one user of it; a team's own loop (plain torch, the
Hugging Face Trainer through `gradmix.trainer.hf`, ...) is another. Three
levels, each built from the one below:

- `projector_for(model, sketching)` builds the projector of a model's
  sketched parameters (dense or structured) from the job's sketch settings,
  and `check_spec(projector, spec)` checks it against a job's recorded
  `SketchSpec` (sketches made with other coordinates must never mix).
- `sketch(model, projector, examples)` sketches examples (token ids with a
  completion mask, `tokenize` makes them) into rows: projected gradients
  (n, d) and values (n,).
- `Sketcher` runs whole anchors across the ranks of a torch.distributed
  group (or one plain process): rank 0 creates the job and declares the
  anchor, every rank sketches its share of each source's seeded draw and
  writes its rows to the store, rank 0 completes the anchor. It is
  `gradmix.trainer.anchors.AnchorProtocol`, the code `gradmix-train` runs,
  behind a constructor that takes a model and a tokenizer instead of a job
  TOML file.

Every call of `Sketcher.setup_job` and `Sketcher.sketch_point` is a
collective: every rank calls it at the same step.

A model sharded by DeepSpeed ZeRO-3 (`engine.module`) is sketched as is with
the structured projector: the sketch needs layer inputs and output gradients,
not whole weights (`gradmix.trainer.sharded`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from gradmix.client import PolicySettings, SelectionClient, SketchSpec
from gradmix.store import SketchStore
from gradmix.trainer.anchors import AnchorProtocol
from gradmix.trainer.config import (
    DataConfig,
    ModelConfig,
    SketchingConfig,
    TrainConfig,
    TrainingConfig,
)
from gradmix.trainer.data import TaskPool, TokenizedExample, Tokenizer, tokenize
from gradmix.trainer.distributed import Dist
from gradmix.trainer.errors import TrainerError
from gradmix.trainer.job_setup import JobSetup
from gradmix.trainer.projectors import Projector, build_projector
from gradmix.trainer.runlog import RunLog
from gradmix.trainer.sharded import sharded, sketching_problem
from gradmix.trainer.sketch import sketch_examples
from gradmix.trainer.task_files import TaskFiles
from gradmix.trainer.train_state import AnchorState, TrainState
from torch import nn

__all__ = [
    "AnchorState",
    "Sketcher",
    "TokenizedExample",
    "as_tokenizer",
    "check_spec",
    "process_group",
    "projector_for",
    "sketch",
    "tokenize",
]


@dataclass(frozen=True)
class _OneProcess(Dist):
    """A group of one plain process: every collective is the identity."""

    def barrier(self) -> None:
        return None

    def broadcast(self, value: Any) -> Any:
        return value

    def all_gather(self, value: Any) -> list[Any]:
        return [value]

    def all_mean(self, value: float) -> float:
        return float(value)


def process_group(device: torch.device | str | None = None) -> Dist:
    """This process's place in the torch.distributed group already initialized (by
    torchrun, the Trainer, accelerate, ...), or a group of one without collectives.

    Args:
        device: where the model lives (default: CPU).
    """
    where = torch.device(device or "cpu")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        local = where.index if where.index is not None else 0
        return Dist(rank, world, local, where)
    return _OneProcess(0, 1, 0, where)


def projector_for(model: nn.Module, sketching: SketchingConfig | None = None) -> Projector:
    """The projector of `model`'s sketched parameters, as `gradmix-train` builds it.

    Args:
        model: the model being trained (the module itself, not a DDP wrapper).
        sketching: dim, seed, projector kind, factor size and parameter patterns
            (default: `SketchingConfig()`).

    Raises:
        SketchError: no parameter matches, or a bad dim, seed or factor size.
    """
    cfg = sketching or SketchingConfig()
    return build_projector(
        model,
        kind=cfg.projector,
        dim=cfg.dim,
        seed=cfg.seed,
        patterns=cfg.parameters,
        factor_dim=cfg.factor_dim or None,
    )


def check_spec(projector: Projector, spec: SketchSpec) -> None:
    """Check that `projector` makes the coordinates of a job's recorded sketch spec.

    Raises:
        TrainerError: the dim, seed, projector kind or manifest hash differ (naming which).
    """
    ours = {
        "dim": projector.dim,
        "seed": projector.seed,
        "projector": projector.manifest.projector,
        "manifest_hash": projector.manifest.hash(),
    }
    theirs = {k: getattr(spec, k) for k in ours}
    wrong = [f"{k}: job {theirs[k]!r}, model {ours[k]!r}" for k in ours if theirs[k] != ours[k]]
    if wrong:
        raise TrainerError("the model's sketch differs from the job's spec: " + "; ".join(wrong))


def sketch(
    model: nn.Module,
    projector: Projector,
    examples: Sequence[TokenizedExample],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    value_kind: str | None = None,
    min_batches: int = 0,
    filler: TokenizedExample | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sketch examples into rows: (projected gradients (n, d) float32, values (n,)) on
    the CPU. The model is run in eval mode; its `.grad`s are never touched.

    On a model sharded by DeepSpeed ZeRO-3 (pass `engine.module`; structured
    projector only) every forward gathers parameters from all ranks, so every rank
    must call this together and run the same number of batches: give the ranks'
    largest batch count as `min_batches` (`gradmix.trainer.sharded.lockstep_batches`).

    Args:
        model: the model (its parameters must be those of `projector`'s manifest).
        projector: from `projector_for`.
        examples: token ids and completion masks (`tokenize`).
        batch_size: examples per forward/backward.
        pad_id: the padding token id.
        value_kind: the job's value kind (default: the sketch settings' default).
        min_batches: run at least this many batches; the extra ones sketch `filler`
            (default: the first example) and are dropped.
        filler: the example extra batches run on (needed when `examples` is empty).
    """
    kind = value_kind or SketchingConfig().value_kind
    return sketch_examples(
        model,
        projector,
        examples,
        batch_size=batch_size,
        pad_id=pad_id,
        value_kind=kind,
        min_batches=min_batches,
        filler=filler,
    )


class _TransformersTokenizer:
    """A transformers tokenizer seen as the trainer's `Tokenizer` (pad falls back to eos)."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        eos = tok.eos_token_id
        self.eos_id = int(eos if eos is not None else 0)
        pad = tok.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_id)
        self.vocab_size = len(tok)
        self.transformers = tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))


def as_tokenizer(tokenizer: Any) -> Tokenizer:
    """A gradmix `Tokenizer` (returned as is) or a transformers tokenizer, adapted."""
    if all(hasattr(tokenizer, a) for a in ("pad_id", "eos_id", "vocab_size", "encode")):
        return tokenizer  # type: ignore[no-any-return]
    if hasattr(tokenizer, "eos_token_id") and hasattr(tokenizer, "encode"):
        return _TransformersTokenizer(tokenizer)
    raise TrainerError(f"not a tokenizer: {type(tokenizer).__name__}")


def _model_section(model: nn.Module) -> ModelConfig:
    """The job config's [model] describing `model` (its transformers config if it has one)."""
    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    described: dict[str, Any] = to_dict() if callable(to_dict) else {}
    described.setdefault("model_type", type(model).__name__)
    return ModelConfig(config=described)


#: Registration metadata `path` of a task whose examples were handed over in memory.
IN_PROCESS = "in-process:"

Source = str | Path | Sequence[TokenizedExample]
"""A sketched source: a JSONL file of {"prompt", "completion"}, or its examples."""


class _Pool(TaskPool):
    """Task data with some sources handed over in memory instead of read from files."""

    def __init__(self, given: Mapping[str | None, Sequence[TokenizedExample]], **kw: Any) -> None:
        super().__init__(**kw)
        self._given = dict(given)

    def examples(self, task: str | None) -> list[TokenizedExample]:
        if task in self._given:
            return self._given[task]  # type: ignore[return-value]  # indexed, never mutated
        return super().examples(task)


class _Files(TaskFiles):
    """Rank 0's task data directory, knowing the in-memory tasks too."""

    def __init__(self, config: TrainConfig, client: SelectionClient, given: set[str]) -> None:
        super().__init__(config, client)
        self._given = given

    def path(self, task: str) -> str | None:
        return IN_PROCESS + task if task in self._given else super().path(task)


def _in_memory(source: Source) -> bool:
    return not isinstance(source, str | Path)


class Sketcher:
    """Runs gradmix anchors over a model from any training loop (every rank makes one).

    Args:
        job: the job's name on the server and in the store.
        server: host:port of the selection server.
        store: the sketch store (a path or fsspec URL; the server's store).
        model: the model being trained (unwrapped: not the DDP/DeepSpeed wrapper; under
            ZeRO-3 `engine.module`, with the structured projector and no drift_bound).
        tokenizer: a gradmix `Tokenizer` or a transformers tokenizer.
        target: the target's JSONL file of {"prompt", "completion"}, or its examples.
        tasks: task name → JSONL file or examples (`TokenizedExample`s; from rows with
            `gradmix.trainer.hf_data.as_examples`), registered with the server when the
            job is set up (a task given in memory with metadata path "in-process:<task>").
        output_dir: where each rank's run log goes (`logs/rank-<r>.jsonl`).
        sketching: projector, dim, schedule and sample sizes (default `SketchingConfig()`).
        steps: the run's planned optimizer steps (the anchors' horizon).
        learning_rate: the configured learning rate (the anchors' horizon).
        current_lr: a callable giving the optimizer's learning rate now (a schedule's).
        task_dir: where tasks registered later find `<task_dir>/<task>.jsonl`.
        max_length: longest sketched example in tokens.
        seed: the seed of the sketched example draws.
        policy: PolicySettings fields for a new job (empty: server defaults).
        dist: the process group (default: `process_group` on the model's device).
        reachable: whether the server is reachable now (the mixture watch's view);
            a sketch point when it is not is skipped instead of stalling training.
        state: the run state the current anchor is kept in (a resumed run's, loaded
            before; default a fresh one).
        client: the server's client (default one to `server`), closed by `close`.
        log: this rank's run log (default one in `output_dir`), closed by `close`.
    """

    def __init__(
        self,
        *,
        job: str,
        server: str,
        store: str,
        model: nn.Module,
        tokenizer: Any,
        target: Source,
        tasks: Mapping[str, Source] | None = None,
        output_dir: str | Path,
        sketching: SketchingConfig | None = None,
        steps: int,
        learning_rate: float,
        current_lr: Callable[[], float | None] | None = None,
        task_dir: str | Path = "",
        max_length: int = 128,
        seed: int = 0,
        policy: Mapping[str, Any] | None = None,
        dist: Dist | None = None,
        reachable: Callable[[], bool | None] | None = None,
        state: TrainState | None = None,
        client: SelectionClient | None = None,
        log: RunLog | None = None,
    ) -> None:
        given = dict(tasks or {})
        self.config = TrainConfig(
            job=job,
            output_dir=str(output_dir),
            server=server,
            store=str(store),
            model=_model_section(model),
            data=DataConfig(
                target=IN_PROCESS + "target" if _in_memory(target) else str(target),
                tasks={t: IN_PROCESS + t if _in_memory(p) else str(p) for t, p in given.items()},
                task_dir=str(task_dir),
                max_length=max_length,
            ),
            training=TrainingConfig(steps=steps, lr=learning_rate, seed=seed),
            sketching=sketching or SketchingConfig(),
            policy=dict(policy or {}),
        )
        if self.config.policy:
            PolicySettings(**self.config.policy)  # a bad key or value fails here, not later
        if sharded(model) and (problem := sketching_problem(self.config.sketching)):
            raise TrainerError(problem)
        device = next(model.parameters()).device
        self.dist = dist or process_group(device)
        self.tokenizer = as_tokenizer(tokenizer)
        self.projector = projector_for(model, self.config.sketching)
        sources: dict[str | None, Source] = {None: target}
        sources.update(given)
        self.pool = _Pool(
            {t: s for t, s in sources.items() if not isinstance(s, str | Path)},
            tokenizer=self.tokenizer,
            max_length=max_length,
            seed=seed,
            paths={t: s for t, s in sources.items() if isinstance(s, str | Path)},
        )
        memory = {t for t, s in given.items() if _in_memory(s)}
        self.client = client or SelectionClient(server)
        self.log = log or RunLog(output_dir, self.dist.rank)
        self.job = JobSetup(self.config, self.projector, self.client, self.log)
        self.protocol = AnchorProtocol(
            self.job,
            self.dist,
            model,
            self.pool,
            SketchStore.open(str(store)),
            _Files(self.config, self.client, memory),
            state or TrainState(),
            reachable=reachable or (lambda: True),
            learning_rate=current_lr,
        )

    @property
    def state(self) -> AnchorState:
        """The current anchor (name, step, complete, sources sketched)."""
        return self.protocol.state

    @state.setter
    def state(self, value: AnchorState) -> None:
        self.protocol.state = value

    def setup_job(self) -> None:
        """Collective: rank 0 creates the job (or finds it with the same spec) and
        registers the configured tasks; a server that is away is retried at the next
        sketch point.

        Raises:
            TrainerError: the job exists with another sketch spec.
        """
        self.job.setup(self.dist)

    def due(self, step: int) -> bool:
        """Whether `step` is a sketch point of the schedule."""
        return self.protocol.due(step)

    def sketch_point(self, step: int) -> AnchorState:
        """Collective: run one sketch point at `step`: declare an anchor if the re-anchor
        rule says so, sketch every source not yet sketched there (each rank its share),
        write the rows, complete the anchor. Returns the anchor state after it."""
        self.protocol.sketch_point(step)
        return self.protocol.state

    def close(self) -> None:
        """Close the client and the run log."""
        self.client.close()
        self.log.close()
