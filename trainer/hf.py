"""gradmix inside the Hugging Face Trainer: a `TrainerCallback` and its data.

    stream = MixtureStream({"add": add_rows, "mul": mul_rows})
    callback = GradmixCallback(stream, job="arith", server="127.0.0.1:50551",
                               store="./gradmix-store", tokenizer=tokenizer,
                               target="target.jsonl", tasks={"add": "add.jsonl", ...})
    Trainer(model, args, train_dataset=stream, data_collator=pad_collator(pad_id),
            callbacks=[callback]).train()

What the callback does, on every rank (the Trainer calls it on each):

- at the start of training it builds a `gradmix.trainer.api.Sketcher` on the
  model (rank 0 creates or joins the job) and starts rank 0's watch of the
  job's mixtures; a fresh run waits up to `wait_for_mixture` seconds for a
  first mixture, else starts uniform over the stream's tasks;
- at each optimizer step's start it runs a sketch point if one is due (the
  anchor protocol of `gradmix-train`, collective over the ranks), then
  broadcasts rank 0's newest mixture with `gradmix-train`'s own
  `MixtureSync`; every rank schedules it at one global draw, the first draw
  of step `global_step + lag`, so all ranks switch at the same optimizer
  step. The lag covers the batches the Trainer and accelerate fetch ahead of
  the step they train. After a sketch point that completed an anchor, rank 0
  waits up to `wait_for_mixture` seconds for that anchor's mixture, so the
  switch step follows the anchor, not the server's timing;
- its state (the stream's schedule, the mixture history, the anchor) is
  saved with each Trainer checkpoint (`trainer_state.json`, as a stateful
  callback) and restored when `trainer.train(resume_from_checkpoint=...)`
  resumes: the resumed run draws exactly what the uninterrupted run drew.
  Leave `TrainingArguments.restore_callback_states_from_checkpoint` off (its
  default): the callback restores itself.

The stream is global and read by accelerate, which hands each rank its own
batches; keep `dataloader_num_workers=0`: a worker process iterates its own
copy of the stream, which mixtures scheduled during the run never reach, and
each worker batches its own draws (worker w makes batches w, w+W, ...), so a
switch at one draw would not land on one optimizer step. Following live
mixtures with workers needs the schedule shared with them and each worker
held back until the schedule is final for the draws it makes (the step
`lag` ahead); that is not built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradmix.client import Mixture, SelectionClient
from gradmix.trainer.api import Sketcher, Source, process_group
from gradmix.trainer.config import SketchingConfig
from gradmix.trainer.errors import TrainerError
from gradmix.trainer.hf_data import as_examples
from gradmix.trainer.mixture_stream import MixtureStream
from gradmix.trainer.mixture_sync import MixtureSync, ServerWatch
from gradmix.trainer.runlog import RunLog
from gradmix.trainer.train_state import AnchorState, TrainState
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class GradmixCallback(TrainerCallback, ExportableState):  # type: ignore[misc]
    """Sketches at anchors and follows the job's mixtures inside `transformers.Trainer`.

    Args:
        stream: the Trainer's `train_dataset`.
        job: the job's name on the server and in the store.
        server: host:port of the selection server.
        store: the sketch store (path or fsspec URL; the server's store).
        tokenizer: a gradmix `Tokenizer` or a transformers tokenizer (for sketching).
        target: the target's JSONL file of {"prompt", "completion"}, or its rows
            ({"input_ids", "labels"}, e.g. from `gradmix.trainer.hf_data.task_rows`).
        tasks: task name → JSONL file to sketch the task from (default: the stream's
            own rows of every task); registered with the server.
        sketching: projector, dim, schedule and sample sizes.
        max_length: longest sketched example in tokens.
        policy: PolicySettings fields for a new job.
        lag: optimizer steps between a mixture's arrival and its first step (>= 2).
        wait_for_mixture: seconds rank 0 waits for a first mixture, and for a newly
            completed anchor's.
        output_dir: where the run logs go (default: the Trainer's output_dir).
    """

    def __init__(
        self,
        stream: MixtureStream,
        *,
        job: str,
        server: str,
        store: str,
        tokenizer: Any,
        target: str | Path | Sequence[Mapping[str, Any]],
        tasks: Mapping[str, str | Path] | None = None,
        sketching: SketchingConfig | None = None,
        max_length: int = 128,
        policy: Mapping[str, Any] | None = None,
        lag: int = 2,
        wait_for_mixture: float = 10.0,
        output_dir: str | Path | None = None,
    ) -> None:
        if lag < 2:
            raise TrainerError(f"lag must be >= 2 optimizer steps, got {lag}")
        self.stream, self.job, self.server, self.store = stream, job, server, str(store)
        self.tokenizer = tokenizer
        self.target: Source = target if isinstance(target, str | Path) else as_examples(target)
        self.tasks: dict[str, Source] = (
            {t: as_examples(rows) for t, rows in stream.tasks.items()}
            if tasks is None
            else dict(tasks)
        )
        self.sketching, self.max_length, self.policy = sketching, max_length, policy
        self.lag, self.wait_for_mixture, self.output_dir = lag, wait_for_mixture, output_dir
        self.run: TrainState | None = None
        """This rank's run state (None outside training): the stream's schedule, the
        mixture history and the anchor."""
        self.sketcher: Sketcher | None = None
        self.sync: MixtureSync | None = None
        self._lr_scheduler: Any = None

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every mixture scheduled: version, the optimizer step it takes effect at,
        anchor and weights."""
        return self.run.history if self.run is not None else []

    @property
    def watch(self) -> ServerWatch | None:
        """Rank 0's watch of the job's mixtures (None elsewhere, and outside training)."""
        return self.sync.watch if self.sync is not None else None

    # ------------------------------------------------------------ saved state

    def state(self) -> dict[str, Any]:
        """What a Trainer checkpoint keeps (in trainer_state.json's stateful callbacks)."""
        anchor = (self.run.anchor if self.run is not None else AnchorState()).to_dict()
        saved = {"stream": self.stream.state_dict(), "history": self.history, "anchor": anchor}
        return {"args": {}, "attributes": {"gradmix": saved}}

    def _resumed(self, args: Any, state: Any, per_step: int) -> TrainState:
        """The run state a resumed run continues from (the stream is restored too).

        Raises:
            TrainerError: the checkpoint holds no gradmix state.
        """
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        if stored is None:
            raise TrainerError("the checkpoint has no gradmix state to resume the stream from")
        saved = (stored[0] if isinstance(stored, list) else stored)["attributes"]["gradmix"]
        stream_state = dict(saved["stream"])
        # The Trainer replays skipped batches from the stream's start unless told not to.
        stream_state["draw"] = state.global_step * per_step if args.ignore_data_skip else 0
        self.stream.load_state_dict(stream_state)
        history = list(saved["history"])
        return TrainState(
            sampler=_StreamSchedule(self.stream, per_step),
            step=state.global_step,
            history=history,
            applied_version=max((h["version"] for h in history), default=0),
            anchor=AnchorState(**saved["anchor"]),
        )

    # ------------------------------------------------------------ Trainer events

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.dataloader_num_workers:
            raise TrainerError("GradmixCallback needs dataloader_num_workers=0 (see its docstring)")
        model = kwargs["model"]
        self._lr_scheduler = kwargs.get("lr_scheduler")
        dist = process_group(next(model.parameters()).device)
        per_step = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * dist.world_size
        )
        # The run state first (a resumed run's, whole), then each collaborator complete.
        run = (self._resumed(args, state, per_step) if state.global_step > 0
               else TrainState(sampler=_StreamSchedule(self.stream, per_step)))
        output_dir = self.output_dir or args.output_dir
        client = SelectionClient(self.server)
        log = RunLog(output_dir, dist.rank)
        watch = (ServerWatch(client, self.job, after_version=run.applied_version)
                 if dist.is_main else None)
        sync = MixtureSync(dist, run, log, watch, None,
                           lambda task: task if task in self.stream.tasks else None)
        sketcher = Sketcher(
            job=self.job,
            server=self.server,
            store=self.store,
            model=model,
            tokenizer=self.tokenizer,
            target=self.target,
            tasks=self.tasks,
            output_dir=output_dir,
            sketching=self.sketching,
            steps=max(state.max_steps, 1),
            learning_rate=args.learning_rate,
            current_lr=self._current_lr,
            max_length=self.max_length,
            seed=args.seed,
            policy=self.policy,
            dist=dist,
            reachable=lambda: sync.reachable is not False,
            state=run,
            client=client,
            log=log,
        )
        self.run, self.sync, self.sketcher = run, sync, sketcher
        sketcher.setup_job()
        if watch is not None:  # rank 0, once the job exists
            watch.start()
            if state.global_step == 0:
                watch.wait_first(self.wait_for_mixture)
        if state.global_step == 0:
            sync.boundary(0)
            if not self.stream.schedule:
                sync.apply({t: 1.0 for t in self.stream.tasks}, step=0)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.sketcher is not None and self.sync is not None
        step = state.global_step
        if self.sketcher.due(step):
            before = self.sketcher.state
            after = self.sketcher.sketch_point(step)
            fresh = after.complete and not (before.complete and before.name == after.name)
            if fresh and self.sync.watch is not None:  # rank 0: the anchor's mixture, bounded
                self.sync.watch.wait_at_anchor(after.name, self.wait_for_mixture)
        self.sync.boundary(step, at_step=step + self.lag)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.sync is not None and self.sync.watch is not None:
            self.sync.watch.close()
            self.sync.watch = None
        if self.sketcher is not None:
            self.sketcher.close()

    # ------------------------------------------------------------ helpers

    def _current_lr(self) -> float | None:
        try:
            rates = self._lr_scheduler.get_last_lr()
        except AttributeError:  # no scheduler: the configured rate
            return None
        return float(rates[0]) if rates else None


class _StreamSchedule:
    """The stream as `MixtureSync` schedules on it: a mixture for optimizer step S
    takes effect at the stream's first draw of step S (S × examples per step)."""

    def __init__(self, stream: MixtureStream, per_step: int) -> None:
        self.stream, self.per_step = stream, per_step

    def update(self, mixture: Mixture | dict[str, float], at_step: int) -> None:
        self.stream.update(mixture, at_draw=at_step * self.per_step)
