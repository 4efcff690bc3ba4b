"""SketchStore: jobs, tasks, anchors, sketch rows and mixture history in one Zarr v3 root.

The layout is in :mod:`gradmix.store.layout`; the commit protocol of rows in
:mod:`gradmix.store.writer`. Registry objects (jobs, tasks, anchors, mixture
versions) are group documents created first-writer-wins, so re-declaring one
is idempotent and a different value is a :class:`SpecMismatchError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
import weakref
from collections.abc import Collection, Mapping
from typing import Any

from gradmix.store import layout
from gradmix.store.backend import StoreBackend, open_backend
from gradmix.store.documents import GroupDocs
from gradmix.store.errors import (
    InvalidSpecError,
    RecordNotFoundError,
    SpecMismatchError,
    StoreStateError,
)
from gradmix.store.names import NAME_PATTERN, validate_name
from gradmix.store.reader import (
    ArrayCache,
    SourceIndex,
    committed_count,
    read_new_rows,
    writer_counts,
)
from gradmix.store.records import (
    AnchorInfo,
    Horizon,
    JobControl,
    JobEvent,
    JobInfo,
    MixtureRecord,
    ReadCursor,
    Rows,
    TaskInfo,
)
from gradmix.store.writer import RowWriter
from gradmix.vocabulary.sketch_spec import SketchSpec

_LIVE_WRITERS: weakref.WeakValueDictionary[tuple[str, str], RowWriter] = (
    weakref.WeakValueDictionary()
)
"""The RowWriters alive in this process, by (store location, writer path)."""
_LIVE_WRITERS_LOCK = threading.Lock()
#: Tries to take the next event number when other processes append at once.
_EVENT_ATTEMPTS = 100


class SketchStore:
    """The sketch store of gradmix (a local directory or any fsspec URL).

    Processes share a store through its URL. One instance may be shared by
    threads for registry calls and reads; a :class:`RowWriter` belongs to one
    thread, and a writer id to one process at a time.

    With ``cache_task_documents`` (the server's store), :meth:`list_tasks` reads
    each task's document once and keeps it: it still lists the tasks folder on
    every call, so a task registered by another process appears, and every
    write through this instance (register, failure, update, job deletion)
    replaces or drops what it keeps. A change another process makes to a task
    already read (its failure, metadata, retirement) is not seen until a
    restart: only for the process that is the one writer of the task
    documents, as the server is (tasks change only by its RPCs).
    """

    def __init__(self, backend: StoreBackend, url: str = "", *,
                 cache_task_documents: bool = False) -> None:
        """A store on ``backend`` (see :meth:`open` to open one by URL)."""
        self.url = url or backend.identity()
        self.backend = backend
        self._docs = GroupDocs(backend)
        self._arrays = ArrayCache(backend)
        self._jobs: dict[str, JobInfo] = {}
        self._indexes: dict[str, SourceIndex] = {}
        self._mixtures: dict[str, dict[int, MixtureRecord]] = {}
        self._lock = threading.Lock()  # guards the incremental id indexes
        self._cache_tasks = cache_task_documents
        self._tasks: dict[str, dict[str, TaskInfo]] = {}  # per job, by task name
        self._task_writes = 0  # writes of task documents through this instance
        self._tasks_lock = threading.Lock()  # guards the two above
        #: Held around each read-modify-write of a task document, so that changes made
        #: at once through this instance (failure reports, updates) all land.
        self._task_update_lock = threading.Lock()
        self._docs.ensure("")
        self._docs.ensure(layout.jobs_dir())

    @property
    def identity(self) -> str:
        """Where this store's data lives (`StoreBackend.identity`)."""
        return self.backend.identity()

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any] | None = None, *,
             cache_task_documents: bool = False) -> SketchStore:
        """Open (creating if needed) the store at a local path or fsspec URL.

        Args:
            url: a local path (the default, embedded) or an fsspec URL such as
                ``memory://name`` or ``s3://bucket/prefix`` (``gradmix[s3]`` extra).
            storage_options: fsspec filesystem options for URLs (credentials,
                endpoint); see :func:`gradmix.store.backend.open_backend`.
            cache_task_documents: keep the task documents read (see the class
                docstring: only for the one writer of the task documents).
        """
        return cls(open_backend(url, storage_options), url,
                   cache_task_documents=cache_task_documents)

    # --- jobs -----------------------------------------------------------------

    def create_job(
        self, job: str, spec: SketchSpec, settings: Mapping[str, Any] | None = None
    ) -> JobInfo:
        """Create a job, or return it if it exists with the same spec and settings.

        ``settings=None`` on an existing job accepts the stored settings.

        Raises:
            SpecMismatchError: the job exists with a different spec field or setting.
            InvalidSpecError: settings are not a JSON-serialisable dict.
        """
        validate_name(job, "job")
        if not isinstance(spec, SketchSpec):
            raise InvalidSpecError(f"spec must be a SketchSpec, got {type(spec).__name__}")
        wanted = _json_settings(settings)
        doc = {"spec": spec.to_document(), "settings": wanted or {}, "created_at": time.time()}
        info = _job_info(job, self._docs.create(layout.job_dir(job), doc))
        for name, stored in info.spec.to_document().items():
            if stored != getattr(spec, name):
                raise SpecMismatchError(name, stored, getattr(spec, name), what=f"job {job}")
        if wanted is not None and wanted != info.settings:
            key = _first_difference(info.settings, wanted)
            raise SpecMismatchError(
                f"settings.{key}", info.settings.get(key), wanted.get(key), what=f"job {job}"
            )
        for path in (layout.tasks_dir(job), layout.anchors_dir(job), layout.mixtures_dir(job)):
            self._docs.ensure(path)
        self._jobs[job] = info
        self._forget_tasks(job)
        return info

    def get_job(self, job: str) -> JobInfo:
        """The job's record. Raises RecordNotFoundError."""
        validate_name(job, "job")
        if job not in self._jobs:
            attrs = self._docs.read(layout.job_dir(job))
            if attrs is None:
                raise RecordNotFoundError(f"job {job!r} not found")
            self._jobs[job] = _job_info(job, attrs)
        return self._jobs[job]

    def list_jobs(self) -> list[JobInfo]:
        """Every job, by name."""
        names = sorted(n for n in self._docs.children(layout.jobs_dir()) if NAME_PATTERN.match(n))
        return [self.get_job(n) for n in names if self._docs.read(layout.job_dir(n))]

    # --- tasks ----------------------------------------------------------------

    def register_task(
        self, job: str, task: str, metadata: Mapping[str, str] | None = None
    ) -> TaskInfo:
        """Register a task; idempotent. Different non-empty metadata is a SpecMismatchError."""
        self.get_job(job)
        validate_name(task, "task")
        meta = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise InvalidSpecError("task metadata must map strings to strings")
        doc = {"metadata": meta, "registered_at": time.time()}
        info = _task_info(task, self._docs.create(layout.task_dir(job, task), doc))
        self._kept_task(job, info)
        if meta and meta != info.metadata:
            key = _first_difference(info.metadata, meta)
            raise SpecMismatchError(
                f"metadata.{key}", info.metadata.get(key), meta.get(key), what=f"task {task}"
            )
        return info

    def set_task_failure(self, job: str, task: str, reason: str) -> TaskInfo:
        """Record why a task's data cannot be loaded ("" clears it); the task must exist."""
        self.get_job(job)
        validate_name(task, "task")
        with self._task_update_lock:
            attrs = self._docs.read(layout.task_dir(job, task))
            if attrs is None:
                raise RecordNotFoundError(f"task {task!r} is not registered with job {job!r}")
            self._docs.write(layout.task_dir(job, task), {**attrs, "failure": str(reason)})
            return self._kept_task(job, _task_info(task, {**attrs, "failure": str(reason)}))

    def list_tasks(self, job: str) -> list[TaskInfo]:
        """The job's tasks in registration order."""
        self.get_job(job)
        names = self._docs.children(layout.tasks_dir(job))
        with self._tasks_lock:
            kept = dict(self._tasks.get(job, {}))
            writes = self._task_writes
        read: dict[str, TaskInfo] = {}
        for name in names:
            if name not in kept:
                attrs = self._docs.read(layout.task_dir(job, name))
                if attrs is not None:
                    read[name] = _task_info(name, attrs)
        if self._cache_tasks and read:
            with self._tasks_lock:
                if self._task_writes == writes:  # else a read may predate a write: keep none
                    self._tasks.setdefault(job, {}).update(read)
        infos = [kept.get(name) or read[name] for name in names if name in kept or name in read]
        return sorted(infos, key=lambda t: (t.registered_at, t.name))

    def _kept_task(self, job: str, info: TaskInfo) -> TaskInfo:
        """Keep `info`, just written through this instance, for `list_tasks`."""
        with self._tasks_lock:
            self._task_writes += 1
            if self._cache_tasks:
                self._tasks.setdefault(job, {})[info.name] = info
        return info

    def _forget_tasks(self, job: str) -> None:
        """Drop the task documents kept of `job` (it was created or deleted)."""
        with self._tasks_lock:
            self._task_writes += 1
            self._tasks.pop(job, None)

    def _require_task(self, job: str, task: str | None) -> None:
        if task is None:
            return
        validate_name(task, "task")
        if self._docs.read(layout.task_dir(job, task)) is None:
            raise RecordNotFoundError(f"task {task!r} is not registered in job {job!r}")

    # --- anchors --------------------------------------------------------------

    def declare_anchor(
        self, job: str, anchor: str, step: int, horizon: Horizon | None = None, run: str = "",
        untrained_loss: float = 0.0,
    ) -> AnchorInfo:
        """Declare an anchor at a training step; idempotent. Another step is a SpecMismatchError.

        `horizon` (optional) is kept with the anchor; the first declaration
        fixes it, a repeated declaration's horizon is ignored. `run` (optional,
        a name) is the training run declaring it; another run re-declaring the
        anchor is a SpecMismatchError. `untrained_loss` (optional, 0: not
        given) is kept like the horizon.
        """
        self.get_job(job)
        validate_name(anchor, "anchor")
        if run:
            validate_name(run, "run")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidSpecError(f"anchor step must be a non-negative integer, got {step!r}")
        if horizon is not None and not isinstance(horizon, Horizon):
            raise InvalidSpecError(f"horizon must be a Horizon, got {type(horizon).__name__}")
        if (isinstance(untrained_loss, bool) or not isinstance(untrained_loss, int | float)
                or not math.isfinite(untrained_loss) or untrained_loss < 0):
            raise InvalidSpecError(
                f"untrained_loss must be finite and >= 0 (0: not given), got {untrained_loss!r}")
        doc: dict[str, Any] = {"step": step, "state": "open", "declared_at": time.time()}
        if horizon is not None:
            doc["horizon"] = horizon.to_dict()
        if run:
            doc["run"] = run
        if untrained_loss:
            doc["untrained_loss"] = float(untrained_loss)
        info = _anchor_info(anchor, self._docs.create(layout.anchor_dir(job, anchor), doc))
        if info.step != step:
            raise SpecMismatchError("step", info.step, step, what=f"anchor {anchor}")
        if info.run != run:
            raise SpecMismatchError("run", info.run, run, what=f"anchor {anchor}")
        return info

    def complete_anchor(self, job: str, anchor: str) -> AnchorInfo:
        """Mark an anchor complete; idempotent. Raises RecordNotFoundError."""
        info = self._anchor(job, anchor)
        if info.state == "complete":
            return info
        done = dataclasses.replace(info, state="complete")
        doc: dict[str, Any] = {"step": done.step, "state": done.state,
                               "declared_at": done.declared_at}
        if done.horizon is not None:
            doc["horizon"] = done.horizon.to_dict()
        if done.run:
            doc["run"] = done.run
        if done.untrained_loss:
            doc["untrained_loss"] = done.untrained_loss
        self._docs.write(layout.anchor_dir(job, anchor), doc)
        return done

    def list_anchors(self, job: str) -> list[AnchorInfo]:
        """The job's anchors in declaration order."""
        self.get_job(job)
        infos = []
        for name in self._docs.children(layout.anchors_dir(job)):
            attrs = self._docs.read(layout.anchor_dir(job, name))
            if attrs is not None:
                infos.append(_anchor_info(name, attrs))
        return sorted(infos, key=lambda a: (a.declared_at, a.name))

    def _anchor(self, job: str, anchor: str) -> AnchorInfo:
        self.get_job(job)
        validate_name(anchor, "anchor")
        attrs = self._docs.read(layout.anchor_dir(job, anchor))
        if attrs is None:
            raise RecordNotFoundError(f"anchor {anchor!r} is not declared in job {job!r}")
        return _anchor_info(anchor, attrs)

    # --- rows -----------------------------------------------------------------

    def writer(self, job: str, anchor: str, task: str | None, writer: str) -> RowWriter:
        """A writer for one source (task, or the target when None) at an anchor.

        One writer id must be used by one process at a time (it owns its arrays).
        Within a process the same live writer is returned for the same id (while
        anyone holds it), so concurrent appends through it are serialised.
        Raises RecordNotFoundError if the job, anchor or task is unknown.
        """
        spec = self.get_job(job).spec
        self._anchor(job, anchor)
        self._require_task(job, task)
        validate_name(writer, "writer")
        writers_path = layout.writers_dir(job, anchor, task)
        key = (self.backend.identity(), f"{writers_path}/{writer}")
        with _LIVE_WRITERS_LOCK:
            live = _LIVE_WRITERS.get(key)
            if live is None:
                live = RowWriter(self._docs, writers_path, writer, spec)
                _LIVE_WRITERS[key] = live
            return live

    def committed_rows(
        self, job: str, anchor: str, task: str | None, writer: str | None = None
    ) -> int:
        """Committed rows of one writer, or (writer None) distinct example ids of the source."""
        self._anchor(job, anchor)
        self._require_task(job, task)
        path = layout.writers_dir(job, anchor, task)
        if writer is not None:
            validate_name(writer, "writer")
            return committed_count(self._docs, f"{path}/{writer}")
        with self._lock:
            index = self._indexes.setdefault(path, SourceIndex(self._docs, self._arrays, path))
            index.refresh()
            return int(index.ids.shape[0])

    def read_rows(
        self, job: str, anchor: str, task: str | None, cursor: ReadCursor | None = None,
        *, until: ReadCursor | None = None,
    ) -> tuple[Rows, ReadCursor]:
        """Committed rows after ``cursor`` (all when None), never repeating an example id.

        With ``until`` (a cursor this source returned earlier), only rows up to
        where it stood: reading from None until a cursor gives back the rows
        its lineage returned (the same example ids), e.g. to read again rows
        a reader dropped from memory.
        """
        spec = self.get_job(job).spec
        self._anchor(job, anchor)
        self._require_task(job, task)
        source = (job, anchor, task)
        if cursor is None:
            cursor = ReadCursor(source)
        elif not isinstance(cursor, ReadCursor):
            raise StoreStateError(f"not a ReadCursor: {type(cursor).__name__}")
        cursor.check_source(source)
        if until is not None:
            until.check_source(source)
        path = layout.writers_dir(job, anchor, task)
        return read_new_rows(self._docs, self._arrays, path, cursor, spec.dim, until=until)

    def sources(self, job: str, anchor: str) -> list[str]:
        """Tasks with at least one committed row at the anchor, in registration order."""
        self._anchor(job, anchor)
        present = set(self._docs.children(layout.anchor_tasks_dir(job, anchor)))
        return [
            t.name
            for t in self.list_tasks(job)
            if t.name in present
            and writer_counts(self._docs, layout.writers_dir(job, anchor, t.name))
        ]

    # --- mixtures -------------------------------------------------------------

    def append_mixture(self, job: str, record: MixtureRecord) -> None:
        """Append a mixture version; it must exceed the last one (else StoreStateError).

        A version is its document, created in one step (see
        :meth:`StoreBackend.create`): a writer killed half-way leaves at most
        a version folder without a document, which no reader sees and which
        does not count as the last version, so the next append of that
        number completes it and versions stay consecutive.
        """
        self.get_job(job)
        if not isinstance(record, MixtureRecord):
            raise InvalidSpecError(f"record must be a MixtureRecord, got {type(record).__name__}")
        last = self._last_version(job)
        if record.version <= last:
            raise StoreStateError(
                f"mixture version {record.version} of job {job!r} does not exceed {last}"
            )
        doc = record.to_dict()
        if self._docs.create(layout.mixture_dir(job, record.version), doc) != doc:
            raise StoreStateError(f"mixture version {record.version} of job {job!r} exists")
        self._mixtures.setdefault(job, {})[record.version] = record

    def read_mixtures(self, job: str, after_version: int = 0) -> list[MixtureRecord]:
        """Mixture versions above ``after_version``, ascending (written ones only)."""
        self.get_job(job)
        cache = self._mixtures.setdefault(job, {})
        out = []
        for version in sorted(v for v in self._mixture_versions(job) if v > after_version):
            if version not in cache:
                attrs = self._docs.read(layout.mixture_dir(job, version))
                if attrs is None:  # a version whose write never finished
                    continue
                cache[version] = MixtureRecord.from_dict(attrs)
            out.append(cache[version])
        return out

    def last_mixture_version(self, job: str) -> int:
        """The job's latest mixture version (0: none), without reading the history."""
        self.get_job(job)
        return self._last_version(job)

    def _last_version(self, job: str) -> int:
        """The highest version that has its document (0: none)."""
        cache = self._mixtures.get(job, {})
        for version in sorted(self._mixture_versions(job), reverse=True):
            if version in cache or self._docs.read(layout.mixture_dir(job, version)) is not None:
                return version
        return 0

    def _mixture_versions(self, job: str) -> list[int]:
        """Version numbers that have a folder or key (written or not)."""
        return [int(n) for n in self._docs.children(layout.mixtures_dir(job)) if n.isdigit()]

    # --- lifecycle (operator changes; `gradmix.server.lifecycle`) ---------------

    def update_task(
        self,
        job: str,
        task: str,
        *,
        metadata: Mapping[str, str] | None = None,
        remove: Collection[str] = (),
        retired: bool | None = None,
    ) -> TaskInfo:
        """Change a registered task: set the `metadata` keys, drop the `remove` keys,
        retire it (`retired` True) or activate it again (False; None: unchanged).

        Raises:
            RecordNotFoundError: no such job or task.
            InvalidSpecError: metadata that is not strings.
        """
        self.get_job(job)
        path = layout.task_dir(job, task)
        with self._task_update_lock:
            self._require_task(job, task)
            info = _task_info(task, self._docs.read(path) or {})
            meta = {**info.metadata, **dict(metadata or {})}
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
                raise InvalidSpecError("task metadata must map strings to strings")
            for key in remove:
                meta.pop(key, None)
            retired_at = info.retired_at if retired is None else (
                (info.retired_at or time.time()) if retired else 0.0)
            doc: dict[str, Any] = {"metadata": meta, "registered_at": info.registered_at}
            if info.failure:
                doc["failure"] = info.failure
            if retired_at:
                doc["retired_at"] = retired_at
            self._docs.write(path, doc)
            return self._kept_task(job, _task_info(task, doc))

    def job_control(self, job: str) -> JobControl:
        """The job's operator state (its pin, whether it is archived)."""
        self.get_job(job)
        return JobControl.from_dict(self._docs.read(layout.control_dir(job)) or {})

    def set_job_control(self, job: str, control: JobControl) -> None:
        """Replace the job's operator state."""
        self.get_job(job)
        self._docs.write(layout.control_dir(job), control.to_dict())

    def append_event(
        self, job: str, *, actor: str, action: str, task: str = "",
        details: Mapping[str, str] | None = None,
    ) -> JobEvent:
        """Append an event to the job's log with the next sequence number."""
        self.get_job(job)
        for _ in range(_EVENT_ATTEMPTS):  # another process may take a number first
            names = self._docs.children(layout.events_dir(job))
            sequence = max((int(n) for n in names if n.isdigit()), default=0) + 1
            event = JobEvent(sequence=sequence, created_at=time.time(), actor=actor,
                             action=action, task=task, details=dict(details or {}))
            doc = event.to_dict()
            if self._docs.create(layout.event_dir(job, sequence), doc) == doc:
                return event
        raise StoreStateError(f"no free event number in job {job!r} after "
                              f"{_EVENT_ATTEMPTS} attempts")

    def list_events(self, job: str, after_sequence: int = 0) -> list[JobEvent]:
        """The job's events after `after_sequence`, ascending."""
        self.get_job(job)
        names = self._docs.children(layout.events_dir(job))
        events = []
        for sequence in sorted(int(n) for n in names if n.isdigit()):
            if sequence > after_sequence:
                attrs = self._docs.read(layout.event_dir(job, sequence))
                if attrs is not None:
                    events.append(JobEvent.from_dict(attrs))
        return events

    def delete_job(self, job: str) -> None:
        """Remove the job and everything stored under it (rows, history, events).

        Raises RecordNotFoundError. Writers of the job must have stopped: rows appended
        while it is deleted may be left behind, unreachable (no job lists them).
        """
        self.get_job(job)
        prefix = layout.job_dir(job)
        self._docs.delete_tree(prefix)
        self._forget_tasks(job)
        with self._lock:
            self._jobs.pop(job, None)
            self._mixtures.pop(job, None)
            for path in [p for p in self._indexes if p.startswith(prefix + "/")]:
                del self._indexes[path]
            self._arrays.forget(prefix + "/")


