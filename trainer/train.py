"""The training loop: multitask training by the server's mixture, sketching at anchors.

Read top to bottom: build everything, resume if there is a checkpoint, then
for each step (1) apply the newest mixture on every rank at this step
boundary, (2) run a sketch point if one is due, (3) draw this step's task
and train on a batch of it, (4) report and checkpoint. Sketching, store
writes and mixture following are calls out of the loop (anchors.py,
follow.py), not woven through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gradmix.client import MixtureSampler
from gradmix.store import SketchStore
from gradmix.trainer import checkpoint
from gradmix.trainer.anchors import AnchorProtocol, AnchorState, TaskFiles
from gradmix.trainer.config import TrainConfig
from gradmix.trainer.data import TaskPool, collate
from gradmix.trainer.distributed import Dist, init_distributed, shutdown
from gradmix.trainer.errors import DataError, TrainerError
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
from gradmix.trainer.sketch import eval_mode
from gradmix.trainer.values import completion_loss
from tqdm import tqdm


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
    # ---- build: the same model on every rank, DeepSpeed around it
    torch.manual_seed(config.training.seed)
    tokenizer = build_tokenizer(config.tokenizer)
    engine = build_engine(config, build_model(config.model, tokenizer))
    pool = build_pool(config, tokenizer)
    pool.examples(None)  # the target is always needed: a bad file fails every rank now
    projector = build_projector(
        engine.module,
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
        engine.module,
        projector,
        pool,
        client,
        store,
        log,
        files,
        reachable=lambda: sync.reachable,
        learning_rate=lambda: _current_lr(engine),
    )

    # ---- resume, or start from the server's first mixture
    start = _resume(config, dist, engine, sampler, sync, anchors, log)
    anchors.setup_job()
    if dist.is_main:
        sync.watch = ServerWatch(client, config.job, after_version=sync.applied_version).start()
    if start == 0:
        _first_mixture(config, dist, sync, anchors)

    # ---- the loop
    bar = tqdm(
        total=config.training.steps, initial=start, disable=not dist.is_main, dynamic_ncols=True
    )
    steps, eval_every = config.training.steps, config.training.eval_every
    target_loss = float("nan")
    if dist.is_main and eval_every and start == 0:
        target_loss = _evaluate(engine.module, pool, config, log, steps_done=0)
    for step in range(start, config.training.steps):
        sync.boundary(step)  # every rank switches mixture at this same step
        if anchors.due(step):
            anchors.sketch_point(step)

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
        if dist.is_main and eval_every and (done % eval_every == 0 or done == steps):
            target_loss = _evaluate(engine.module, pool, config, log, steps_done=done)
        bar.set_postfix_str(_progress(mean_loss, target_loss, version, sync, anchors))
        bar.update(1)
        if config.training.checkpoint_every and (step + 1) % config.training.checkpoint_every == 0:
            _save(config, dist, engine, step + 1, sampler, sync, anchors, log)

    # ---- finish: a final checkpoint, then leave cleanly
    bar.close()
    every = config.training.checkpoint_every
    if start < config.training.steps and not (every and config.training.steps % every == 0):
        _save(config, dist, engine, config.training.steps, sampler, sync, anchors, log)
    if sync.watch is not None:
        sync.watch.close()
    client.close()
    log.close()
    if metrics is not None:
        metrics.close()
    return TrainResult(config.training.steps, sync.applied_version, anchors.state.name)


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
        pool.add(task, Path(path))
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
    module: torch.nn.Module, pool: TaskPool, config: TrainConfig, log: RunLog, *, steps_done: int
) -> float:
    """Rank 0: the target loss after `steps_done` optimizer steps, written to the run log
    as an `eval` event (step = steps done, so 0 is the initial model)."""
    loss = _target_loss(module, pool, config)
    count = min(config.training.eval_examples, len(pool.examples(None)))
    log.event("eval", step=steps_done, target_loss=loss, examples=count)
    return loss


@torch.no_grad()
def _target_loss(module: torch.nn.Module, pool: TaskPool, config: TrainConfig) -> float:
    """Completion loss on a fixed sample of the target (rank 0 only, no collectives)."""
    examples = pool.examples(None)[: config.training.eval_examples]
    batch = collate(examples, pool.tokenizer.pad_id).to(next(module.parameters()).device)
    with eval_mode(module):
        logits = module(input_ids=batch.input_ids).logits
    return float(completion_loss(logits, batch.input_ids, batch.loss_mask))


def _progress(
    loss: float, target: float, version: int, sync: MixtureSync, anchors: AnchorProtocol
) -> str:
    server = "ok" if sync.reachable else "UNREACHABLE, retrying"
    anchor = anchors.state.name or "-"
    return f"loss={loss:.3f} target={target:.3f} mixture=v{version} anchor={anchor} server={server}"
