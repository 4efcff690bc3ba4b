"""One training run of the demo: its job file, the trainer process, and what it did.

`write_job` writes a `gradmix-train` TOML job for the demo's tasks; `TrainerRun`
starts `python -m gradmix.trainer.main` on it and follows the run through the
trainer's own rank-0 run log (steps drawn, mixture versions taking effect, and
the target loss on every target example, which the trainer evaluates every
`eval_every` steps); `target_losses` reads those measurements back. Nothing
here reaches into the trainer: it is driven exactly as a user would drive it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from gradmix.demo.tasks import VOCABULARY, TaskFiles
from gradmix.trainer.config import SketchingConfig, TrainConfig, load_config
from gradmix.trainer.runlog import log_path, read_log
from gradmix.vocabulary import DEFAULT_EXAMPLES_PER_TASK


class DemoRunError(RuntimeError):
    """The trainer process failed, or left nothing to measure."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSettings:
    """The knobs of one demo training run (both runs share them)."""

    steps: int
    seed: int = 0
    n_embd: int = 96
    n_layer: int = 3
    n_head: int = 4
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    dim: int = 128
    examples_per_task: int = DEFAULT_EXAMPLES_PER_TASK
    first_anchor: int = 150
    interval: int = 50
    reanchor_every: int = 300
    eval_every: int = 150
    """Steps between target-loss measurements (on every target example)."""
    value_kind: str = SketchingConfig().value_kind
    """The sketched value (`[sketching].value_kind`; the trainer's default)."""
    max_length: int = 48

    def __post_init__(self) -> None:
        positive = ("steps", "n_embd", "n_layer", "n_head", "batch_size", "dim")
        for name in (*positive, "examples_per_task", "interval", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be a multiple of n_head {self.n_head}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")


def write_job(
    path: Path,
    *,
    job: str,
    settings: RunSettings,
    files: TaskFiles,
    initial: list[str],
    server: str,
    store: str,
    policy: Mapping[str, Any],
) -> TrainConfig:
    """Write the job TOML for one run and return it as the trainer will read it."""
    doc: dict[str, Any] = {
        "job": job,
        "output_dir": str(path.parent / job),
        "server": server,
        "store": store,
        "model": {
            "attn_implementation": "eager",
            "config": {
                "model_type": "gpt2",
                "n_embd": settings.n_embd,
                "n_layer": settings.n_layer,
                "n_head": settings.n_head,
                "n_positions": 64,
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
            },
        },
        "tokenizer": {"kind": "char", "alphabet": VOCABULARY},
        "data": {
            "target": str(files.target),
            "tasks": {name: str(files.tasks[name]) for name in initial},
            "max_length": settings.max_length,
        },
        "deepspeed": {
            "zero_optimization": {"stage": 0},
            "gradient_clipping": 1.0,
            # Linear warm-up, then linear decay to zero at the last step.
            "scheduler": {
                "type": "WarmupDecayLR",
                "params": {
                    "warmup_min_lr": 0.0,
                    "warmup_max_lr": settings.lr,
                    "warmup_num_steps": min(settings.warmup_steps, settings.steps - 1),
                    "warmup_type": "linear",
                    "total_num_steps": settings.steps,
                },
            },
        },
        "training": {
            "steps": settings.steps,
            "lr": settings.lr,
            "batch_size": settings.batch_size,
            "seed": settings.seed,
            "eval_every": settings.eval_every,
            "eval_examples": _count_lines(files.target),
        },
        "sketching": {
            "dim": settings.dim,
            "seed": settings.seed,
            "projector": "structured",
            "value_kind": settings.value_kind,
            "examples_per_task": settings.examples_per_task,
            "batch_size": 32,
            "first_anchor": settings.first_anchor,
            "interval": settings.interval,
            "reanchor_every": settings.reanchor_every,
        },
        "policy": dict(policy),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tomli_w.dumps(doc).encode("utf-8"))
    return load_config(path, env={})


class TrainerRun:
    """A `gradmix-train` process and a reader of its rank-0 run log.

    Args:
        config_path: The job's TOML file.
        config: The same job, loaded (for its output directory).
        console: Where the trainer's own output goes (a file).
    """

    def __init__(self, config_path: Path, config: TrainConfig, console: Path) -> None:
        self.config = config
        self._log = log_path(config.output_dir, 0)
        self._offset = 0
        self._console = console.open("w", encoding="utf-8")
        env = dict(os.environ)
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gradmix.trainer.main",
                "--config",
                str(config_path),
                "--log-level",
                "WARNING",
            ],
            stdout=self._console,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self._console_path = console

    def running(self) -> bool:
        """Whether the trainer process is still alive."""
        return self._process.poll() is None

    def events(self) -> Iterator[dict[str, Any]]:
        """Run-log events written since the last call (complete lines only)."""
        if not self._log.is_file():
            return
        with self._log.open("rb") as log:
            log.seek(self._offset)
            chunk = log.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode("utf-8").splitlines():
            if line.strip():
                yield json.loads(line)

    def finish(self) -> None:
        """Wait for the process; raise `DemoRunError` with its last output if it failed."""
        code = self._process.wait()
        self._console.close()
        if code != 0:
            tail = self._console_path.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise DemoRunError(f"the trainer exited with code {code}; its last output:\n{tail}")

    def stop(self) -> None:
        """Terminate the process (used when the demo itself is interrupted)."""
        if self.running():
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._console.close()


def target_losses(config: TrainConfig) -> list[tuple[int, float]]:
    """(steps done, target loss) of every `eval` event in the run's rank-0 log, in order.

    Raises:
        DemoRunError: the run measured nothing.
    """
    path = log_path(config.output_dir, 0)
    events = read_log(path) if path.is_file() else []
    losses = [(int(e["step"]), float(e["target_loss"])) for e in events if e["event"] == "eval"]
    if not losses:
        raise DemoRunError(f"no eval events in {path}")
    return losses


def _count_lines(path: Path) -> int:
    """Non-blank lines of a JSONL file (its examples)."""
    with path.open(encoding="utf-8") as lines:
        return sum(1 for line in lines if line.strip())
