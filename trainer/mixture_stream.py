"""A mixture-following IterableDataset over per-task example collections.

The dynamic counterpart of `datasets.interleave_datasets(probabilities=...)`:
the weights change while the run goes on, at exactly scheduled draws.

The stream is one global sequence of draws. Draw i takes its task from a
`MixtureSampler` (the mixture in force at draw i, inverse CDF of a
counter-based uniform) and its example uniformly, with replacement, from that
task, seeded by (seed, task, i). So the stream is a pure function of the seed
and the schedule of (mixture, draw it took effect): a resumed run rebuilt
from `state_dict` continues it exactly, and every rank that builds it sees
the same sequence.

Ranks and workers read disjoint parts of it: stream r of R (`rank`,
`world_size`) and worker w of W (torch DataLoader workers) yield the draws i
with i mod (R·W) = r·W + w. Under the Hugging Face Trainer keep the defaults
(rank 0 of 1): accelerate hands each rank its own slice of the batches.

Mixtures scheduled after iteration started reach only the process that holds
the stream, so live following (`gradmix.trainer.hf`) needs `num_workers=0`;
a fixed schedule works with any number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from gradmix.client import Mixture, MixtureSampler
from gradmix.client.errors import SamplerError
from gradmix.trainer.data import Tokenizer, tokenize
from gradmix.trainer.errors import DataError
from gradmix.trainer.projectors import derive_seed
from torch.utils.data import IterableDataset, get_worker_info

#: Label of positions that are not scored (transformers' ignore index).
IGNORE = -100
_FORMAT = 1


class MixtureStream(IterableDataset):  # type: ignore[type-arg]
    """Examples drawn from per-task collections by the mixture in force at each draw.

    Args:
        tasks: task name → its examples (any sized, indexable collection: a list,
            a `datasets.Dataset`, ...).
        seed: the stream's seed.
        mixture: the weights in force from draw 0 (default: none; schedule one
            before iterating).
        rank: this stream's index among `world_size` disjoint streams.
        world_size: the number of disjoint streams.

    Raises:
        DataError: no task, or an empty one.
    """

    def __init__(
        self,
        tasks: Mapping[str, Sequence[Any]],
        *,
        seed: int = 0,
        mixture: Mapping[str, float] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not tasks:
            raise DataError("a mixture stream needs at least one task")
        empty = sorted(t for t, rows in tasks.items() if len(rows) == 0)
        if empty:
            raise DataError(f"tasks without examples: {', '.join(empty)}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}); got {rank}")
        self.tasks, self.seed = dict(tasks), seed
        self.rank, self.world_size = rank, world_size
        self.schedule: list[dict[str, Any]] = []
        self.draw = 0
        self._revision = 0
        if mixture is not None:
            self.update(mixture, at_draw=0)

    def update(self, mixture: Mixture | Mapping[str, float], at_draw: int) -> None:
        """Schedule a mixture from global draw `at_draw` on (updates in draw order; a
        second update at the same draw replaces the first).

        Raises:
            SamplerError: a draw already made, out of order, or bad weights.
            UnknownTaskError: the mixture names a task without examples here.
        """
        if at_draw < self.draw:
            raise SamplerError(
                f"cannot switch mixture at draw {at_draw}: the stream is already at {self.draw}"
            )
        version = mixture.version if isinstance(mixture, Mixture) else 0
        weights = dict(mixture.weights if isinstance(mixture, Mixture) else mixture)
        entry = {"at_draw": int(at_draw), "version": version, "weights": weights}
        keep = (
            self.schedule[:-1]
            if self.schedule and self.schedule[-1]["at_draw"] == at_draw
            else self.schedule
        )
        self._sampler([*keep, entry])  # validates before anything changes
        self.schedule = [*keep, entry]
        self._revision += 1

    def state_dict(self) -> dict[str, Any]:
        """The schedule and the next global draw (JSON-serialisable)."""
        return {
            "format": _FORMAT,
            "seed": self.seed,
            "draw": self.draw,
            "schedule": [dict(e, weights=dict(e["weights"])) for e in self.schedule],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict` (of a stream with the same seed and tasks).

        Raises:
            DataError: another format or seed.
            SamplerError, UnknownTaskError: a schedule these tasks cannot follow.
        """
        if state.get("format") != _FORMAT or state.get("seed") != self.seed:
            raise DataError(
                f"stream state (format {state.get('format')!r}, seed {state.get('seed')!r}) "
                f"does not fit this stream (format {_FORMAT}, seed {self.seed})"
            )
        schedule = [dict(e) for e in state["schedule"]]
        self._sampler(schedule)
        self.schedule, self.draw = schedule, int(state["draw"])
        self._revision += 1

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        stride = self.world_size * workers
        mine = self.rank * workers + worker
        i = self.draw + (mine - self.draw) % stride
        sampler, revision = self._sampler(self.schedule), self._revision
        while True:
            if revision != self._revision:  # a mixture scheduled since: follow it
                sampler, revision = self._sampler(self.schedule), self._revision
            _seek(sampler, i)
            task = sampler.sample()
            rows = self.tasks[task]
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "draw", task, i))
            pick = int(torch.randint(0, len(rows), (1,), generator=gen))
            if info is None:
                self.draw = i + 1
            i += stride
            yield rows[pick]

    def _sampler(self, schedule: list[dict[str, Any]]) -> MixtureSampler:
        sampler = MixtureSampler(self.seed, tasks=sorted(self.tasks))
        for entry in schedule:
            sampler.update(_mixture(entry), at_step=entry["at_draw"])
        return sampler


