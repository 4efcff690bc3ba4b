"""Bounds on what one request, one job and one server may ask for.

Every bound is a server setting (`ServerConfig`, the `[limits]` block; the
defaults are here). A request past a bound is refused before it touches the
store or an estimator, with INVALID_ARGUMENT (a value no job could use) or
RESOURCE_EXHAUSTED (a count or a cost this server does not take on) and a
message naming the setting, so an operator knows what to raise.

The value and norm bounds keep the estimator's statistics far inside float64:
a row's Hessian contribution σσ‖g‖² stays below ~1e12 at the default norm
bound, where a gradient of 3e38 or a value of -1e308 would turn every later
estimate of the job into inf or NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

from gradmix.server.errors import InvalidArgumentError, LimitExceededError

#: At most this many characters of a caller's input are echoed in an error message.
ECHO_CHARS = 80


def echo(value: object) -> str:
    """`repr(value)`, cut to `ECHO_CHARS` characters (with the full length said)."""
    text = repr(value)
    if len(text) <= ECHO_CHARS:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[:ECHO_CHARS]}… ({size} characters)"


@dataclass(frozen=True, kw_only=True)
class Limits:
    """The server's bounds; see the README's configuration section."""

    max_value_abs: float = 1e4
    """Largest |f(x)| of a sketch row (values are clamped log-odds, a few tens at most)."""
    max_row_norm: float = 1e6
    """Largest Euclidean norm of a sketch row's projected gradient."""
    max_dim: int = 4096
    """Largest projection dim a job may have (server memory grows as tasks × dim²)."""
    max_rows_per_upload: int = 100_000
    """Most rows one UploadSketch call may carry."""
    max_tasks_per_job: int = 1000
    """Most tasks one job may have."""
    max_jobs: int = 1000
    """Most jobs one server (store) may hold."""
    max_name_length: int = 128
    """Longest job, task, anchor or writer name (the store allows at most 128)."""
    max_metadata_entries: int = 64
    """Most metadata entries of one task."""
    max_metadata_bytes: int = 16384
    """Largest total size (UTF-8 keys and values) of one task's metadata."""
    max_target_bytes: int = 4096
    """Longest target description (JobSpec.target, UTF-8)."""
    max_anchor_step_ahead: int = 100_000_000
    """An anchor's step may exceed the greatest step declared in its job by at most this."""
    max_query_cost: int = 10_000_000
    """Most subsets × tasks one EstimateSubsets or SelectTasks call may estimate (fast mode)."""
    max_exact_query_cost: int = 5_000
    """Most subsets × tasks one call may estimate in exact mode (each solves on the rows)."""
    query_workers: int = 2
    """Threads that run EstimateSubsets and SelectTasks (apart from everything else)."""
    max_queued_queries: int = 16
    """Most queries waiting for a query thread; more are refused (RESOURCE_EXHAUSTED)."""
    query_timeout_seconds: float = 60.0
    """Longest a query may run; a shorter client deadline applies when given."""
    default_page_size: int = 100
    """Items per page of a List call that asks for page_size 0."""
    max_page_size: int = 1000
    """Most items per page of a List call."""
    max_watchers: int = 10_000
    """Most WatchMixture streams open at once on this server, all jobs together; more
    are refused (RESOURCE_EXHAUSTED)."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise InvalidArgumentError(f"{field.name} must be > 0, got {value!r}")
        if self.max_name_length > 128:
            raise InvalidArgumentError(
                f"max_name_length must be <= 128 (the store's limit), got {self.max_name_length}")
        if self.default_page_size > self.max_page_size:
            raise InvalidArgumentError(
                f"default_page_size {self.default_page_size} exceeds max_page_size "
                f"{self.max_page_size}")

    # ------------------------------------------------------------ requests

    def check_name(self, name: str, kind: str) -> None:
        """Refuse a name longer than `max_name_length` (the store checks the characters)."""
        if len(name) > self.max_name_length:
            raise InvalidArgumentError(
                f"{kind} name {echo(name)} is longer than max_name_length "
                f"{self.max_name_length}")

    def check_dim(self, dim: int) -> None:
        if dim > self.max_dim:
            raise InvalidArgumentError(f"dim {dim} exceeds max_dim {self.max_dim}")

    def check_target(self, target: str) -> None:
        size = len(target.encode())
        if size > self.max_target_bytes:
            raise InvalidArgumentError(
                f"target {echo(target)} has {size} bytes, more than max_target_bytes "
                f"{self.max_target_bytes}")

    def check_metadata(self, metadata: Mapping[str, str]) -> None:
        if len(metadata) > self.max_metadata_entries:
            raise InvalidArgumentError(
                f"metadata has {len(metadata)} entries, more than max_metadata_entries "
                f"{self.max_metadata_entries}")
        size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
        if size > self.max_metadata_bytes:
            raise InvalidArgumentError(
                f"metadata has {size} bytes, more than max_metadata_bytes "
                f"{self.max_metadata_bytes}")

    def check_anchor_step(self, step: int, greatest: int) -> None:
        """`step` against the greatest step declared so far in the job (0 if none)."""
        if step > greatest + self.max_anchor_step_ahead:
            raise InvalidArgumentError(
                f"anchor step {step} is more than max_anchor_step_ahead "
                f"{self.max_anchor_step_ahead} past the job's greatest step {greatest}")

    # -------------------------------------------------------------- counts

    def check_new_job(self, jobs: int) -> None:
        """Refuse a job beyond `max_jobs` (`jobs`: how many exist)."""
        if jobs >= self.max_jobs:
            raise LimitExceededError(
                f"the server holds {jobs} jobs, its max_jobs; delete one or raise the limit")

    def check_new_task(self, job: str, tasks: int) -> None:
        if tasks >= self.max_tasks_per_job:
            raise LimitExceededError(
                f"job {job!r} has {tasks} tasks, its max_tasks_per_job")

    def check_upload_rows(self, rows: int) -> None:
        if rows > self.max_rows_per_upload:
            raise LimitExceededError(
                f"this upload carries more than max_rows_per_upload {self.max_rows_per_upload} "
                "rows: split it into several UploadSketch calls")

    def check_query_cost(self, subsets: int, tasks: int, mode: str) -> None:
        """Refuse a query that would estimate more than the mode's cost bound."""
        bound, setting = ((self.max_exact_query_cost, "max_exact_query_cost") if mode == "exact"
                          else (self.max_query_cost, "max_query_cost"))
        cost = subsets * max(tasks, 1)
        if cost > bound:
            raise LimitExceededError(
                f"this query would estimate {subsets} subsets × {tasks} tasks = {cost}, more "
                f"than {setting} {bound}: ask for fewer subsets per call")

    def check_new_watcher(self, open_streams: int) -> None:
        """Refuse a watch stream beyond `max_watchers` (`open_streams`: how many are open)."""
        if open_streams >= self.max_watchers:
            raise LimitExceededError(
                f"the server has {open_streams} WatchMixture streams open, its max_watchers: "
                "close one, watch from fewer processes, or raise the limit")

    def page_size(self, requested: int) -> int:
        """The page size a List call gets: 0 = the default; at most `max_page_size`."""
        return min(requested or self.default_page_size, self.max_page_size)
