"""Property-based fuzzing (hypothesis) of every RPC on a real server.

Each RPC gets requests drawn from case classes, each with the one status code
it must get: unknown jobs (NOT_FOUND), names that are not names (INVALID_ARGUMENT),
values past the server's limits, malformed raw bytes (INVALID_ARGUMENT), and so
on. Requests that must succeed are drawn only where they change nothing. After
every case the server must not have crashed or answered UNKNOWN/INTERNAL, and at
the end of each RPC's run the committed rows, tasks, anchors and mixture history
of the job under attack are exactly what they were before.

The default suite runs `GRADMIX_FUZZ_EXAMPLES` (10) cases per RPC; `make fuzz`
runs 1000 per RPC.
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server.rows import encode_rows
from gradmix.store.names import NAME_PATTERN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import (
    DIM,
    Harness,
    commit_via_store,
    create_job,
    random_rows,
    source,
    start,
    wait_for,
)

Code = grpc.StatusCode
EXAMPLES = int(os.environ.get("GRADMIX_FUZZ_EXAMPLES", "10"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=EXAMPLES <= 10,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PREFIX = "/gradmix.v1.SelectionService/"
MAX_STEP_AHEAD = 1000
JOB, ANCHOR, OPEN_ANCHOR = "job", "a1", "a0"
REQUESTS = {
    "CreateJob": pb.CreateJobRequest, "GetJob": pb.GetJobRequest,
    "ListJobs": pb.ListJobsRequest, "RegisterTask": pb.RegisterTaskRequest,
    "ListTasks": pb.ListTasksRequest, "DeclareAnchor": pb.DeclareAnchorRequest,
    "CompleteAnchor": pb.CompleteAnchorRequest, "ListAnchors": pb.ListAnchorsRequest,
    "CommitSketch": pb.CommitSketchRequest, "UploadSketch": pb.UploadSketchRequest,
    "GetMixture": pb.GetMixtureRequest, "WatchMixture": pb.WatchMixtureRequest,
    "ListMixtures": pb.ListMixturesRequest, "EstimateSubsets": pb.EstimateSubsetsRequest,
    "SelectTasks": pb.SelectTasksRequest, "ReportTaskFailure": pb.ReportTaskFailureRequest,
    "GetServerInfo": pb.GetServerInfoRequest, "UpdateTask": pb.UpdateTaskRequest,
    "PinMixture": pb.PinMixtureRequest, "UnpinMixture": pb.UnpinMixtureRequest,
    "DeleteJob": pb.DeleteJobRequest, "ListJobEvents": pb.ListJobEventsRequest,
    "UnarchiveJob": pb.UnarchiveJobRequest,
}


@dataclass
class Case:
    """One request and the code it must get."""

    kind: str
    call: Callable[[Harness], Any]
    code: grpc.StatusCode

    def __repr__(self) -> str:
        return f"Case({self.kind}, expects {self.code.name})"


# ---------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """Job "job": tasks t1, t2; anchor a0 open (step 5), a1 complete (step 10) with
    target and t1 rows; its mixture published. Limits small enough to reach."""
    path: Path = tmp_path_factory.mktemp("fuzz") / "store"
    h = start(path, max_anchor_step_ahead=MAX_STEP_AHEAD, max_rows_per_upload=50,
              max_dim=256, max_exact_query_cost=200)
    create_job(h.stub, name=JOB, subset_count=16)
    for task in ("t1", "t2"):
        h.stub.RegisterTask(pb.RegisterTaskRequest(job=JOB, name=task))
    h.stub.DeclareAnchor(pb.DeclareAnchorRequest(job=JOB, anchor=OPEN_ANCHOR, step=5))
    h.stub.DeclareAnchor(pb.DeclareAnchorRequest(job=JOB, anchor=ANCHOR, step=10))
    commit_via_store(h, JOB, ANCHOR, None, random_rows(16, seed=1))
    commit_via_store(h, JOB, ANCHOR, "t1", random_rows(16, seed=2))
    h.stub.CompleteAnchor(pb.CompleteAnchorRequest(job=JOB, anchor=ANCHOR))
    wait_for(lambda: h.stub.GetMixture(pb.GetMixtureRequest(job=JOB)),
             lambda m: m.anchor == ANCHOR, "the job's mixture at a1")
    yield h
    h.close()


def snapshot(h: Harness) -> dict[str, Any]:
    """What the job under attack holds in the store: nothing fuzzed may change it."""
    store = h.store
    return {
        "tasks": [(t.name, dict(t.metadata)) for t in store.list_tasks(JOB)],
        "anchors": [(a.name, a.step, a.state) for a in store.list_anchors(JOB)],
        "rows": {src: store.committed_rows(JOB, ANCHOR, src) for src in (None, "t1", "t2")},
        "open_rows": store.committed_rows(JOB, OPEN_ANCHOR, None),
        "mixtures": [r.to_dict() for r in store.read_mixtures(JOB)],
        "jobs": [j.name for j in store.list_jobs()],
    }


def check(h: Harness, case: Case) -> None:
    try:
        case.call(h)
    except grpc.RpcError as error:
        code = error.code()
        assert code not in (Code.UNKNOWN, Code.INTERNAL), f"{case}: {error.details()}"
        assert code == case.code, f"{case}: got {code.name}: {error.details()}"
        assert len(error.details() or "") <= 1100, f"{case}: an overlong message"
    else:
        assert case.code == Code.OK, f"{case}: got OK"


def fuzz_rpc(h: Harness, data: st.DataObject, cases: st.SearchStrategy[Case]) -> None:
    check(h, data.draw(cases))


@pytest.fixture(scope="module", autouse=True)
def untouched(server: Harness) -> Iterator[None]:
    before = snapshot(server)
    yield
    assert snapshot(server) == before
    server.stub.GetJob(pb.GetJobRequest(name=JOB), timeout=10)  # still serving


# ---------------------------------------------------------------- strategies

#: Names the store accepts that no job, task or anchor here has.
unknown_names = st.from_regex(r"zz[a-z0-9_-]{0,20}", fullmatch=True)
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
#: Strings that are not names: bad characters, "..", or longer than 128.
bad_names = st.one_of(
    _text.filter(lambda s: not NAME_PATTERN.fullmatch(s)),
    st.from_regex(r"[a-z]{1,5}\.\.[a-z]{0,5}", fullmatch=True),
    st.integers(129, 5000).map(lambda n: "n" * n),
)
#: Page tokens that cannot be ours: '!' is outside the URL-safe base64 alphabet.
bad_tokens = st.text(string.ascii_letters + "!", min_size=1, max_size=30).map(lambda s: s + "!")
big = st.integers(0, 2**32 - 1)


@st.composite
def raw_bytes(draw: st.DrawFn, method: str) -> Case:
    """Bytes that do not parse as the method's request (a message that does parse gets a
    tag varint that never ends appended)."""
    data = draw(st.binary(max_size=64))
    try:
        REQUESTS[method].FromString(data)
    except DecodeError:
        pass
    else:
        data += b"\x80"

    def call(h: Harness) -> Any:
        if method == "UploadSketch":
            return h.channel.stream_unary(PREFIX + method)(iter([data]), timeout=10)
        if method == "WatchMixture":
            return next(iter(h.channel.unary_stream(PREFIX + method)(data, timeout=10)))
        return h.channel.unary_unary(PREFIX + method)(data, timeout=10)

    return Case("raw bytes", call, Code.INVALID_ARGUMENT)


def unary(method: str, request: Any) -> Callable[[Harness], Any]:
    return lambda h: getattr(h.stub, method)(request, timeout=30)


def job_cases(method: str, build: Callable[[str], Any]) -> st.SearchStrategy[Case]:
    """An unknown job (NOT_FOUND) and a job name that is not a name (INVALID_ARGUMENT)."""
    return st.one_of(
        unknown_names.map(lambda n: Case("unknown job", unary(method, build(n)),
                                         Code.NOT_FOUND)),
        bad_names.map(lambda n: Case("bad job name", unary(method, build(n)),
                                     Code.INVALID_ARGUMENT)),
        raw_bytes(method),
    )


def rows_message(n: int, dim: int, values: list[float], scale: float) -> pb.SketchRows:
    grads = np.full((n, dim), np.float32(scale), dtype=np.float32)
    return encode_rows(grads, np.asarray(values[:n] + [0.5] * (n - len(values[:n]))),
                       np.arange(10_000, 10_000 + n))


# ---------------------------------------------------------------- one test per RPC


@FUZZ
@given(data=st.data())
def test_fuzz_create_job(server: Harness, data: st.DataObject) -> None:
    def request(name: str, dim: int = DIM, **policy: Any) -> pb.CreateJobRequest:
        return pb.CreateJobRequest(name=name, spec=pb.JobSpec(
            sketch=pb.SketchSpec(dim=dim, seed=7), policy=pb.PolicySettings(**policy),
            target="val.jsonl"))

    bad_policy = st.one_of(
        st.floats(0.26, 1e300).map(lambda v: {"floor": v}),
        st.floats(5e-324, 9e-4).map(lambda v: {"temperature": v}),
        st.floats(1001, 1e308).map(lambda v: {"temperature": v}),
        st.floats(5e-324, 9e-9).map(lambda v: {"regularization": v}),
        st.floats(1.1e8, 1e308).map(lambda v: {"regularization": v}),
        st.sampled_from([float("nan"), float("inf"), -1.0]).map(lambda v: {"prior_weight": v}),
        st.integers(20_001, 2**32 - 1).map(lambda v: {"subset_count": v}),
        st.floats(1.0, 1e9).map(lambda v: {"subset_fraction": v}),
        st.integers(6, 1000).map(lambda v: {"policy": v}),
    )
    cases = st.one_of(
        bad_names.map(lambda n: Case("bad name", unary("CreateJob", request(n)),
                                     Code.INVALID_ARGUMENT)),
        bad_policy.map(lambda p: Case(f"bad policy {p}", unary("CreateJob", request(
            "zz-new", **p)), Code.INVALID_ARGUMENT)),
        st.integers(257, 2**32 - 1).map(lambda d: Case("dim past max_dim", unary(
            "CreateJob", request("zz-new", dim=d)), Code.INVALID_ARGUMENT)),
        st.integers(1, 256).filter(lambda d: d != DIM).map(lambda d: Case(
            "existing job, other dim", unary("CreateJob", request(JOB, dim=d)),
            Code.ALREADY_EXISTS)),
        st.just(Case("existing job, same spec", unary("CreateJob", request(JOB)), Code.OK)),
        raw_bytes("CreateJob"),
    )
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_get_job(server: Harness, data: st.DataObject) -> None:
    cases = st.one_of(job_cases("GetJob", lambda n: pb.GetJobRequest(name=n)),
                      st.just(Case("the job", unary("GetJob", pb.GetJobRequest(name=JOB)),
                                   Code.OK)))
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_list_jobs(server: Harness, data: st.DataObject) -> None:
    cases = st.one_of(
        big.map(lambda s: Case("any page size", unary("ListJobs", pb.ListJobsRequest(
            page_size=s)), Code.OK)),
        bad_tokens.map(lambda t: Case("bad token", unary("ListJobs", pb.ListJobsRequest(
            page_token=t)), Code.INVALID_ARGUMENT)),
        raw_bytes("ListJobs"))
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_register_task(server: Harness, data: st.DataObject) -> None:
    def request(job: str, name: str = "t1", **metadata: str) -> pb.RegisterTaskRequest:
        return pb.RegisterTaskRequest(job=job, name=name, metadata=metadata)

    cases = st.one_of(
        job_cases("RegisterTask", lambda n: request(n)),
        bad_names.map(lambda n: Case("bad task name", unary("RegisterTask", request(JOB, n)),
                                     Code.INVALID_ARGUMENT)),
        st.integers(16385, 100_000).map(lambda n: Case(
            "metadata past max_metadata_bytes",
            unary("RegisterTask", request(JOB, "zz-t", uri="x" * n)), Code.INVALID_ARGUMENT)),
        st.text(min_size=1, max_size=20).map(lambda v: Case(
            "existing task, other metadata",
            unary("RegisterTask", request(JOB, "t1", uri=v)), Code.ALREADY_EXISTS)),
        st.just(Case("existing task", unary("RegisterTask", request(JOB, "t2")), Code.OK)),
    )
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_list_tasks(server: Harness, data: st.DataObject) -> None:
    cases = st.one_of(
        job_cases("ListTasks", lambda n: pb.ListTasksRequest(job=n)),
        big.map(lambda s: Case("any page size", unary("ListTasks", pb.ListTasksRequest(
            job=JOB, page_size=s)), Code.OK)),
        bad_tokens.map(lambda t: Case("bad token", unary("ListTasks", pb.ListTasksRequest(
            job=JOB, page_token=t)), Code.INVALID_ARGUMENT)))
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_declare_anchor(server: Harness, data: st.DataObject) -> None:
    def request(job: str, anchor: str = "zz-a", step: int = 1) -> pb.DeclareAnchorRequest:
        return pb.DeclareAnchorRequest(job=job, anchor=anchor, step=step)

    cases = st.one_of(
        job_cases("DeclareAnchor", lambda n: request(n)),
        bad_names.map(lambda n: Case("bad anchor name", unary("DeclareAnchor", request(JOB, n)),
                                     Code.INVALID_ARGUMENT)),
        st.integers(10 + MAX_STEP_AHEAD + 1, 2**64 - 1).map(lambda s: Case(
            "step far ahead", unary("DeclareAnchor", request(JOB, "zz-a", s)),
            Code.INVALID_ARGUMENT)),
        st.integers(0, 2**64 - 1).filter(lambda s: s != 10).map(lambda s: Case(
            "existing anchor, other step", unary("DeclareAnchor", request(JOB, ANCHOR, s)),
            Code.ALREADY_EXISTS)),
        st.just(Case("existing anchor", unary("DeclareAnchor", request(JOB, ANCHOR, 10)),
                     Code.OK)),
        st.builds(lambda lr, steps: Case(
            "bad horizon", unary("DeclareAnchor", pb.DeclareAnchorRequest(
                job=JOB, anchor="zz-h", step=1, horizon=pb.Horizon(
                    learning_rate=lr, steps=steps, optimizer="adamw", parameters=10))),
            Code.INVALID_ARGUMENT),
            st.sampled_from([0.0, -1.0, float("nan"), float("inf")]), st.integers(0, 5)),
        st.one_of(st.floats(max_value=-1e-300), st.sampled_from([math.nan, math.inf])).map(
            lambda u: Case("bad untrained loss", unary("DeclareAnchor", pb.DeclareAnchorRequest(
                job=JOB, anchor="zz-u", step=1, untrained_loss=u)), Code.INVALID_ARGUMENT)),
    )
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_complete_anchor(server: Harness, data: st.DataObject) -> None:
    def request(job: str, anchor: str = ANCHOR) -> pb.CompleteAnchorRequest:
        return pb.CompleteAnchorRequest(job=job, anchor=anchor)

    cases = st.one_of(
        job_cases("CompleteAnchor", lambda n: request(n)),
        unknown_names.map(lambda n: Case("unknown anchor", unary(
            "CompleteAnchor", request(JOB, n)), Code.NOT_FOUND)),
        bad_names.map(lambda n: Case("bad anchor name", unary(
            "CompleteAnchor", request(JOB, n)), Code.INVALID_ARGUMENT)),
    )
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_list_anchors(server: Harness, data: st.DataObject) -> None:
    cases = st.one_of(
        job_cases("ListAnchors", lambda n: pb.ListAnchorsRequest(job=n)),
        big.map(lambda s: Case("any page size", unary("ListAnchors", pb.ListAnchorsRequest(
            job=JOB, page_size=s)), Code.OK)),
        bad_tokens.map(lambda t: Case("bad token", unary(
            "ListAnchors", pb.ListAnchorsRequest(job=JOB, page_token=t)),
            Code.INVALID_ARGUMENT)))
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_commit_sketch(server: Harness, data: st.DataObject) -> None:
    def request(job: str, task: str | None = "t1", writer: str = "w0", rows: int = 1,
                anchor: str = ANCHOR) -> pb.CommitSketchRequest:
        return pb.CommitSketchRequest(source=source(job, anchor, task), writer=writer,
                                      committed_rows=rows)

    cases = st.one_of(
        job_cases("CommitSketch", lambda n: request(n)),
        bad_names.map(lambda n: Case("bad writer", unary("CommitSketch", request(
            JOB, writer=n)), Code.INVALID_ARGUMENT)),
        unknown_names.map(lambda n: Case("unknown task", unary("CommitSketch", request(
            JOB, task=n)), Code.NOT_FOUND)),
        st.integers(17, 2**64 - 1).map(lambda r: Case(
            "more rows than stored", unary("CommitSketch", request(JOB, rows=r)),
            Code.FAILED_PRECONDITION)),
        st.just(Case("no source", unary("CommitSketch", pb.CommitSketchRequest(
            source=pb.SketchSource(job=JOB, anchor=ANCHOR), writer="w0")),
            Code.INVALID_ARGUMENT)),
    )
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_upload_sketch(server: Harness, data: st.DataObject) -> None:
    def upload(job: str, *chunks: pb.SketchRows, task: str | None = "t1",
               anchor: str = ANCHOR) -> Callable[[Harness], Any]:
        header = pb.UploadSketchRequest(header=pb.UploadSketchHeader(
            source=source(job, anchor, task), writer="fuzz"))
        messages = [header, *(pb.UploadSketchRequest(rows=c) for c in chunks)]
        return lambda h: h.stub.UploadSketch(iter(messages), timeout=30)

    values = st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=4)
    extreme = st.one_of(
        st.builds(lambda n, v: rows_message(n, DIM, [v], 0.1), st.integers(1, 4),
                  st.floats(1e4 * 1.01, 1e308) | st.floats(-1e308, -1e4 * 1.01)),
        st.builds(lambda n, s: rows_message(n, DIM, [], s), st.integers(1, 4),
                  st.floats(3e5, 3e38)),
    )
    nonfinite = st.builds(lambda n, v: rows_message(n, DIM, [v], 0.1), st.integers(1, 4),
                          st.sampled_from([float("nan"), float("inf"), -float("inf")]))

    def cut(message: pb.SketchRows, drop: int) -> pb.SketchRows:
        message.grads = message.grads[:-drop]
        return message

    cases = st.one_of(
        raw_bytes("UploadSketch"),
        unknown_names.map(lambda n: Case("unknown job", upload(n, rows_message(
            1, DIM, [], 0.1)), Code.NOT_FOUND)),
        bad_names.map(lambda n: Case("bad job name", upload(n), Code.INVALID_ARGUMENT)),
        unknown_names.map(lambda n: Case("unknown anchor", upload(JOB, anchor=n),
                                         Code.NOT_FOUND)),
        extreme.map(lambda m: Case("rows past a bound", upload(JOB, m),
                                   Code.INVALID_ARGUMENT)),
        nonfinite.map(lambda m: Case("NaN or Inf", upload(JOB, m), Code.INVALID_ARGUMENT)),
        st.builds(lambda n, d, v: Case("other dim", upload(JOB, rows_message(n, d, v, 0.1)),
                                       Code.INVALID_ARGUMENT),
                  st.integers(1, 3), st.integers(1, 64).filter(lambda d: d != DIM), values),
        st.builds(lambda n, k, v: Case("grads of the wrong length", upload(
            JOB, cut(rows_message(n, DIM, v, 0.1), k)), Code.INVALID_ARGUMENT),
                  st.integers(1, 3), st.integers(1, 4 * DIM), values),
        st.just(Case("empty chunk", upload(JOB, pb.SketchRows(dim=DIM)),
                     Code.INVALID_ARGUMENT)),
        st.integers(51, 200).map(lambda n: Case("rows past max_rows_per_upload", upload(
            JOB, rows_message(n, DIM, [], 0.1)), Code.RESOURCE_EXHAUSTED)),
    )
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_get_mixture(server: Harness, data: st.DataObject) -> None:
    cases = st.one_of(
        job_cases("GetMixture", lambda n: pb.GetMixtureRequest(job=n)),
        st.integers(1000, 2**64 - 1).map(lambda v: Case("no such version", unary(
            "GetMixture", pb.GetMixtureRequest(job=JOB, version=v)), Code.NOT_FOUND)),
        st.integers(0, 1).map(lambda v: Case("a version", unary(
            "GetMixture", pb.GetMixtureRequest(job=JOB, version=v)), Code.OK)))
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_watch_mixture(server: Harness, data: st.DataObject) -> None:
    def first(job: str, after: int = 0) -> Callable[[Harness], Any]:
        def call(h: Harness) -> Any:
            stream = h.stub.WatchMixture(pb.WatchMixtureRequest(job=job, after_version=after),
                                         timeout=30)
            try:
                return next(stream)
            finally:
                stream.cancel()
        return call

    cases = st.one_of(
        raw_bytes("WatchMixture"),
        unknown_names.map(lambda n: Case("unknown job", first(n), Code.NOT_FOUND)),
        bad_names.map(lambda n: Case("bad job name", first(n), Code.INVALID_ARGUMENT)),
        st.just(Case("replay", first(JOB), Code.OK)))
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_list_mixtures(server: Harness, data: st.DataObject) -> None:
    cases = st.one_of(
        job_cases("ListMixtures", lambda n: pb.ListMixturesRequest(job=n)),
        st.builds(lambda a, lim, s: Case("any range", unary("ListMixtures",
                  pb.ListMixturesRequest(job=JOB, after_version=a, limit=lim, page_size=s)),
                  Code.OK), st.integers(0, 2**64 - 1), big, big),
        bad_tokens.map(lambda t: Case("bad token", unary("ListMixtures", pb.ListMixturesRequest(
            job=JOB, page_token=t)), Code.INVALID_ARGUMENT)))
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_estimate_subsets(server: Harness, data: st.DataObject) -> None:
    def request(*subsets: pb.Subset, anchor: str = "", mode: int = 0,
                job: str = JOB) -> pb.EstimateSubsetsRequest:
        return pb.EstimateSubsetsRequest(job=job, anchor=anchor, subsets=list(subsets),
                                         mode=mode)  # type: ignore[arg-type]

    def case(kind: str, code: grpc.StatusCode, *subsets: pb.Subset, **kw: Any) -> Case:
        return Case(kind, unary("EstimateSubsets", request(*subsets, **kw)), code)

    weights = st.lists(st.floats(0.01, 10), min_size=1, max_size=1)
    cases = st.one_of(
        job_cases("EstimateSubsets", lambda n: request(job=n)),
        unknown_names.map(lambda n: case("unknown task", Code.NOT_FOUND,
                                         pb.Subset(tasks=[n]))),
        unknown_names.map(lambda n: case("unknown anchor", Code.NOT_FOUND, anchor=n)),
        st.just(case("open anchor", Code.FAILED_PRECONDITION, anchor=OPEN_ANCHOR)),
        st.just(case("pending task", Code.FAILED_PRECONDITION, pb.Subset(tasks=["t2"]))),
        st.lists(st.floats(0, 10), min_size=2, max_size=5).map(lambda w: case(
            "weights of another length", Code.INVALID_ARGUMENT,
            pb.Subset(tasks=["t1"], weights=w))),
        st.sampled_from([float("nan"), float("inf"), -1.0]).map(lambda w: case(
            "bad weight", Code.INVALID_ARGUMENT, pb.Subset(tasks=["t1"], weights=[w]))),
        st.integers(3, 2**31 - 1).map(lambda m: case("unknown mode", Code.INVALID_ARGUMENT,
                                                 mode=m)),
        st.integers(201, 400).map(lambda m: case(
            "past max_exact_query_cost", Code.RESOURCE_EXHAUSTED,
            *[pb.Subset(tasks=["t1"])] * m, mode=pb.ESTIMATE_MODE_EXACT)),
        st.builds(lambda n, w: case("estimates", Code.OK, *[pb.Subset(tasks=["t1"],
                  weights=w)] * n), st.integers(0, 5), weights),
    )
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_select_tasks(server: Harness, data: st.DataObject) -> None:
    def case(kind: str, code: grpc.StatusCode, **fields: Any) -> Case:
        return Case(kind, unary("SelectTasks", pb.SelectTasksRequest(
            **{"job": JOB, **fields})), code)

    cases = st.one_of(
        job_cases("SelectTasks", lambda n: pb.SelectTasksRequest(job=n)),
        st.just(case("top-k without k", Code.INVALID_ARGUMENT,
                     method=pb.SELECTION_METHOD_TOP_K)),
        st.integers(4, 2**31 - 1).map(lambda m: case("unknown method", Code.INVALID_ARGUMENT,
                                                 method=m)),
        st.sampled_from([float("nan"), float("inf")]).map(lambda t: case(
            "non-finite threshold", Code.INVALID_ARGUMENT, threshold=t)),
        unknown_names.map(lambda n: case("unknown anchor", Code.NOT_FOUND, anchor=n)),
        st.builds(lambda k, t: case("selects", Code.OK, method=pb.SELECTION_METHOD_TOP_K,
                                    k=k, threshold=t), st.integers(1, 2**32 - 1),
                  st.floats(-1e300, 1e300)),
    )
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_report_task_failure(server: Harness, data: st.DataObject) -> None:
    """Only refusals: a failure reported on a real task would change the job (checked
    elsewhere, tests/integration/test_task_failure.py)."""
    def report(job: str, task: str) -> Any:
        return pb.ReportTaskFailureRequest(job=job, task=task, reason="unreadable")

    cases = st.one_of(
        job_cases("ReportTaskFailure", lambda n: report(n, "t1")),
        unknown_names.map(lambda n: Case("unknown task", unary(
            "ReportTaskFailure", report(JOB, n)), Code.NOT_FOUND)),
        bad_names.map(lambda n: Case("bad task name", unary(
            "ReportTaskFailure", report(JOB, n)), Code.INVALID_ARGUMENT)),
        raw_bytes("ReportTaskFailure"))
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_get_server_info(server: Harness, data: st.DataObject) -> None:
    cases = st.one_of(
        st.just(Case("the server", unary("GetServerInfo", pb.GetServerInfoRequest()), Code.OK)),
        raw_bytes("GetServerInfo"))
    fuzz_rpc(server, data, cases)


# The lifecycle RPCs change a job for good when they succeed: only refusals (and reads)
# are fuzzed here; what they do is tested in tests/integration/test_lifecycle.py.


@FUZZ
@given(data=st.data())
def test_fuzz_update_task(server: Harness, data: st.DataObject) -> None:
    def update(job: str, task: str) -> Any:
        return pb.UpdateTaskRequest(job=job, name=task, metadata={"k": "v"})

    cases = st.one_of(
        job_cases("UpdateTask", lambda n: update(n, "t1")),
        unknown_names.map(lambda n: Case("unknown task", unary(
            "UpdateTask", update(JOB, n)), Code.NOT_FOUND)),
        bad_names.map(lambda n: Case("bad task name", unary(
            "UpdateTask", update(JOB, n)), Code.INVALID_ARGUMENT)),
        raw_bytes("UpdateTask"))
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_pin_mixture(server: Harness, data: st.DataObject) -> None:
    def pin(job: str, weights: dict[str, float]) -> Any:
        return pb.PinMixtureRequest(job=job, weights=weights)

    bad_weight = st.one_of(st.floats(max_value=-1e-9), st.just(math.nan), st.just(math.inf))
    cases = st.one_of(
        job_cases("PinMixture", lambda n: pin(n, {"t1": 1.0})),
        st.just(Case("no weights", unary("PinMixture", pin(JOB, {})), Code.INVALID_ARGUMENT)),
        st.just(Case("all zero", unary("PinMixture", pin(JOB, {"t1": 0.0})),
                     Code.INVALID_ARGUMENT)),
        bad_weight.map(lambda w: Case("bad weight", unary("PinMixture", pin(JOB, {"t1": w})),
                                      Code.INVALID_ARGUMENT)),
        unknown_names.map(lambda n: Case("unknown task", unary(
            "PinMixture", pin(JOB, {n: 1.0})), Code.NOT_FOUND)),
        raw_bytes("PinMixture"))
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_unpin_mixture(server: Harness, data: st.DataObject) -> None:
    cases = st.one_of(
        job_cases("UnpinMixture", lambda n: pb.UnpinMixtureRequest(job=n)),
        st.just(Case("not pinned", unary("UnpinMixture", pb.UnpinMixtureRequest(job=JOB)),
                     Code.FAILED_PRECONDITION)),
        raw_bytes("UnpinMixture"))
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_delete_job(server: Harness, data: st.DataObject) -> None:
    cases = st.one_of(job_cases("DeleteJob", lambda n: pb.DeleteJobRequest(name=n)),
                      raw_bytes("DeleteJob"))
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_unarchive_job(server: Harness, data: st.DataObject) -> None:
    cases = st.one_of(
        job_cases("UnarchiveJob", lambda n: pb.UnarchiveJobRequest(name=n)),
        st.just(Case("not archived", unary("UnarchiveJob", pb.UnarchiveJobRequest(name=JOB)),
                     Code.FAILED_PRECONDITION)),
        raw_bytes("UnarchiveJob"))
    fuzz_rpc(server, data, cases)


@FUZZ
@given(data=st.data())
def test_fuzz_list_job_events(server: Harness, data: st.DataObject) -> None:
    cases = st.one_of(
        job_cases("ListJobEvents", lambda n: pb.ListJobEventsRequest(job=n)),
        big.map(lambda a: Case("the job's events", unary("ListJobEvents", pb.ListJobEventsRequest(
            job=JOB, after_sequence=a)), Code.OK)),
        raw_bytes("ListJobEvents"))
    fuzz_rpc(server, data, cases)


def test_every_rpc_is_fuzzed() -> None:
    names = {m.name for m in pb.DESCRIPTOR.services_by_name["SelectionService"].methods}
    assert names == set(REQUESTS)
    fuzzed = {name.removeprefix("test_fuzz_") for name in globals() if name.startswith(
        "test_fuzz_")}
    snake = {"".join("_" + c.lower() if c.isupper() else c for c in n).lstrip("_")
             for n in names}
    assert snake == fuzzed
