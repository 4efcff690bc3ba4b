"""The v1 SelectionService on grpc.aio.

Handlers run on the event loop and stay cheap: blocking store I/O goes through
`asyncio.to_thread`, estimates run on worker threads, and re-estimation is only
requested here (debounced in `jobs`). Handlers raise domain errors; the
`instrumentation.RpcInstrumentation` is the one place they become status codes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.proto.v1 import selection_pb2_grpc as pb_grpc
from gradmix.server import convert
from gradmix.server.errors import InvalidArgumentError, NotFoundError, PreconditionError
from gradmix.server.jobs import JobRegistry, JobRuntime
from gradmix.server.jobstate import current_anchor
from gradmix.server.lifecycle import Lifecycle, actor_of
from gradmix.server.metrics import ServerMetrics
from gradmix.server.publisher import MixturePublisher
from gradmix.server.queries import QueryResult, estimate_subsets, select_tasks
from gradmix.server.rows import SourceRef, decode_rows, source_ref
from gradmix.store import AnchorInfo, SketchStore, validate_name
from grpc import aio


class SelectionServicer(pb_grpc.SelectionServiceServicer):
    """gradmix.v1.SelectionService backed by a JobRegistry."""

    def __init__(self, registry: JobRegistry, publisher: MixturePublisher,
                 metrics: ServerMetrics) -> None:
        self._registry = registry
        self._store: SketchStore = registry.store
        self._publisher = publisher
        self._metrics = metrics
        self._lifecycle = Lifecycle(registry)

    # ------------------------------------------------------------------ jobs

    async def _job(self, runtime: JobRuntime) -> pb.Job:
        anchors, tasks = await asyncio.to_thread(
            lambda: (self._store.list_anchors(runtime.name), self._store.list_tasks(runtime.name)))
        info = runtime.state.info
        policy, target = convert.settings_to_pb(info.settings)
        spec = pb.JobSpec(sketch=convert.spec_to_sketch(info.spec), policy=policy, target=target)
        return pb.Job(name=info.name, spec=spec, current_anchor=current_anchor(anchors),
                      mixture_version=self._publisher.latest_version(info.name),
                      task_count=len(tasks), created_at=convert.timestamp(info.created_at))

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
        jobs = [await self._job(runtime) for runtime in await self._registry.served()]
        return pb.ListJobsResponse(jobs=jobs)

    # ----------------------------------------------------------------- tasks

    def _task(self, runtime: JobRuntime, name: str, metadata: dict[str, str],
              registered_at: float, retired: bool = False) -> pb.Task:
        rows = runtime.state.task_rows.get(name, 0)
        state = pb.TASK_STATE_ACTIVE if rows else pb.TASK_STATE_PENDING
        state = pb.TASK_STATE_RETIRED if retired else state
        return pb.Task(job=runtime.name, name=name, metadata=metadata, state=state,
                       sketch_rows=rows, registered_at=convert.timestamp(registered_at))

    async def RegisterTask(self, request: pb.RegisterTaskRequest, context: aio.ServicerContext
                           ) -> pb.Task:
        runtime = await self._registry.get(request.job)
        info = await asyncio.to_thread(self._store.register_task, request.job, request.name,
                                       dict(request.metadata))
        runtime.request()
        return self._task(runtime, info.name, dict(info.metadata), info.registered_at,
                          bool(info.retired_at))

    async def ListTasks(self, request: pb.ListTasksRequest, context: aio.ServicerContext
                        ) -> pb.ListTasksResponse:
        runtime = await self._registry.get(request.job)
        infos = await asyncio.to_thread(self._store.list_tasks, request.job)
        return pb.ListTasksResponse(tasks=[
            self._task(runtime, t.name, dict(t.metadata), t.registered_at, bool(t.retired_at))
            for t in infos])

    # --------------------------------------------------------------- anchors

    async def _anchor(self, job: str, anchor: AnchorInfo) -> pb.Anchor:
        rows = await asyncio.to_thread(self._store.committed_rows, job, anchor.name, None)
        return convert.anchor_to_pb(job, anchor, rows)

    async def DeclareAnchor(self, request: pb.DeclareAnchorRequest,
                            context: aio.ServicerContext) -> pb.Anchor:
        await self._registry.get(request.job)
        info = await asyncio.to_thread(self._store.declare_anchor, request.job, request.anchor,
                                       int(request.step), convert.horizon_from_pb(request),
                                       request.run)
        return await self._anchor(request.job, info)

    async def CompleteAnchor(self, request: pb.CompleteAnchorRequest,
                             context: aio.ServicerContext) -> pb.Anchor:
        runtime = await self._registry.get(request.job)
        info = await asyncio.to_thread(self._store.complete_anchor, request.job, request.anchor)
        runtime.request(full=True)
        return await self._anchor(request.job, info)

    async def ListAnchors(self, request: pb.ListAnchorsRequest, context: aio.ServicerContext
                          ) -> pb.ListAnchorsResponse:
        await self._registry.get(request.job)
        infos = await asyncio.to_thread(self._store.list_anchors, request.job)
        return pb.ListAnchorsResponse(anchors=[await self._anchor(request.job, a) for a in infos])

    # -------------------------------------------------------------- sketches

    async def CommitSketch(self, request: pb.CommitSketchRequest, context: aio.ServicerContext
                           ) -> pb.CommitSketchResponse:
        committed_at = time.monotonic()
        ref = source_ref(request.source)
        runtime = await self._registry.get(ref.job)
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
        writer = await asyncio.to_thread(self._store.writer, ref.job, ref.anchor, ref.task,
                                         first.header.writer)
        dim = runtime.state.info.spec.dim
        written = 0
        try:
            async for message in request_iterator:
                if message.WhichOneof("payload") != "rows":
                    raise InvalidArgumentError(
                        "only the first UploadSketch message may be a header; send rows after it")
                rows = decode_rows(message.rows, dim)
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

    async def ListMixtures(self, request: pb.ListMixturesRequest, context: aio.ServicerContext
                           ) -> pb.ListMixturesResponse:
        await self._registry.get(request.job)
        mixtures = await self._publisher.history(request.job, request.after_version,
                                                 request.limit)
        return pb.ListMixturesResponse(mixtures=mixtures)

    # ------------------------------------------------------------- estimates

    async def _query(self, job: str, result: QueryResult) -> None:
        self._metrics.subsets_estimated.labels(job).inc(result.subsets_estimated)

    async def EstimateSubsets(self, request: pb.EstimateSubsetsRequest,
                              context: aio.ServicerContext) -> pb.EstimateSubsetsResponse:
        runtime = await self._registry.get(request.job)
        result = await asyncio.to_thread(estimate_subsets, runtime.state, request)
        await self._query(request.job, result)
        assert isinstance(result.response, pb.EstimateSubsetsResponse)
        return result.response

    async def SelectTasks(self, request: pb.SelectTasksRequest, context: aio.ServicerContext
                          ) -> pb.SelectTasksResponse:
        runtime = await self._registry.get(request.job)
        result = await asyncio.to_thread(select_tasks, runtime.state, request)
        await self._query(request.job, result)
        assert isinstance(result.response, pb.SelectTasksResponse)
        return result.response

    # ------------------------------------------------------------- lifecycle

    async def UpdateTask(self, request: pb.UpdateTaskRequest, context: aio.ServicerContext
                         ) -> pb.Task:
        info = await self._lifecycle.update_task(request, actor_of(context))
        runtime = await self._registry.get(request.job)
        return self._task(runtime, info.name, dict(info.metadata), info.registered_at,
                          bool(info.retired_at))

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

    async def ListJobEvents(self, request: pb.ListJobEventsRequest,
                            context: aio.ServicerContext) -> pb.ListJobEventsResponse:
        events = await self._lifecycle.events(request.job, request.after_sequence)
        return pb.ListJobEventsResponse(events=[convert.event_to_pb(request.job, e)
                                                for e in events])
