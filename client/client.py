"""`SelectionClient`: the typed, synchronous client of the v1 selection API.

Every RPC is a method taking and returning the dataclasses of
`gradmix.client.types`. Every call carries a deadline. Calls that are safe to
repeat (reads, and the idempotent registrations) are retried with exponential
backoff and full jitter on UNAVAILABLE and DEADLINE_EXCEEDED; every failure
surfaces as a `gradmix.client.errors.GradmixError` carrying the status code.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from gradmix.client import convert
from gradmix.client.errors import InvalidArgument, from_rpc_error
from gradmix.client.retry import RETRYABLE_CODES, RetryPolicy
from gradmix.client.types import (
    Anchor,
    EstimateResult,
    Horizon,
    Job,
    JobEvent,
    JobSpec,
    Mixture,
    PolicySettings,
    Selection,
    ServerInfo,
    SketchSpec,
    Task,
)
from gradmix.client.watch import MixtureWatch
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.proto.v1 import selection_pb2_grpc as pb_grpc

DEFAULT_SERVER = "127.0.0.1:50551"
#: Reconnect promptly after a server restart (grpc's own default waits up to 120 s).
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
_UPLOAD_CHUNK_BYTES = 1 << 20


class SelectionClient:
    """Client of one gradmix selection server.

    Args:
        target: "host:port" of the server.
        timeout: Deadline of each call attempt, in seconds.
        tls: Use TLS (server certificate checked against `root_certificates`,
            or the system roots if None).
        root_certificates: PEM bytes of the CA to trust.
        certificate_chain: PEM bytes of this client's certificate, for a server
            that asks for one (mutual TLS); needs `private_key` and `tls`.
        private_key: PEM bytes of the key of `certificate_chain`.
        token: A bearer token, sent as `authorization: Bearer <token>`.
        actor: Who makes the lifecycle changes this client asks for (sent as
            `x-gradmix-actor`; the server records it in the job's event log).
        retry: The retry policy of safe calls.
        options: Extra grpc channel options (name, value).
    """

    def __init__(
        self,
        target: str = DEFAULT_SERVER,
        *,
        timeout: float = 10.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        token: str | None = None,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] = (),
        actor: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise InvalidArgument(f"timeout must be > 0; got {timeout}")
        if (root_certificates or certificate_chain or private_key) and not tls:
            raise InvalidArgument("root_certificates, certificate_chain and private_key need "
                                  "tls=True")
        if (certificate_chain is None) != (private_key is None):
            raise InvalidArgument("certificate_chain and private_key go together")
        self.target, self.timeout = target, timeout
        self.retry = retry or RetryPolicy()
        self._metadata: tuple[tuple[str, str], ...] = ()
        channel_options = [*_CHANNEL_OPTIONS, *options]
        if tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
            if token:
                creds = grpc.composite_channel_credentials(
                    creds, grpc.access_token_call_credentials(token)
                )
            self._channel = grpc.secure_channel(target, creds, options=channel_options)
        else:
            # grpc refuses call credentials on an insecure channel: send the
            # same header as metadata on every call.
            if token:
                self._metadata = (("authorization", f"Bearer {token}"),)
            self._channel = grpc.insecure_channel(target, options=channel_options)
        if actor:
            self._metadata += (("x-gradmix-actor", actor),)
        self._stub = pb_grpc.SelectionServiceStub(self._channel)
        self._watches: list[MixtureWatch] = []
        self._closed = False

    # ------------------------------------------------------------ plumbing

    def _call(self, method: str, request: Any, *, safe: bool = True) -> Any:
        """Call an RPC with a deadline; retry it if `safe`.

        `request` is a message, or (for a client stream) a function returning
        a fresh iterator of messages, called once per attempt.
        """
        if self._closed:
            raise InvalidArgument("the client is closed")
        rpc = getattr(self._stub, method)
        attempts = self.retry.max_attempts if safe else 1
        for attempt in range(attempts):
            try:
                message = request() if callable(request) else request
                return rpc(message, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as error:
                if attempt + 1 >= attempts or error.code() not in RETRYABLE_CODES:
                    raise from_rpc_error(error) from error
            time.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ jobs

    def create_job(
        self,
        name: str,
        *,
        sketch: SketchSpec,
        policy: PolicySettings | None = None,
        target: str = "",
    ) -> Job:
        """Create a job, or return it if it exists with the same spec.

        Raises:
            AlreadyExists: The job exists with another spec (the message names the field).
            InvalidArgument: A bad name or spec.
        """
        spec = JobSpec(sketch=sketch, policy=policy or PolicySettings(), target=target)
        request = pb.CreateJobRequest(name=name, spec=convert.job_spec_to_pb(spec))
        return convert.job_from_pb(self._call("CreateJob", request))

    def get_job(self, name: str) -> Job:
        """The job `name` (NotFound if none)."""
        return convert.job_from_pb(self._call("GetJob", pb.GetJobRequest(name=name)))

    def list_jobs(self, *, include_archived: bool = False) -> list[Job]:
        """Every job the server serves; with `include_archived`, archived ones too
        (their `archived_at` set)."""
        request = pb.ListJobsRequest(include_archived=include_archived)
        return [convert.job_from_pb(j) for j in self._pages("ListJobs", request, "jobs")]

    def report_task_failure(self, job: str, task: str, reason: str) -> Task:
        """Report that a task's data cannot be loaded: it leaves the mixture (state
        "failed", weight 0) until the failure is cleared with an empty `reason`.

        Raises:
            NotFound: no such job or task.
        """
        request = pb.ReportTaskFailureRequest(job=job, task=task, reason=reason)
        return convert.task_from_pb(self._call("ReportTaskFailure", request))

    def server_info(self) -> ServerInfo:
        """Where the server keeps its state (its store's identity and URL)."""
        msg = self._call("GetServerInfo", pb.GetServerInfoRequest())
        return ServerInfo(store_identity=msg.store_identity, store_url=msg.store_url)

    # ------------------------------------------------------------ tasks and anchors

    def register_task(self, job: str, name: str, metadata: Mapping[str, str] | None = None) -> Task:
        """Register a task (idempotent; AlreadyExists if its metadata differs)."""
        request = pb.RegisterTaskRequest(
            job=job, name=name, metadata=convert.metadata_to_pb(metadata)
        )
        return convert.task_from_pb(self._call("RegisterTask", request))

    def list_tasks(self, job: str) -> list[Task]:
        """The job's tasks, in registration order."""
        return [convert.task_from_pb(t)
                for t in self._pages("ListTasks", pb.ListTasksRequest(job=job), "tasks")]

    def declare_anchor(
        self, job: str, anchor: str, step: int, horizon: Horizon | None = None, run: str = "",
        untrained_loss: float = 0.0,
    ) -> Anchor:
        """Declare an anchor (idempotent; AlreadyExists if declared at another step or run).

        Args:
            horizon: How far training will move from it (learning rate, steps to
                the next anchor, optimizer, sketched parameters): the server sets
                the estimate's prior λ₀ from it. The first declaration's counts.
            run: The training run declaring it (a name, e.g. one per launch of a
                job, kept across resumes). The job's current anchor is the
                latest complete anchor of the run that started last.
            untrained_loss: The target loss of an untrained model, log(vocabulary
                size) for a token model (0: not given). An anchor whose target loss
                is near it was taken before the model learnt anything: the server
                holds its estimate back.
        """
        request = pb.DeclareAnchorRequest(job=job, anchor=anchor, step=step, run=run,
                                          untrained_loss=untrained_loss)
        if horizon is not None:
            request.horizon.CopyFrom(convert.horizon_to_pb(horizon))
        return convert.anchor_from_pb(self._call("DeclareAnchor", request))

    def complete_anchor(self, job: str, anchor: str) -> Anchor:
        """Mark an anchor complete: it becomes the job's current anchor."""
        request = pb.CompleteAnchorRequest(job=job, anchor=anchor)
        return convert.anchor_from_pb(self._call("CompleteAnchor", request))

    def list_anchors(self, job: str) -> list[Anchor]:
        """The job's anchors, in declaration order."""
        request = pb.ListAnchorsRequest(job=job)
        return [convert.anchor_from_pb(a) for a in self._pages("ListAnchors", request, "anchors")]

    # ------------------------------------------------------------ sketches

    def commit_sketch(
        self, job: str, anchor: str, task: str | None, writer: str, committed_rows: int
    ) -> int:
        """Tell the server a writer's rows are committed in the store.

        Args:
            task: The task, or None for the target.
            committed_rows: The writer's committed total (not a delta).

        Returns:
            The source's committed rows, all writers.
        """
        request = pb.CommitSketchRequest(
            source=convert.source_to_pb(job, anchor, task),
            writer=writer,
            committed_rows=committed_rows,
        )
        return int(self._call("CommitSketch", request).total_rows)

    def upload_sketch(
        self,
        job: str,
        anchor: str,
        task: str | None,
        writer: str,
        grads: np.ndarray,
        values: np.ndarray,
        example_ids: np.ndarray,
    ) -> int:
        """Send sketch rows over gRPC, for writers without store access.

        Rows go in chunks of about 1 MiB. The call is retried like the safe
        ones: the server ignores example ids it already has, so a repeat
        stores nothing twice (the count then excludes rows a lost attempt stored).

        Returns:
            Rows newly stored by this call.
        """
        rows = _sketch_rows(grads, values, example_ids)
        header = pb.UploadSketchRequest(
            header=pb.UploadSketchHeader(
                source=convert.source_to_pb(job, anchor, task), writer=writer
            )
        )

        def requests() -> Iterator[pb.UploadSketchRequest]:
            yield header
            for chunk in rows:
                yield pb.UploadSketchRequest(rows=chunk)

        return int(self._call("UploadSketch", requests).rows_written)

    # ------------------------------------------------------------ mixtures

    def get_mixture(self, job: str, version: int = 0) -> Mixture:
        """A mixture version of the job (0: the latest; NotFound if none yet)."""
        request = pb.GetMixtureRequest(job=job, version=version)
        return convert.mixture_from_pb(self._call("GetMixture", request))

    def list_mixtures(self, job: str, after_version: int = 0, limit: int = 0) -> list[Mixture]:
        """The job's mixture history after `after_version` (limit 0: all), oldest first."""
        request = pb.ListMixturesRequest(job=job, after_version=after_version, limit=limit)
        return [convert.mixture_from_pb(m)
                for m in self._pages("ListMixtures", request, "mixtures")]

    def _pages(self, method: str, request: Any, field: str) -> list[Any]:
        """Every item of a List call, page after page (the server's page size)."""
        items: list[Any] = []
        seen: set[str] = set()
        while True:
            response = self._call(method, request)
            items.extend(getattr(response, field))
            token = response.next_page_token
            if not token or token in seen:  # a repeated token would never end
                return items
            seen.add(token)
            request.page_token = token

    def watch(
        self, job: str, after_version: int = 0, *, give_up_after: float | None = None
    ) -> MixtureWatch:
        """Every mixture version after `after_version`, then each new one as published.

        The iterator reconnects on its own (with backoff) when the server
        restarts or the network drops, resuming after the last version it
        delivered: no version is skipped, none is delivered twice. `close()`
        (or closing the client) ends it.

        Args:
            give_up_after: Seconds of failed reconnects before raising
                `Unavailable` (None: retry until closed).

        Raises (while iterating):
            NotFound: No such job. Other non-transient errors likewise.
        """
        if self._closed:
            raise InvalidArgument("the client is closed")

        def open_stream(after: int) -> Any:
            request = pb.WatchMixtureRequest(job=job, after_version=after)
            return self._stub.WatchMixture(request, metadata=self._metadata)

        stream = MixtureWatch(open_stream, job, after_version, self.retry, give_up_after)
        self._watches = [w for w in self._watches if not w.closed] + [stream]
        return stream

    # ------------------------------------------------------------ estimates

    def estimate_subsets(
        self,
        job: str,
        subsets: Sequence[Sequence[str]],
        mode: str = "fast",
        *,
        weights: Sequence[Sequence[float]] | None = None,
        anchor: str = "",
    ) -> EstimateResult:
        """Estimated fine-tuning loss L̂(S) of each subset of tasks.

        Args:
            subsets: Task-name subsets; an empty one gives L̂(∅).
            mode: "fast" (one Newton step) or "exact".
            weights: Optional per-task weights, one list per subset.
            anchor: The anchor to estimate at ("" = the current one).
        """
        request = pb.EstimateSubsetsRequest(
            job=job,
            anchor=anchor,
            subsets=convert.subsets_to_pb(subsets, weights),
            mode=convert.mode_to_pb(mode),
        )
        return convert.estimate_from_pb(self._call("EstimateSubsets", request), subsets)

    def select_tasks(
        self,
        job: str,
        method: str = "threshold",
        threshold: float = 0.0,
        k: int = 0,
        mode: str = "fast",
        *,
        anchor: str = "",
    ) -> Selection:
        """A discrete task selection: score threshold, the k best, or forward stepwise."""
        if method == "top_k" and k < 1:
            raise InvalidArgument("method top_k needs k >= 1")
        request = pb.SelectTasksRequest(
            job=job,
            anchor=anchor,
            method=convert.method_to_pb(method),
            threshold=threshold,
            k=k,
            mode=convert.mode_to_pb(mode),
        )
        return convert.selection_from_pb(self._call("SelectTasks", request), method)

    # ------------------------------------------------------------ lifecycle

    def update_task(
        self,
        job: str,
        name: str,
        metadata: Mapping[str, str] | None = None,
        *,
        remove: Sequence[str] = (),
        retired: bool | None = None,
    ) -> Task:
        """Change a registered task: set `metadata` keys, drop the `remove` keys, retire
        (`retired=True`) or activate (`False`) it. Idempotent; NotFound for an unknown task.

        Raises:
            FailedPrecondition: Retiring the one task a pinned mixture weights.
        """
        request = pb.UpdateTaskRequest(
            job=job, name=name, metadata=convert.metadata_to_pb(metadata),
            remove_metadata=list(remove),
        )
        if retired is not None:
            request.retired = retired
        return convert.task_from_pb(self._call("UpdateTask", request))

    def retire_task(self, job: str, name: str) -> Task:
        """Retire a task: weight 0 from the next mixture version until activated again."""
        return self.update_task(job, name, retired=True)

    def activate_task(self, job: str, name: str) -> Task:
        """Bring a retired task back into the mixture from the next version."""
        return self.update_task(job, name, retired=False)

    def pin_mixture(self, job: str, weights: Mapping[str, float], reason: str = "") -> JobEvent:
        """Pin the job's mixture to `weights` (normalised; unnamed tasks get 0) from the
        next version on, until `unpin_mixture`. Re-estimates go on underneath.

        Raises:
            NotFound: A task that is not registered. InvalidArgument: Bad weights.
        """
        request = pb.PinMixtureRequest(job=job, weights=dict(weights), reason=reason)
        return convert.job_event_from_pb(self._call("PinMixture", request, safe=False))

    def unpin_mixture(self, job: str, reason: str = "") -> JobEvent:
        """Publish estimated weights again (FailedPrecondition if not pinned)."""
        request = pb.UnpinMixtureRequest(job=job, reason=reason)
        return convert.job_event_from_pb(self._call("UnpinMixture", request, safe=False))

    def delete_job(self, name: str, *, keep_data: bool = False, reason: str = "") -> JobEvent:
        """Stop serving a job: its store data removed, or kept in place (`keep_data`,
        archived). Watchers of the job get NotFound."""
        request = pb.DeleteJobRequest(name=name, keep_data=keep_data, reason=reason)
        return convert.job_event_from_pb(self._call("DeleteJob", request, safe=False))

    def archive_job(self, name: str, reason: str = "") -> JobEvent:
        """`delete_job(name, keep_data=True)`."""
        return self.delete_job(name, keep_data=True, reason=reason)

    def unarchive_job(self, name: str, reason: str = "") -> JobEvent:
        """Serve an archived job again, as its store data was left.

        Raises:
            FailedPrecondition: The job is not archived. NotFound: No such job.
        """
        request = pb.UnarchiveJobRequest(name=name, reason=reason)
        return convert.job_event_from_pb(self._call("UnarchiveJob", request, safe=False))

    def list_job_events(self, job: str, after_sequence: int = 0) -> list[JobEvent]:
        """The job's event log (who changed what, when) after `after_sequence`."""
        request = pb.ListJobEventsRequest(job=job, after_sequence=after_sequence)
        return [convert.job_event_from_pb(e) for e in self._call("ListJobEvents", request).events]

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        """End every watch and close the channel."""
        if self._closed:
            return
        self._closed = True
        for stream in self._watches:
            stream.close()
        self._channel.close()

    def __enter__(self) -> SelectionClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _sketch_rows(
    grads: np.ndarray, values: np.ndarray, example_ids: np.ndarray
) -> list[pb.SketchRows]:
    """Validate rows and split them into ~1 MiB SketchRows chunks."""
    g = np.asarray(grads)
    v = np.asarray(values, dtype=np.float64)
    ids = np.asarray(example_ids)
    if g.ndim != 2 or g.shape[0] == 0:
        raise InvalidArgument(f"grads must be a non-empty (n, dim) array; got shape {g.shape}")
    n, dim = g.shape
    if v.shape != (n,) or ids.shape != (n,):
        raise InvalidArgument(
            f"values and example_ids must have shape ({n},); got {v.shape} and {ids.shape}"
        )
    if not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgument(f"example_ids must be integers; got {ids.dtype}")
    g32 = np.ascontiguousarray(g, dtype="<f4")
    step = max(1, _UPLOAD_CHUNK_BYTES // (4 * dim))
    return [
        pb.SketchRows(
            dim=dim,
            grads=g32[i : i + step].tobytes(),
            values=v[i : i + step].tolist(),
            example_ids=ids[i : i + step].astype(np.int64).tolist(),
        )
        for i in range(0, n, step)
    ]
