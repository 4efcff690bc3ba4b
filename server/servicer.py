"""The v1 SelectionService on grpc.aio.

Handlers run on the event loop and stay cheap: blocking store I/O goes through
`asyncio.to_thread`, queries run on their own bounded pool (`queries.QueryPool`),
and re-estimation is only requested here (debounced in `jobs`). Every request
is held to the server's limits (`limits.Limits`) before it reaches the store.
Handlers raise domain errors; the `instrumentation.RpcInstrumentation` is the
one place they become status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.proto.v1 import selection_pb2_grpc as pb_grpc
from gradmix.server import convert
from gradmix.server.errors import (
    InvalidArgumentError,
    NotFoundError,
    PreconditionError,
    ShuttingDownError,
)
from gradmix.server.jobs import JobRegistry, JobRuntime
from gradmix.server.jobstate import current_anchor
from gradmix.server.lifecycle import Lifecycle, actor_of
from gradmix.server.limits import Limits
from gradmix.server.metrics import ServerMetrics
from gradmix.server.paging import decode_token, encode_token, page
from gradmix.server.publisher import MixturePublisher
from gradmix.server.queries import QueryResult, estimate_subsets, select_tasks
from gradmix.server.rows import SourceRef, decode_rows, source_ref
from gradmix.store import AnchorInfo, JobInfo, SketchStore, TaskInfo, validate_name
from gradmix.store import NotFoundError as StoreNotFoundError
from grpc import aio


class SelectionServicer(pb_grpc.SelectionServiceServicer):
    """gradmix.v1.SelectionService backed by a JobRegistry."""

    def __init__(self, registry: JobRegistry, publisher: MixturePublisher,
                 metrics: ServerMetrics) -> None:
        self._registry = registry
        self._store: SketchStore = registry.store
        self._publisher = publisher
        self._metrics = metrics
        self._limits: Limits = registry.limits
        self._lifecycle = Lifecycle(registry)

    def _names(self, ref: SourceRef | None = None, **names: str) -> None:
        """Refuse over-long names (by kind) before the store sees (and echoes) them."""
        if ref is not None:
            names = {"anchor": ref.anchor, "task": ref.task or "", **names}
        for kind, name in names.items():
            self._limits.check_name(name, kind)

    # ------------------------------------------------------------------ jobs

    async def _job(self, runtime: JobRuntime) -> pb.Job:
        anchors, tasks = await asyncio.to_thread(
            lambda: (self._store.list_anchors(runtime.name), self._store.list_tasks(runtime.name)))
        info = runtime.state.info
        policy, target = convert.settings_to_pb(info.settings)
        spec = pb.JobSpec(sketch=convert.spec_to_sketch(info.spec), policy=policy, target=target)
        return pb.Job(name=info.name, spec=spec, current_anchor=current_anchor(anchors),
                      mixture_version=self._publisher.latest_version(info.name),
                      task_count=len(tasks), created_at=convert.timestamp(info.created_at),
                      estimation_error=runtime.estimation_error)

    async def CreateJob(self, request: pb.CreateJobRequest, context: aio.ServicerContext
                        ) -> pb.Job:
        spec = convert.sketch_to_spec(request.spec.sketch)
        policy = convert.requested_policy(request.spec.policy)
        runtime = await self._registry.create(request.name, spec, policy, request.spec.target)
        return await self._job(runtime)

    async def GetJob(self, request: pb.GetJobRequest, context: aio.ServicerContext) -> pb.Job:
        return await self._job(await self._registry.get(request.name))

    async def ListJobs(self, request: pb.ListJobsRequest, context: aio.ServicerContext
                       ) -> pb.ListJobsResponse:
        infos = await asyncio.to_thread(self._store.list_jobs)
        chosen = page(infos, lambda i: [i.name], request.page_token,
                      self._limits.page_size(request.page_size))
        jobs = []
        for info in chosen.items:  # only this page's jobs are loaded
            with contextlib.suppress(StoreNotFoundError):  # archived, or deleted meanwhile
                archived = await asyncio.to_thread(self._archived_at, info.name)
                if not archived:
                    jobs.append(await self._job(await self._registry.get(info.name)))
                elif request.include_archived:
                    jobs.append(await asyncio.to_thread(self._archived_job, info, archived))
        return pb.ListJobsResponse(jobs=jobs, next_page_token=chosen.next_token)

    def _archived_at(self, job: str) -> float:
        return self._store.job_control(job).archived_at

    def _archived_job(self, info: JobInfo, archived_at: float) -> pb.Job:
        """An archived job as the store keeps it (it is not served: no runtime)."""
        policy, target = convert.settings_to_pb(info.settings)
        spec = pb.JobSpec(sketch=convert.spec_to_sketch(info.spec), policy=policy, target=target)
        return pb.Job(name=info.name, spec=spec,
                      current_anchor=current_anchor(self._store.list_anchors(info.name)),
                      mixture_version=self._store.last_mixture_version(info.name),
                      task_count=len(self._store.list_tasks(info.name)),
                      created_at=convert.timestamp(info.created_at),
                      archived_at=convert.timestamp(archived_at))

    # ----------------------------------------------------------------- tasks

    def _task(self, runtime: JobRuntime, name: str, metadata: dict[str, str],
              registered_at: float, failure: str = "", retired: bool = False) -> pb.Task:
        rows = runtime.state.task_rows.get(name, 0)
        state = pb.TASK_STATE_ACTIVE if rows else pb.TASK_STATE_PENDING
        if failure:
            state = pb.TASK_STATE_FAILED
        if retired:
            state = pb.TASK_STATE_RETIRED
        return pb.Task(job=runtime.name, name=name, metadata=metadata, state=state,
                       sketch_rows=rows, registered_at=convert.timestamp(registered_at),
                       failure=failure)

    async def RegisterTask(self, request: pb.RegisterTaskRequest, context: aio.ServicerContext
                           ) -> pb.Task:
        runtime = await self._registry.get(request.job)
        self._names(task=request.name)
        metadata = dict(request.metadata)
        self._limits.check_metadata(metadata)
        info = await asyncio.to_thread(self._register_task, request.job, request.name, metadata)
        runtime.request()
        return self._task(runtime, info.name, dict(info.metadata), info.registered_at,
                          info.failure, bool(info.retired_at))

    def _register_task(self, job: str, name: str, metadata: dict[str, str]) -> TaskInfo:
        """Register (idempotent by name), refusing a new task past `max_tasks_per_job`."""
        names = {t.name for t in self._store.list_tasks(job)}
        if name not in names:
            self._limits.check_new_task(job, len(names))
        return self._store.register_task(job, name, metadata)

    async def ListTasks(self, request: pb.ListTasksRequest, context: aio.ServicerContext
                        ) -> pb.ListTasksResponse:
        runtime = await self._registry.get(request.job)
        infos = await asyncio.to_thread(self._store.list_tasks, request.job)
        chosen = page(infos, lambda t: [t.registered_at, t.name], request.page_token,
                      self._limits.page_size(request.page_size))
        return pb.ListTasksResponse(tasks=[
            self._task(runtime, t.name, dict(t.metadata), t.registered_at, t.failure,
                       bool(t.retired_at))
            for t in chosen.items], next_page_token=chosen.next_token)

    async def ReportTaskFailure(self, request: pb.ReportTaskFailureRequest,
                                context: aio.ServicerContext) -> pb.Task:
        runtime = await self._registry.get(request.job)
        info = await asyncio.to_thread(self._store.set_task_failure, request.job, request.task,
                                       " ".join(request.reason.split())[:1000])
        runtime.request(full=True)
        return self._task(runtime, info.name, dict(info.metadata), info.registered_at,
                          info.failure, bool(info.retired_at))

    # --------------------------------------------------------------- anchors

    async def _anchor(self, job: str, anchor: AnchorInfo) -> pb.Anchor:
        rows = await asyncio.to_thread(self._store.committed_rows, job, anchor.name, None)
        return convert.anchor_to_pb(job, anchor, rows)

    async def DeclareAnchor(self, request: pb.DeclareAnchorRequest,
                            context: aio.ServicerContext) -> pb.Anchor:
        runtime = await self._registry.get(request.job)
        self._names(anchor=request.anchor)
        info = await asyncio.to_thread(self._declare_anchor, request)
        runtime.request()  # the open-anchor metrics follow the next re-estimate
        return await self._anchor(request.job, info)

    def _declare_anchor(self, request: pb.DeclareAnchorRequest) -> AnchorInfo:
        """Declare, refusing a new anchor's step far past the job's greatest step."""
        anchors = self._store.list_anchors(request.job)
        if all(a.name != request.anchor for a in anchors):
            self._limits.check_anchor_step(int(request.step),
                                           max((a.step for a in anchors), default=0))
        return self._store.declare_anchor(request.job, request.anchor, int(request.step),
                                          convert.horizon_from_pb(request), request.run,
                                          request.untrained_loss)

    async def CompleteAnchor(self, request: pb.CompleteAnchorRequest,
                             context: aio.ServicerContext) -> pb.Anchor:
        runtime = await self._registry.get(request.job)
        self._names(anchor=request.anchor)
        info = await asyncio.to_thread(self._store.complete_anchor, request.job, request.anchor)
        runtime.request(full=True)
        return await self._anchor(request.job, info)

    async def ListAnchors(self, request: pb.ListAnchorsRequest, context: aio.ServicerContext
                          ) -> pb.ListAnchorsResponse:
        await self._registry.get(request.job)
        infos = await asyncio.to_thread(self._store.list_anchors, request.job)
        chosen = page(infos, lambda a: [a.declared_at, a.name], request.page_token,
                      self._limits.page_size(request.page_size))
        return pb.ListAnchorsResponse(
            anchors=[await self._anchor(request.job, a) for a in chosen.items],
            next_page_token=chosen.next_token)

    # -------------------------------------------------------------- sketches

    async def CommitSketch(self, request: pb.CommitSketchRequest, context: aio.ServicerContext
                           ) -> pb.CommitSketchResponse:
        committed_at = time.monotonic()
        ref = source_ref(request.source)
        runtime = await self._registry.get(ref.job)
        self._names(ref, writer=request.writer)
        validate_name(request.writer, "writer")
        have = await asyncio.to_thread(self._store.committed_rows, ref.job, ref.anchor,
                                       ref.task, request.writer)
        if have < request.committed_rows:
            raise PreconditionError(
                f"the store holds {have} committed rows of writer {request.writer!r} for "
                f"{ref.describe()}, fewer than the {request.committed_rows} this commit "
                "claims: append the rows to the store (RowWriter.append) before committing")
        return pb.CommitSketchResponse(total_rows=await self._committed(runtime, ref, committed_at))

    async def _committed(self, runtime: JobRuntime, ref: SourceRef, committed_at: float) -> int:
        """Count and schedule the rows just committed; the source's total."""
        runtime.request(anchor=ref.anchor, source=ref.task, committed_at=committed_at)
        total = await asyncio.to_thread(self._store.committed_rows, ref.job, ref.anchor,
                                        ref.task)
        runtime.count_committed(ref.anchor, ref.task, total)
        return total

    async def UploadSketch(self, request_iterator: AsyncIterator[pb.UploadSketchRequest],
                           context: aio.ServicerContext) -> pb.UploadSketchResponse:
        committed_at = time.monotonic()
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgumentError("the first UploadSketch message must be the header")
        ref = source_ref(first.header.source)
        runtime = await self._registry.get(ref.job)
        self._names(ref, writer=first.header.writer)
        writer = await asyncio.to_thread(self._store.writer, ref.job, ref.anchor, ref.task,
                                         first.header.writer)
        dim = runtime.state.info.spec.dim
        written = received = 0
        try:
            async for message in request_iterator:
                if message.WhichOneof("payload") != "rows":
                    raise InvalidArgumentError(
                        "only the first UploadSketch message may be a header; send rows after it")
                self._limits.check_upload_rows(received + len(message.rows.values))
                rows = decode_rows(message.rows, dim, self._limits)
                received += len(rows.values)
                result = await asyncio.to_thread(writer.append, rows.grads, rows.values,
                                                 rows.example_ids)
                written += result.written
        finally:
            if written:  # rows already stored stay stored, even if a later chunk failed
                total = await self._committed(runtime, ref, committed_at)
        if not written:
            total = await asyncio.to_thread(self._store.committed_rows, ref.job, ref.anchor,
                                            ref.task)
        return pb.UploadSketchResponse(rows_written=written, total_rows=total)

    # -------------------------------------------------------------- mixtures

    async def GetMixture(self, request: pb.GetMixtureRequest, context: aio.ServicerContext
                         ) -> pb.Mixture:
        if request.version == 0:  # the hot path: no await beyond the job lookup
            latest = self._publisher.latest(request.job)
            if latest is not None:
                return latest
        await self._registry.get(request.job)
        mixture = await self._publisher.get(request.job, request.version)
        if mixture is not None:
            return mixture
        latest_version = self._publisher.latest_version(request.job)
        if request.version == 0:
            raise NotFoundError(f"job {request.job!r} has no mixture yet: register a task")
        raise NotFoundError(f"job {request.job!r} has no mixture version {request.version} "
                            f"(latest is {latest_version}; 0 asks for the latest)")

    async def WatchMixture(self, request: pb.WatchMixtureRequest, context: aio.ServicerContext
                           ) -> AsyncIterator[pb.Mixture]:
        await self._registry.get(request.job)
        async for mixture in self._publisher.watch(request.job, request.after_version):
            yield mixture
        # The feed ends only when the server stops: UNAVAILABLE tells clients to reconnect.
        raise ShuttingDownError("the server is shutting down: reconnect and watch again")

    async def ListMixtures(self, request: pb.ListMixturesRequest, context: aio.ServicerContext
                           ) -> pb.ListMixturesResponse:
        await self._registry.get(request.job)
        state = decode_token(request.page_token)
        after, sent = state.get("version", 0), state.get("sent", 0)
        if not (isinstance(after, int) and isinstance(sent, int)):
            raise InvalidArgumentError("page_token is not a ListMixtures page token")
        size = self._limits.page_size(request.page_size)
        if request.limit:
            size = min(size, request.limit - sent)
        if size <= 0:
            return pb.ListMixturesResponse()
        found = await self._publisher.history(request.job, max(request.after_version, after),
                                              size + 1)
        mixtures = _fitting(found[:size], self._page_bytes())
        more = len(found) > len(mixtures) and (
            not request.limit or sent + len(mixtures) < request.limit)
        token = encode_token({"version": mixtures[-1].version, "sent": sent + len(mixtures)}) \
            if more else ""
        return pb.ListMixturesResponse(mixtures=mixtures, next_page_token=token)

    def _page_bytes(self) -> int:
        """Bytes a page of mixtures may take: half the largest message, for headroom."""
        return self._registry.max_message_bytes // 2

    # ------------------------------------------------------------- estimates

    async def _query(self, job: str, result: QueryResult) -> None:
        self._metrics.subsets_estimated.labels(job).inc(result.subsets_estimated)

    async def EstimateSubsets(self, request: pb.EstimateSubsetsRequest,
                              context: aio.ServicerContext) -> pb.EstimateSubsetsResponse:
        runtime = await self._registry.get(request.job)
        result = await self._registry.queries.run(estimate_subsets, runtime.state, request,
                                                  context.time_remaining())
        await self._query(request.job, result)
        assert isinstance(result.response, pb.EstimateSubsetsResponse)
        return result.response

    async def SelectTasks(self, request: pb.SelectTasksRequest, context: aio.ServicerContext
                          ) -> pb.SelectTasksResponse:
        runtime = await self._registry.get(request.job)
        result = await self._registry.queries.run(select_tasks, runtime.state, request,
                                                  context.time_remaining())
        await self._query(request.job, result)
        assert isinstance(result.response, pb.SelectTasksResponse)
        return result.response

    # ---------------------------------------------------------------- server

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: aio.ServicerContext) -> pb.ServerInfo:
        return pb.ServerInfo(store_identity=self._store.identity, store_url=self._store.url)


    # ------------------------------------------------------------- lifecycle

    async def UpdateTask(self, request: pb.UpdateTaskRequest, context: aio.ServicerContext
                         ) -> pb.Task:
        info = await self._lifecycle.update_task(request, actor_of(context))
        runtime = await self._registry.get(request.job)
        return self._task(runtime, info.name, dict(info.metadata), info.registered_at,
                          info.failure, bool(info.retired_at))

    async def PinMixture(self, request: pb.PinMixtureRequest, context: aio.ServicerContext
                         ) -> pb.JobEvent:
        event = await self._lifecycle.pin(request, actor_of(context))
        return convert.event_to_pb(request.job, event)

    async def UnpinMixture(self, request: pb.UnpinMixtureRequest, context: aio.ServicerContext
                           ) -> pb.JobEvent:
        event = await self._lifecycle.unpin(request, actor_of(context))
        return convert.event_to_pb(request.job, event)

    async def DeleteJob(self, request: pb.DeleteJobRequest, context: aio.ServicerContext
                        ) -> pb.JobEvent:
        event = await self._lifecycle.delete_job(request, actor_of(context))
        return convert.event_to_pb(request.name, event)

    async def UnarchiveJob(self, request: pb.UnarchiveJobRequest, context: aio.ServicerContext
                           ) -> pb.JobEvent:
        event = await self._lifecycle.unarchive_job(request, actor_of(context))
        return convert.event_to_pb(request.name, event)

    async def ListJobEvents(self, request: pb.ListJobEventsRequest,
                            context: aio.ServicerContext) -> pb.ListJobEventsResponse:
        events = await self._lifecycle.events(request.job, request.after_sequence)
        return pb.ListJobEventsResponse(events=[convert.event_to_pb(request.job, e)
                                                for e in events])


def _fitting(mixtures: list[pb.Mixture], budget: int) -> list[pb.Mixture]:
    """The leading mixtures whose encoded sizes sum to at most `budget` (at least one)."""
    total = 0
    for i, mixture in enumerate(mixtures):
        total += mixture.ByteSize()
        if total > budget and i > 0:
            return mixtures[:i]
    return mixtures