def _json_settings(settings: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if settings is None:
        return None
    if not isinstance(settings, Mapping):
        raise InvalidSpecError(f"settings must be a mapping, got {type(settings).__name__}")
    try:
        # A JSON round trip: what comes back from the store compares equal to it.
        loaded: dict[str, Any] = json.loads(json.dumps(dict(settings), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidSpecError(f"settings must be JSON-serialisable: {exc}") from exc
    return loaded


def _first_difference(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key, math.nan) != wanted.get(key, math.nan) or (key in stored) != (
            key in wanted
        ):
            return key
    return ""


def _job_info(job: str, attrs: dict[str, Any]) -> JobInfo:
    spec = SketchSpec.from_document(attrs["spec"])
    return JobInfo(job, spec, dict(attrs.get("settings", {})), float(attrs["created_at"]))


def _task_info(task: str, attrs: dict[str, Any]) -> TaskInfo:
    return TaskInfo(task, dict(attrs.get("metadata", {})), float(attrs["registered_at"]),
                    str(attrs.get("failure", "")), float(attrs.get("retired_at", 0.0)))


def _anchor_info(anchor: str, attrs: dict[str, Any]) -> AnchorInfo:
    horizon = attrs.get("horizon")
    return AnchorInfo(anchor, int(attrs["step"]), str(attrs["state"]), float(attrs["declared_at"]),
                      Horizon.from_dict(horizon) if horizon else None, str(attrs.get("run", "")),
                      float(attrs.get("untrained_loss", 0.0)))
