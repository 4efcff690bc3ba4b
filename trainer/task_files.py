"""Task-file discovery: where rank 0 finds each task's data file.

A task's file is, first existing wins: the job's `[data].tasks` entry, the
`path` in its registration metadata on the server, or
`<task_dir>/<task>.jsonl`. Only rank 0 looks (it reads the files and asks
the server); the other ranks learn the paths from its broadcasts.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from gradmix.client import SelectionClient, Task
from gradmix.client.errors import GradmixError
from gradmix.trainer.config import TrainConfig
from gradmix.trainer.data import TaskPool, is_data_file, is_url
from gradmix.trainer.errors import DataError


class TaskFiles:
    """Rank 0's directory of task data files: configured, a registration's metadata
    `path`, or `<task_dir>/<task>.jsonl` (first existing file wins). Each may be a
    local path or an fsspec URL (s3://bucket/task.jsonl, ...).

    Args:
        config: the job configuration.
        client: the server client (to look up tasks registered since the last listing).
    """

    def __init__(self, config: TrainConfig, client: SelectionClient) -> None:
        self.config, self.client = config, client
        self._metadata: dict[str, dict[str, str]] = {}

    def remember(self, tasks: list[Task]) -> None:
        """Keep the registration metadata of listed tasks."""
        self._metadata.update({t.name: dict(t.metadata) for t in tasks})

    def path(self, task: str) -> str | None:
        """The task's data file, or None if none can be found."""
        if task not in self._metadata and task not in self.config.data.tasks:
            with contextlib.suppress(GradmixError):  # unreachable: use what is known
                self.remember(self.client.list_tasks(self.config.job))
        candidates = [
            self.config.data.tasks.get(task, ""),
            self._metadata.get(task, {}).get("path", ""),
        ]
        if task_dir := self.config.data.task_dir:
            candidates.append(
                f"{task_dir.rstrip('/')}/{task}.jsonl" if is_url(task_dir)
                else str(Path(task_dir) / f"{task}.jsonl")
            )
        return next((c for c in candidates if c and is_data_file(c)), None)

    def readable(self, task: str, pool: TaskPool) -> str | None:
        """The task's file if it is found and loads (into `pool`, now); None otherwise."""
        path = self.path(task)
        if path is None:
            return None
        pool.add(task, path)
        try:
            pool.examples(task)
        except DataError:
            return None
        return path
