"""Where everything lives in the store (the only module that spells paths).

```
zarr.json                                       root group
jobs/<job>/                                     attrs: spec, settings, created_at
  tasks/<task>/                                 attrs: metadata, registered_at[, retired_at]
  anchors/<anchor>/                             attrs: step, state, declared_at[, horizon]
    target/writers/<writer>/
      grads (n, d)  values (n,)  example_ids (n,)
      commits/<count, 15 digits>                the commit marker (an object named by the count)
    tasks/<task>/writers/<writer>/              same, one set of arrays per writer id
  mixtures/<version, 12 digits>/                attrs: one mixture record
  control/                                      attrs: [pin, archived_at] (operator state)
  events/<sequence, 12 digits>/                 attrs: one event of the job's log
```

A group is its ``zarr.json`` document: a folder without one (what a write
killed before it published the document may leave) is not there for any
reader, and a mixture version without one does not count as written.

Each writer id owns its arrays, so there are never two appenders on one
array. A writer's committed row count is the largest marker name under its
``commits/``: a marker is created (a new key, never a rewrite) after the rows
it covers, and only markers older than the previous one are deleted, so at
every instant the largest name present is the committed count (or, to a
listing racing with a commit, the count before it). Rows beyond it are not data (a
killed append may leave them behind) and are never read.
"""

from __future__ import annotations

GRADS = "grads"
VALUES = "values"
EXAMPLE_IDS = "example_ids"
COMMITS = "commits"


def commits_dir(writer_path: str) -> str:
    return f"{writer_path}/{COMMITS}"


def commit_key(writer_path: str, count: int) -> str:
    """The marker saying ``count`` rows of the writer at ``writer_path`` are committed."""
    return f"{writer_path}/{COMMITS}/{count:015d}"


def jobs_dir() -> str:
    return "jobs"


def job_dir(job: str) -> str:
    return f"jobs/{job}"


def tasks_dir(job: str) -> str:
    return f"jobs/{job}/tasks"


def task_dir(job: str, task: str) -> str:
    return f"jobs/{job}/tasks/{task}"


def anchors_dir(job: str) -> str:
    return f"jobs/{job}/anchors"


def anchor_dir(job: str, anchor: str) -> str:
    return f"jobs/{job}/anchors/{anchor}"


def anchor_tasks_dir(job: str, anchor: str) -> str:
    return f"jobs/{job}/anchors/{anchor}/tasks"


def source_dir(job: str, anchor: str, task: str | None) -> str:
    """The rows of one source (the target when ``task`` is None) at an anchor."""
    base = anchor_dir(job, anchor)
    return f"{base}/target" if task is None else f"{base}/tasks/{task}"


def writers_dir(job: str, anchor: str, task: str | None) -> str:
    return f"{source_dir(job, anchor, task)}/writers"


def mixtures_dir(job: str) -> str:
    return f"jobs/{job}/mixtures"


def mixture_dir(job: str, version: int) -> str:
    return f"jobs/{job}/mixtures/{version_key(version)}"


def version_key(version: int) -> str:
    """Zero-padded so that names sort in version order."""
    return f"{version:012d}"


def control_dir(job: str) -> str:
    """The job's operator state: its pin, whether it is archived."""
    return f"jobs/{job}/control"


def events_dir(job: str) -> str:
    return f"jobs/{job}/events"


def event_dir(job: str, sequence: int) -> str:
    return f"jobs/{job}/events/{version_key(sequence)}"
