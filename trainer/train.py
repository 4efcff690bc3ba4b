"""The training loop: multitask training by the server's mixture, sketching at anchors.

Read top to bottom: build everything, resume if there is a checkpoint, then
for each step (1) apply the newest mixture on every rank at this step
boundary, (2) run a sketch point if one is due, (3) draw this step's task
and train on a batch of it, (4) report and checkpoint. Sketching, store
writes and mixture following are calls out of the loop (anchors.py,
mixture_sync.py), not woven through it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from gradmix.client import MixtureSampler
from gradmix.store import SketchStore
from gradmix.trainer.anchors import AnchorProtocol
from gradmix.trainer.config import TrainConfig
from gradmix.trainer.console import Progress
from gradmix.trainer.data import TaskPool, collate
from gradmix.trainer.distributed import Dist, cap_cpu_threads, init_distributed, shutdown
from gradmix.trainer.errors import ServerRefused
from gradmix.trainer.job_setup import JobSetup
from gradmix.trainer.metrics import serve_metrics
from gradmix.trainer.mixture_sync import MixtureSync, ServerWatch
from gradmix.trainer.projectors import build_projector
from gradmix.trainer.runlog import RunLog
from gradmix.trainer.setup import (
    build_client,
    build_engine,
    build_model,
    build_pool,
    build_tokenizer,
)
from gradmix.trainer.sharded import sharded
from gradmix.trainer.sketch import eval_mode
from gradmix.trainer.summary import build_summary
from gradmix.trainer.task_files import TaskFiles
from gradmix.trainer.train_state import TrainState
from gradmix.trainer.values import completion_loss


@dataclass(frozen=True)
class TrainResult:
    """What a finished run reports (per rank)."""

    steps: int
    mixture_version: int
    anchor: str


def train(config: TrainConfig) -> TrainResult:
    """Run the job on this process's rank; every rank calls it (torchrun or alone)."""
    dist = init_distributed()
    try:
        result = _train(config, dist)
    except BaseException:
        torch.distributed.destroy_process_group()  # no barrier: the other ranks may be gone
        raise
    shutdown()
    return result


def _train(config: TrainConfig, dist: Dist) -> TrainResult:
    # ---- build: the same model on every rank; the job is set up with the server
    #      before DeepSpeed is, so a refused job fails in seconds
    torch.manual_seed(config.training.seed)
    cap_cpu_threads(dist)
    tokenizer = build_tokenizer(config.tokenizer)
    model = build_model(config.model, tokenizer)
    pool = build_pool(config, tokenizer)
    pool.examples(None)  # the target is always needed: a bad file fails every rank now
    projector = build_projector(
        model,
        kind=config.sketching.projector,
        dim=config.sketching.dim,
        seed=config.sketching.seed,
        patterns=config.sketching.parameters,
        factor_dim=config.sketching.factor_dim or None,
    )
    log = RunLog(config.output_dir, dist.rank)
    metrics = serve_metrics(config.job, config.metrics_port, log) \
        if dist.is_main and config.metrics_port else None
    client = build_client(config)
    store = None if config.upload else SketchStore.open(config.store)  # upload: rows over gRPC
    job = JobSetup(config, projector, client, log)
    job.setup(dist)
    engine = build_engine(config, model)

    # ---- resume, or start from the server's first mixture
    sampler = MixtureSampler(config.training.seed, rank=dist.rank, world_size=dist.world_size)
    state = TrainState(sampler=sampler)
    if state.resume(engine, config.output_dir, dist):
        log.event(
            "resume",
            f"resumed at step {state.step} with mixture version {state.applied_version}",
            step=state.step,
            anchor=state.anchor.name,
        )
    start = state.step
    watch = ServerWatch(client, config.job, after_version=state.applied_version).start() \
        if dist.is_main else None
    files = TaskFiles(config, client)
    sync = MixtureSync(dist, state, log, watch, pool, partial(files.readable, pool=pool),
                       hold=config.training.reproducible)
    anchors = AnchorProtocol(
        job,
        dist,
        engine.module,
        pool,
        store,
        files,
        state,
        reachable=lambda: sync.reachable,
        learning_rate=lambda: _current_lr(engine),
    )
    waited = time.monotonic()
    if start == 0:
        wait = config.training.wait_for_mixture if job.ready else 0.0
        sync.first(wait, config.data.tasks)
    waited = time.monotonic() - waited

    # ---- the loop
    steps, eval_every = config.training.steps, config.training.eval_every
    progress = Progress(steps, start, enabled=dist.is_main)
    target_loss = float("nan")
    if eval_every and start == 0:
        target_loss = _evaluate(dist, engine.module, pool, config, log, steps_done=0)
    done, stopped_by, reported = start, "", set[str]()
    with progress:
        for step in range(start, config.training.steps):
            sync.boundary(step)  # every rank switches mixture at this same step
            if anchors.due(step):
                completed = len(anchors.completed)
                anchors.sketch_point(step)
                if sync.hold and len(anchors.completed) > completed:
                    sync.at_anchor(step, anchors.state.name, config.training.mixture_timeout)
            stopped_by = _refusal(config, sync, anchors, log, step, reported)
            if stopped_by:
                break

            version = sampler.version
            task = sampler.sample()
            batch = pool.train_batch(task, step, dist.rank, config.training.batch_size)
            batch = batch.to(engine.device)
            logits = engine(input_ids=batch.input_ids).logits
            loss = completion_loss(logits, batch.input_ids, batch.loss_mask)
            engine.backward(loss)
            engine.step()

            log.event("step", step=step, task=task, loss=loss.item(), version=version)
            mean_loss = dist.all_mean(loss.item())
            done = state.step = step + 1
            if eval_every and (done % eval_every == 0 or done == steps):
                target_loss = _evaluate(dist, engine.module, pool, config, log, steps_done=done)
            progress.update(_status(sync), _details(mean_loss, target_loss, version, anchors))
            if config.training.checkpoint_every and done % config.training.checkpoint_every == 0:
                _save(config, dist, engine, state, log)

    # ---- finish: a final checkpoint, the summary, then leave cleanly
    every = config.training.checkpoint_every
    if start < done and not (every and done % every == 0):
        _save(config, dist, engine, state, log)
    if watch is not None:
        watch.close()
    client.close()
    if dist.is_main:
        summary = build_summary(
            steps=done,
            history=state.history,
            anchors=anchors,
            configured_tasks=list(config.data.tasks),
            first_wait_seconds=waited,
            stopped_by=stopped_by,
        )
        summary.report(log, logging.getLogger("gradmix.trainer"))
    log.close()
    if metrics is not None:
        metrics.close()
    if stopped_by:
        raise ServerRefused(
            f"stopped at step {done}: the server refused: {stopped_by} "
            '(on_server_error = "continue" trains on regardless)'
        )
    return TrainResult(done, sync.applied_version, anchors.state.name)


def _refusal(
    config: TrainConfig,
    sync: MixtureSync,
    anchors: AnchorProtocol,
    log: RunLog,
    step: int,
    reported: set[str],
) -> str:
    """The server refusal that ends the run now ("" if none, or if the job says continue;
    then each distinct refusal is logged once, as an error)."""
    refused = anchors.refused or sync.refused
    if not refused:
        return ""
    if config.on_server_error == "stop":
        return refused
    if refused not in reported:
        reported.add(refused)
        log.event(
            "server_refused",
            f"the server refused: {refused}; training on (on_server_error = continue) under "
            f"mixture version {sync.applied_version}, which is no longer being estimated",
            level=logging.ERROR,
            step=step,
            error=refused,
        )
    anchors.refused = ""
    return ""


def _current_lr(engine: Any) -> float | None:
    """The optimizer's learning rate now (its first parameter group's; None if unknown)."""
    rates = engine.get_lr()
    return float(rates[0]) if rates else None


def _save(config: TrainConfig, dist: Dist, engine: Any, state: TrainState, log: RunLog) -> None:
    """Collective: checkpoint the engine and the run state, at `state.step`."""
    tag = state.save(engine, config.output_dir, dist)
    log.event("checkpoint", f"checkpoint {tag}", step=state.step, tag=tag)


def _evaluate(
    dist: Dist,
    module: torch.nn.Module,
    pool: TaskPool,
    config: TrainConfig,
    log: RunLog,
    *,
    steps_done: int,
) -> float:
    """Rank 0: the target loss after `steps_done` optimizer steps, written to the run log
    as an `eval` event (step = steps done, so 0 is the initial model). Other ranks: NaN,
    except on a model sharded by ZeRO-3, whose forward every rank runs (not logged)."""
    if not dist.is_main:
        return _target_loss(module, pool, config) if sharded(module) else float("nan")
    loss = _target_loss(module, pool, config)
    count = min(config.training.eval_examples, len(pool.examples(None)))
    log.event("eval", step=steps_done, target_loss=loss, examples=count)
    return loss


@torch.no_grad()
def _target_loss(module: torch.nn.Module, pool: TaskPool, config: TrainConfig) -> float:
    """Completion loss on a fixed sample of the target (collective only under ZeRO-3)."""
    examples = pool.examples(None)[: config.training.eval_examples]
    batch = collate(examples, pool.tokenizer.pad_id).to(next(module.parameters()).device)
    with eval_mode(module):
        logits = module(input_ids=batch.input_ids).logits
    return float(completion_loss(logits, batch.input_ids, batch.loss_mask))


def _status(sync: MixtureSync) -> str:
    """The server's state, first on the progress line (it must survive 80 columns)."""
    if sync.refused:
        return "server=REFUSED"
    return {None: "server=?", True: "server=ok", False: "server=DOWN"}[sync.reachable]


def _details(loss: float, target: float, version: int, anchors: AnchorProtocol) -> str:
    anchor = f"@{anchors.state.step}" if anchors.state.name else "-"
    if anchors.state.name and not anchors.state.complete:
        anchor += "(open)"
    return f"v{version} anchor={anchor} loss={loss:.3f} target={target:.3f}"
