"""Job setup: join the job on the server (or create it) and register the configured tasks.

`JobSetup.ensure` is rank 0's part (RPCs, once per run); `JobSetup.setup` is
the collective before training: rank 0 makes its calls first, then
broadcasts only what every rank must act on (a refusal that ends the run).
A server that is away is not fatal: the anchor protocol calls `ensure` again
at the next sketch point.
"""

from __future__ import annotations

import logging

from gradmix.client import PolicySettings, SelectionClient, SketchSpec
from gradmix.client.errors import AlreadyExists, GradmixError
from gradmix.trainer.config import TrainConfig
from gradmix.trainer.distributed import Dist
from gradmix.trainer.errors import ConfigError, describe, is_transient
from gradmix.trainer.projectors import Projector
from gradmix.trainer.runlog import RunLog
from gradmix.trainer.setup import join_job


class JobSetup:
    """The job as the trainer declares it: its sketch spec, policy, target and tasks.

    Args:
        config: the job configuration.
        projector: the job's projector (its manifest names the sketched parameters).
        client: the server client.
        log: this rank's run log.
    """

    def __init__(
        self, config: TrainConfig, projector: Projector, client: SelectionClient, log: RunLog
    ) -> None:
        self.config, self.projector, self.client, self.log = config, projector, client, log
        self.ready = False
        """Rank 0: whether the job is created and the configured tasks registered."""

    def setup(self, dist: Dist) -> None:
        """Collective: rank 0 creates the job (or finds it) and registers the configured
        tasks, then every rank learns whether the run can go on.

        Raises:
            ConfigError: the job exists with another spec (sketches must never mix), or
                the server refused it.
        """
        problem = self._try_ensure() if dist.is_main else ""
        problem = dist.broadcast(problem)
        if problem:
            raise ConfigError(problem)

    def _try_ensure(self) -> str:
        """Rank 0: `ensure`, with what ends the run as a message ("" if it may go on)."""
        try:
            self.ensure()
        except AlreadyExists as error:
            return f"job {self.config.job!r} exists with another spec: {describe(error)}"
        except ConfigError as error:  # missing, and this token may not create it
            return str(error)
        except GradmixError as error:
            if not is_transient(error):
                return f"the server refused job {self.config.job!r}: {describe(error)}"
            self.log.event(
                "server",
                f"cannot set up the job yet ({describe(error)}); retrying at the next "
                "sketch point, training on a uniform mixture meanwhile",
                level=logging.WARNING,
                error=describe(error),
            )
        return ""

    def ensure(self) -> None:
        """Rank 0: create the job and register the configured tasks (once).

        Raises:
            AlreadyExists: the job exists with another spec.
            ConfigError: the job does not exist and this token may not create it.
            GradmixError: from the server (the caller decides what is fatal).
        """
        if self.ready:
            return
        cfg = self.config.sketching
        manifest = self.projector.manifest
        sketch = SketchSpec(
            dim=cfg.dim,
            seed=cfg.seed,
            projector=manifest.projector,
            manifest_hash=manifest.hash(),
            dtype=cfg.dtype,
            value_kind=cfg.value_kind,
        )
        policy = PolicySettings(**self.config.policy) if self.config.policy else None
        how = join_job(
            self.client, self.config.job, sketch=sketch, policy=policy,
            target=self.config.data.target,
        )
        for task, path in self.config.data.tasks.items():
            try:
                self.client.register_task(self.config.job, task, {"path": path})
            except AlreadyExists:  # registered by someone else, with other metadata
                self.log.event("task_registered_elsewhere", task=task)
        self.ready = True
        self.log.event(
            "job",
            f"job {self.config.job} ready ({how}; manifest {manifest.hash()})",
            manifest_hash=manifest.hash(),
            manifest=manifest.to_json(),
        )