def _mixture(entry: Mapping[str, Any]) -> Mixture | dict[str, float]:
    """A schedule entry as what `MixtureSampler.update` takes (versions kept)."""
    if not entry["version"]:
        return dict(entry["weights"])
    return Mixture(
        job="",
        version=int(entry["version"]),
        anchor="",
        policy="",
        weights=dict(entry["weights"]),
        scores={},
        states={},
        pending_tasks=(),
        created_at=0.0,
        anchor_loss=0.0,
        estimated_loss=0.0,
    )


def _seek(sampler: MixtureSampler, draw: int) -> None:
    """Move the sampler to global draw `draw` (the draws are counter-based: O(1))."""
    state = sampler.state_dict()
    state["step"] = draw
    sampler.load_state_dict(state)


def completion_example(
    prompt: str, completion: str, tokenizer: Tokenizer, max_length: int
) -> dict[str, list[int]]:
    """A prompt/completion record as Trainer inputs: `input_ids` and `labels` scored on
    the completion and eos only (the same tokens `gradmix-train` scores)."""
    example = tokenize(prompt, completion, tokenizer, max_length)
    pairs = zip(example.input_ids, example.loss_mask, strict=True)
    labels = [t if scored else IGNORE for t, scored in pairs]
    return {"input_ids": list(example.input_ids), "labels": labels}


def pad_collator(
    pad_id: int, width: int | None = None
) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, torch.Tensor]]:
    """A data collator right-padding `input_ids` (with `pad_id`) and `labels` (with -100)
    and building the `attention_mask`.

    Args:
        pad_id: the padding token id.
        width: pad every batch to this many tokens (default: the longest row). Several
            ranks reading one stream through accelerate (its default for an
            IterableDataset) need batches of one shape.

    Raises:
        DataError: a row longer than `width`.
    """

    def collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        if width is not None and longest > width:
            raise DataError(f"a row of {longest} tokens does not fit width {width}")
        size = width or longest
        ids = torch.full((len(rows), size), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), size), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), size), dtype=torch.long)
        for row, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[row, :n] = torch.as_tensor(r["input_ids"])
            labels[row, :n] = torch.as_tensor(r["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate
