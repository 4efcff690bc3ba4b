"""The training loop: multitask training by the server's mixture, sketching at anchors.

Read top to bottom: build everything, resume if there is a checkpoint, then
for each step (1) apply the newest mixture on every rank at this step
boundary, (2) run a sketch point if one is due, (3) draw this step's task
and train on a batch of it, (4) report and checkpoint. Sketching, store
writes and mixture following are calls out of the loop (anchors.py,
follow.py), not woven through it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from gradmix.client import MixtureSampler
from gradmix.store import SketchStore
from gradmix.trainer import checkpoint
from gradmix.trainer.anchors import AnchorProtocol, AnchorState, TaskFiles
from gradmix.trainer.config import TrainConfig
from gradmix.trainer.console import Progress
from gradmix.trainer.data import TaskPool, collate
from gradmix.trainer.distributed import Dist, cap_cpu_threads, init_distributed, shutdown
from gradmix.trainer.errors import DataError, ServerRefused, TrainerError
from gradmix.trainer.follow import MixtureSync, ServerWatch
from gradmix.trainer.metrics import serve_metrics
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
    files = TaskFiles(config, client)
    sampler = MixtureSampler(config.training.seed, rank=dist.rank, world_size=dist.world_size)
    sync = MixtureSync(dist, sampler, log, None, pool, _readable_file(files, pool))
    anchors = AnchorProtocol(
        config,
        dist,
        model,
        projector,
        pool,
        client,
        store,
        log,
        files,
        reachable=lambda: sync.reachable,
    )
    anchors.setup_job()
    engine = build_engine(config, model)
    anchors.module = engine.module
    anchors.learning_rate = lambda: _current_lr(engine)

    # ---- resume, or start from the server's first mixture
    start = _resume(config, dist, engine, sampler, sync, anchors, log)
    if dist.is_main:
        sync.watch = ServerWatch(client, config.job, after_version=sync.applied_version).start()
    waited = time.monotonic()
    if start == 0:
        _first_mixture(config, dist, sync, anchors)
    waited = time.monotonic() - waited
    sync.hold = config.training.reproducible

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
            done = step + 1
            if eval_every and (done % eval_every == 0 or done == steps):
                target_loss = _evaluate(dist, engine.module, pool, config, log, steps_done=done)
            progress.update(_status(sync), _details(mean_loss, target_loss, version, anchors))
            if config.training.checkpoint_every and done % config.training.checkpoint_every == 0:
                _save(config, dist, engine, done, sampler, sync, anchors, log)

    # ---- finish: a final checkpoint, the summary, then leave cleanly
    every = config.training.checkpoint_every
    if start < done and not (every and done % every == 0):
        _save(config, dist, engine, done, sampler, sync, anchors, log)
    if sync.watch is not None:
        sync.watch.close()
    client.close()
    if dist.is_main:
        summary = build_summary(
            steps=done,
            history=sync.history,
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


def _readable_file(files: TaskFiles, pool: TaskPool) -> Callable[[str], str | None]:
    """Rank 0's test for a mixture's task: its file, if found and readable (loaded now)."""

    def locate(task: str) -> str | None:
        path = files.path(task)
        if path is None:
            return None
        pool.add(task, path)
        try:
            pool.examples(task)
        except DataError:
            return None
        return path

    return locate


def _first_mixture(
    config: TrainConfig, dist: Dist, sync: MixtureSync, anchors: AnchorProtocol
) -> None:
    """Rank 0 waits briefly for the job's first mixture; every rank then starts from
    it, or from a uniform mixture over the configured tasks."""
    if dist.is_main and sync.watch is not None and anchors.job_ready:
        sync.watch.wait_first(config.training.wait_for_mixture)
    sync.boundary(0)
    if sync.applied_version == 0:
        if not config.data.tasks:
            raise TrainerError("no mixture from the server and no [data].tasks to start from")
        sync.apply({t: 1.0 for t in config.data.tasks}, step=0)


def _resume(
    config: TrainConfig,
    dist: Dist,
    engine: Any,
    sampler: MixtureSampler,
    sync: MixtureSync,
    anchors: AnchorProtocol,
    log: RunLog,
) -> int:
    """Load the latest checkpoint if there is one; returns the next step."""
    if not checkpoint.has_checkpoint(config.output_dir):
        return 0
    state = checkpoint.load(engine, config.output_dir, dist.world_size)
    sampler.load_state_dict(state["samplers"][dist.rank])
    sync.history = list(state["history"])
    sync.applied_version = int(state["applied_version"])
    anchors.state = AnchorState(**state["anchor"])
    log.event(
        "resume",
        f"resumed at step {state['step']} with mixture version {sync.applied_version}",
        step=state["step"],
        anchor=anchors.state.name,
    )
    return int(state["step"])


def _save(
    config: TrainConfig,
    dist: Dist,
    engine: Any,
    step: int,
    sampler: MixtureSampler,
    sync: MixtureSync,
    anchors: AnchorProtocol,
    log: RunLog,
) -> None:
    state = {
        "samplers": dist.all_gather(sampler.state_dict()),
        "history": sync.history,
        "applied_version": sync.applied_version,
        "anchor": anchors.state.to_dict(),
    }
    tag = checkpoint.save(engine, config.output_dir, step, state)
    log.event("checkpoint", f"checkpoint {tag}", step=step, tag=tag)


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
