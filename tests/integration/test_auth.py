"""Identity and access on a real server: TLS, mutual TLS, bearer tokens with job-scoped roles.

Certificates are made per module by `scripts/make_certs.py` (a real CA, server
and client certificates); the server is the real one on 127.0.0.1 port 0.
The matrix calls every SelectionService RPC as {no token, wrong token, each
role on the job, an admin of another job} and checks the exact status code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import importlib.util
import json
import logging
import os
import shlex
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from gradmix.client import SelectionClient
from gradmix.client import cli as gradmix_cli
from gradmix.client.errors import (
    GradmixError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.proto.v1 import selection_pb2_grpc as pb_grpc
from gradmix.server.app import RunningServer, ServerStartError, build_server, describe_access
from gradmix.server.auth import (
    RPC_ROLES,
    Role,
    TokenTable,
    TokenTableError,
    hash_token,
    new_token_line,
    parse_tokens,
)
from gradmix.server.config import ServerConfig, ServerConfigError
from gradmix.server.rows import encode_rows
from gradmix.store import SketchStore
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from server_support import DIM, Planted, source, upload_requests, wait_for

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_certs", ROOT / "scripts" / "make_certs.py")
assert _spec is not None and _spec.loader is not None
make_certs_module = importlib.util.module_from_spec(_spec)
sys.modules["make_certs"] = make_certs_module
_spec.loader.exec_module(make_certs_module)
make_certs = make_certs_module.make_certs

JOB, OTHER = "alpha", "beta"
#: A job the DeleteJob call of the matrix creates and deletes (in the job tokens' scope).
SCRATCH = "scratch"
#: identity -> (token, role, jobs); "root" sets the job up and gives each RPC's reference outcome.
TOKENS = {
    "root": ("tok-root-0123456789", "admin", "*"),
    "admin": ("tok-admin-0123456789", "admin", f"{JOB},{SCRATCH}"),
    "writer": ("tok-writer-0123456789", "writer", f"{JOB},{SCRATCH}"),
    "reader": ("tok-reader-0123456789", "reader", f"{JOB},{SCRATCH}"),
    "other-job": ("tok-other-0123456789", "admin", OTHER),
}


def token_file_text(tokens: dict[str, tuple[str, str, str]]) -> str:
    return "".join(f"{hash_token(t)} {role} {jobs} {name}\n"
                   for name, (t, role, jobs) in tokens.items())


@dataclass
class Secured:
    server: RunningServer
    port: int
    certs: Any
    store_dir: Path
    token_file: Path

    def channel(self, *, client_cert: bool = False) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.certs.ca.read_bytes(),
            private_key=self.certs.client_key.read_bytes() if client_cert else None,
            certificate_chain=self.certs.client_cert.read_bytes() if client_cert else None)
        return grpc.secure_channel(f"127.0.0.1:{self.port}", creds)


def start_secured(tmp: Path, certs: Any, *, mtls: bool = False, metrics_tls: bool = False,
                  tokens: dict[str, tuple[str, str, str]] = TOKENS,
                  health_port: int | None = None) -> Secured:
    tmp.mkdir(parents=True, exist_ok=True)
    token_file = tmp / "tokens"
    token_file.write_text(token_file_text(tokens))
    config = ServerConfig(store=str(tmp / "store"), port=0, metrics_port=0,
                          debounce_seconds=0.02, tls_cert=str(certs.server_cert),
                          tls_key=str(certs.server_key),
                          tls_client_ca=str(certs.ca) if mtls else "",
                          tls_metrics=metrics_tls, auth_tokens_file=str(token_file),
                          health_port=health_port)
    server, port = build_server(config, CollectorRegistry())
    return Secured(server, port, certs, tmp / "store", token_file)


def bearer(identity: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[identity][0]}"),)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_certs(tmp_path_factory.mktemp("pki"))


def _set_up_jobs(stub: pb_grpc.SelectionServiceStub, store_dir: Path) -> None:
    """Two jobs; alpha has a complete anchor, sketched tasks and a mixture."""
    md = bearer("root")
    planted = Planted(helpful=1, harmful=1)
    for job in (JOB, OTHER):
        stub.CreateJob(pb.CreateJobRequest(name=job, spec=spec()), metadata=md)
    stub.DeclareAnchor(pb.DeclareAnchorRequest(job=JOB, anchor="a0", step=0), metadata=md)
    for task in [None, *planted.names("helpful"), *planted.names("harmful")]:
        if task is not None:
            stub.RegisterTask(pb.RegisterTaskRequest(job=JOB, name=task), metadata=md)
        stub.UploadSketch(upload_requests(JOB, "a0", task, [planted.rows(task)]), metadata=md)
    # A store writer's rows (other example ids), for CommitSketch.
    grads, values, ids = planted.rows("helpful-0")
    SketchStore.open(str(store_dir)).writer(JOB, "a0", "helpful-0", "w-store").append(
        grads, values, ids + 1000)
    stub.CompleteAnchor(pb.CompleteAnchorRequest(job=JOB, anchor="a0"), metadata=md)
    wait_for(lambda: stub.GetMixture(pb.GetMixtureRequest(job=JOB), metadata=md),
             lambda m: bool(m.anchor == "a0" and not m.pending_tasks), "alpha's mixture")
    # A task whose data a trainer reports unloadable (ReportTaskFailure): never sketched.
    stub.RegisterTask(pb.RegisterTaskRequest(job=JOB, name="unloadable"), metadata=md)


def spec() -> pb.JobSpec:
    return pb.JobSpec(sketch=pb.SketchSpec(dim=DIM, seed=7), target="val.jsonl")


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, certs: Any) -> Iterator[Secured]:
    s = start_secured(tmp_path_factory.mktemp("secured"), certs)
    channel = s.channel()
    _set_up_jobs(pb_grpc.SelectionServiceStub(channel), s.store_dir)
    channel.close()
    yield s
    s.server.stop(grace=0)


Call = Callable[[pb_grpc.SelectionServiceStub, Any], object]


def _watch(stub: pb_grpc.SelectionServiceStub, md: Any) -> object:
    call = stub.WatchMixture(pb.WatchMixtureRequest(job=JOB), metadata=md, timeout=20)
    try:
        return next(call)
    finally:
        call.cancel()


def _delete_job(stub: pb_grpc.SelectionServiceStub, md: Any) -> object:
    """Delete a job made for the purpose (alpha must outlive the matrix); it never stays."""
    root = bearer("root")
    stub.CreateJob(pb.CreateJobRequest(name=SCRATCH, spec=spec()), metadata=root)
    try:
        return stub.DeleteJob(pb.DeleteJobRequest(name=SCRATCH), metadata=md)
    finally:
        with contextlib.suppress(grpc.RpcError):  # deleted already when the call was allowed
            stub.DeleteJob(pb.DeleteJobRequest(name=SCRATCH), metadata=root)


def _unarchive_job(stub: pb_grpc.SelectionServiceStub, md: Any) -> object:
    """Unarchive a job archived for the purpose; it never stays."""
    root = bearer("root")
    stub.CreateJob(pb.CreateJobRequest(name=SCRATCH, spec=spec()), metadata=root)
    stub.DeleteJob(pb.DeleteJobRequest(name=SCRATCH, keep_data=True), metadata=root)
    try:
        return stub.UnarchiveJob(pb.UnarchiveJobRequest(name=SCRATCH), metadata=md)
    finally:
        stub.DeleteJob(pb.DeleteJobRequest(name=SCRATCH), metadata=root)


def _unpin(stub: pb_grpc.SelectionServiceStub, md: Any) -> object:
    """Unpin a mixture pinned for the purpose (unpinning needs a pin); it never stays."""
    root = bearer("root")
    stub.PinMixture(pb.PinMixtureRequest(job=JOB, weights={"helpful-0": 1.0}), metadata=root)
    try:
        return stub.UnpinMixture(pb.UnpinMixtureRequest(job=JOB), metadata=md)
    finally:
        with contextlib.suppress(grpc.RpcError):  # unpinned already when the call was allowed
            stub.UnpinMixture(pb.UnpinMixtureRequest(job=JOB), metadata=root)


#: One call per RPC on job alpha, each repeatable with the same outcome.
CALLS: dict[str, Call] = {
    "CreateJob": lambda s, md: s.CreateJob(pb.CreateJobRequest(name=JOB, spec=spec()),
                                           metadata=md),
    "GetJob": lambda s, md: s.GetJob(pb.GetJobRequest(name=JOB), metadata=md),
    "ListJobs": lambda s, md: s.ListJobs(pb.ListJobsRequest(), metadata=md),
    "RegisterTask": lambda s, md: s.RegisterTask(
        pb.RegisterTaskRequest(job=JOB, name="helpful-0"), metadata=md),
    "ListTasks": lambda s, md: s.ListTasks(pb.ListTasksRequest(job=JOB), metadata=md),
    "DeclareAnchor": lambda s, md: s.DeclareAnchor(
        pb.DeclareAnchorRequest(job=JOB, anchor="a0", step=0), metadata=md),
    "CompleteAnchor": lambda s, md: s.CompleteAnchor(
        pb.CompleteAnchorRequest(job=JOB, anchor="a0"), metadata=md),
    "ListAnchors": lambda s, md: s.ListAnchors(pb.ListAnchorsRequest(job=JOB), metadata=md),
    "CommitSketch": lambda s, md: s.CommitSketch(pb.CommitSketchRequest(
        source=source(JOB, "a0", "helpful-0"), writer="w-store", committed_rows=48),
        metadata=md),
    "UploadSketch": lambda s, md: s.UploadSketch(
        upload_requests(JOB, "a0", "helpful-0", [Planted(1, 1).rows("helpful-0", 0, 4)]),
        metadata=md),
    "GetMixture": lambda s, md: s.GetMixture(pb.GetMixtureRequest(job=JOB), metadata=md),
    "WatchMixture": _watch,
    "ListMixtures": lambda s, md: s.ListMixtures(pb.ListMixturesRequest(job=JOB), metadata=md),
    "EstimateSubsets": lambda s, md: s.EstimateSubsets(pb.EstimateSubsetsRequest(
        job=JOB, subsets=[pb.Subset(tasks=["helpful-0"]), pb.Subset()]), metadata=md),
    "SelectTasks": lambda s, md: s.SelectTasks(pb.SelectTasksRequest(
        job=JOB, method=pb.SELECTION_METHOD_THRESHOLD), metadata=md),
    "ReportTaskFailure": lambda s, md: s.ReportTaskFailure(pb.ReportTaskFailureRequest(
        job=JOB, task="unloadable", reason="no such file"), metadata=md),
    "GetServerInfo": lambda s, md: s.GetServerInfo(pb.GetServerInfoRequest(), metadata=md),
    "UpdateTask": lambda s, md: s.UpdateTask(pb.UpdateTaskRequest(
        job=JOB, name="unloadable", metadata={"owner": "ops"}), metadata=md),
    "PinMixture": lambda s, md: s.PinMixture(pb.PinMixtureRequest(
        job=JOB, weights={"helpful-0": 1.0}, reason="matrix"), metadata=md),
    "UnpinMixture": _unpin,
    "DeleteJob": _delete_job,
    "UnarchiveJob": _unarchive_job,
    "ListJobEvents": lambda s, md: s.ListJobEvents(pb.ListJobEventsRequest(job=JOB),
                                                   metadata=md),
}

WHO = ["no-token", "wrong-token", "reader", "writer", "admin", "other-job"]
ROLES = {"reader": Role.READER, "writer": Role.WRITER, "admin": Role.ADMIN}


def code_of(call: Call, stub: pb_grpc.SelectionServiceStub, md: Any) -> grpc.StatusCode:
    try:
        call(stub, md)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def expected(rpc: str, who: str) -> grpc.StatusCode:
    if who in ("no-token", "wrong-token"):
        return grpc.StatusCode.UNAUTHENTICATED
    if who == "other-job":  # ListJobs names no job: it answers, filtered (see below)
        return grpc.StatusCode.OK if RPC_ROLES[rpc].job_of is None else \
            grpc.StatusCode.PERMISSION_DENIED
    if ROLES[who] < RPC_ROLES[rpc].role:
        return grpc.StatusCode.PERMISSION_DENIED
    return grpc.StatusCode.OK


def test_the_table_covers_every_rpc_and_the_matrix_calls_each() -> None:
    methods = set(pb.DESCRIPTOR.services_by_name["SelectionService"].methods_by_name)
    assert set(RPC_ROLES) == methods
    assert set(CALLS) == methods


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("rpc", sorted(RPC_ROLES))
def test_auth_matrix(secured: Secured, rpc: str, who: str) -> None:
    channel = secured.channel()
    stub = pb_grpc.SelectionServiceStub(channel)
    try:
        md: Any = {"no-token": (), "wrong-token": (("authorization", "Bearer not-a-token"),)
                   }[who] if who.endswith("token") else bearer(who)
        # Every permitted call succeeds: the fixture made every one of them valid.
        assert code_of(CALLS[rpc], stub, bearer("root")) == grpc.StatusCode.OK
        assert code_of(CALLS[rpc], stub, md) == expected(rpc, who)
    finally:
        channel.close()


def test_list_jobs_shows_only_the_tokens_jobs(secured: Secured) -> None:
    channel = secured.channel()
    stub = pb_grpc.SelectionServiceStub(channel)
    try:
        def names(who: str) -> list[str]:
            return sorted(j.name for j in stub.ListJobs(pb.ListJobsRequest(),
                                                        metadata=bearer(who)).jobs)

        assert names("root") == [JOB, OTHER]
        assert names("reader") == [JOB]
        assert names("other-job") == [OTHER]
    finally:
        channel.close()


def test_messages_name_the_rule_but_not_the_token(secured: Secured,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with SelectionClient(f"127.0.0.1:{secured.port}", tls=True,
                         root_certificates=secured.certs.ca.read_bytes(),
                         token=TOKENS["reader"][0]) as client:
        assert [j.name for j in client.list_jobs()] == [JOB]
        with pytest.raises(PermissionDenied, match="role reader; RegisterTask needs writer"):
            client.register_task(JOB, "t-new")
        with pytest.raises(PermissionDenied, match="may not act on job 'beta'"):
            client.get_job(OTHER)
    with SelectionClient(f"127.0.0.1:{secured.port}", tls=True,
                         root_certificates=secured.certs.ca.read_bytes(),
                         token="guess") as client, pytest.raises(Unauthenticated):
        client.list_jobs()
    for token, _, _ in TOKENS.values():
        assert token not in caplog.text
    assert "guess" not in caplog.text


def test_plaintext_client_cannot_talk_to_a_tls_port(secured: Secured) -> None:
    with (SelectionClient(f"127.0.0.1:{secured.port}", timeout=2.0,
                          token=TOKENS["root"][0]) as client,
          pytest.raises(Unavailable)):
        client.list_jobs()


def test_tokens_rotate_without_a_restart(tmp_path: Path, certs: Any) -> None:
    s = start_secured(tmp_path, certs, tokens={"reader": ("old-token", "reader", "*")})
    try:
        def client(token: str) -> SelectionClient:
            return SelectionClient(f"127.0.0.1:{s.port}", tls=True,
                                   root_certificates=certs.ca.read_bytes(), token=token)

        with client("old-token") as old, client("new-token") as new:
            assert old.list_jobs() == []
            with pytest.raises(Unauthenticated):
                new.list_jobs()
            s.token_file.write_text(token_file_text({"r2": ("new-token", "reader", "*")}))
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:  # re-read within about a second
                try:
                    new.list_jobs()
                    break
                except Unauthenticated:
                    time.sleep(0.1)
            assert new.list_jobs() == []
            with pytest.raises(Unauthenticated):
                old.list_jobs()
            # A broken edit keeps the last good table instead of locking everyone out.
            s.token_file.write_text("not a token line\n")
            time.sleep(1.2)
            assert new.list_jobs() == []
    finally:
        s.server.stop(grace=0)


def test_mutual_tls_needs_a_client_certificate_from_the_ca(tmp_path: Path, certs: Any) -> None:
    s = start_secured(tmp_path / "server", certs, mtls=True)
    stranger = make_certs(tmp_path / "stranger")  # a client cert from another CA
    try:
        ca = certs.ca.read_bytes()
        with SelectionClient(f"127.0.0.1:{s.port}", tls=True, root_certificates=ca,
                             certificate_chain=certs.client_cert.read_bytes(),
                             private_key=certs.client_key.read_bytes(),
                             token=TOKENS["root"][0]) as client:
            assert client.list_jobs() == []
        for chain, key in ((None, None), (stranger.client_cert.read_bytes(),
                                          stranger.client_key.read_bytes())):
            with (SelectionClient(f"127.0.0.1:{s.port}", tls=True, root_certificates=ca,
                                  certificate_chain=chain, private_key=key, timeout=2.0,
                                  token=TOKENS["root"][0]) as client,
                  pytest.raises(Unavailable)):
                client.list_jobs()
    finally:
        s.server.stop(grace=0)


def test_metrics_can_be_served_over_tls(tmp_path: Path, certs: Any) -> None:
    s = start_secured(tmp_path, certs, metrics_tls=True)
    try:
        url = f"https://127.0.0.1:{s.server.metrics_port}/metrics"
        context = ssl.create_default_context(cafile=str(certs.ca))
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            assert b"gradmix_auth_denied" in response.read()
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(url, context=ssl.create_default_context(), timeout=10)
        with pytest.raises((ConnectionError, urllib.error.URLError, http.client.HTTPException)):
            urllib.request.urlopen(url.replace("https", "http"), timeout=10).read()
    finally:
        s.server.stop(grace=0)


def test_rotated_certificate_files_serve_new_connections_without_a_restart(
        tmp_path: Path, certs: Any) -> None:
    """Files replaced as Kubernetes does (both at once): new gRPC and /metrics
    connections get the new certificate, an open connection keeps going; a
    half-written rotation (a key that is not the certificate's) keeps the last one."""
    served = tmp_path / "served"
    served.mkdir()
    for name in ("server.pem", "server-key.pem"):
        (served / name).write_bytes((certs.ca.parent / name).read_bytes())
    rotated = make_certs(tmp_path / "pki-2")  # another CA: a client of the old one fails
    served_certs = dataclasses.replace(certs, server_cert=served / "server.pem",
                                       server_key=served / "server-key.pem")
    s = start_secured(tmp_path / "server", served_certs, metrics_tls=True)

    def serving(ca: Path) -> bool:
        """Whether a new connection that trusts `ca` alone gets an answer."""
        creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{s.port}", creds) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                return False
            return True

    def metrics_serving(ca: Path) -> bool:
        context = ssl.create_default_context(cafile=str(ca))
        url = f"https://127.0.0.1:{s.server.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, context=context, timeout=5) as response:
                return response.status == 200
        except urllib.error.URLError as exc:
            assert "CERTIFICATE_VERIFY_FAILED" in str(exc), exc
            return False

    def replace(pem: bytes, key: bytes | None) -> None:
        """Write the files aside, then move them in (a reader sees old or new files)."""
        for name, data in (("server.pem", pem), ("server-key.pem", key)):
            if data is not None:
                (served / f".{name}").write_bytes(data)
                os.replace(served / f".{name}", served / name)

    try:
        old = grpc.secure_channel(f"127.0.0.1:{s.port}", grpc.ssl_channel_credentials(
            root_certificates=certs.ca.read_bytes()))
        health = health_pb2_grpc.HealthStub(old)
        health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert serving(certs.ca) and not serving(rotated.ca)
        assert metrics_serving(certs.ca) and not metrics_serving(rotated.ca)

        replace(rotated.server_cert.read_bytes(), rotated.server_key.read_bytes())
        wait_for(lambda: serving(rotated.ca), bool, "the rotated certificate on gRPC")
        wait_for(lambda: metrics_serving(rotated.ca), bool, "the rotated certificate on /metrics")
        assert not serving(certs.ca) and not metrics_serving(certs.ca)
        health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # the open connection
        old.close()

        # Half a rotation: the first CA's certificate beside the second's key.
        replace(certs.server_cert.read_bytes(), None)
        deadline = time.monotonic() + 3  # past the reload check period: it was looked at
        while time.monotonic() < deadline:
            assert serving(rotated.ca) and not serving(certs.ca)
            time.sleep(0.2)
        replace(certs.server_cert.read_bytes(), certs.server_key.read_bytes())  # completed
        wait_for(lambda: serving(certs.ca), bool, "the certificate rotated back")
    finally:
        s.server.stop(grace=0)


def test_probes_get_a_plaintext_port_with_health_alone(tmp_path: Path, certs: Any) -> None:
    s = start_secured(tmp_path, certs, health_port=0)
    try:
        assert s.server.health_port
        with grpc.insecure_channel(f"127.0.0.1:{s.server.health_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as error:
                pb_grpc.SelectionServiceStub(channel).ListJobs(pb.ListJobsRequest(), timeout=10)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        s.server.stop(grace=0)


def test_the_cli_takes_tls_and_a_token_file(secured: Secured, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKENS["reader"][0] + "\n")
    argv = ["--server", f"127.0.0.1:{secured.port}", "--tls", "--ca-cert",
            str(secured.certs.ca), "--token-file", str(token_file), "--json"]
    assert gradmix_cli.main([*argv, "jobs"]) == 0
    assert [j["name"] for j in json.loads(capsys.readouterr().out)] == [JOB]
    assert gradmix_cli.main([*argv, "register-task", JOB, "t-new"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err


# ---------------------------------------------------------------- configuration


def test_plaintext_only_when_asked_and_tls_only_with_tokens(tmp_path: Path, certs: Any) -> None:
    store = str(tmp_path / "store")
    with pytest.raises(ServerConfigError, match="--insecure"):
        ServerConfig(store=store)
    with pytest.raises(ServerConfigError, match="tokens"):
        ServerConfig(store=store, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key))
    line = new_token_line("reader", "*", "ops")[1]
    missing = ServerConfig(store=store, tls_cert=str(tmp_path / "missing.pem"),
                           tls_key=str(certs.server_key), auth_tokens=line, port=0,
                           metrics_port=0)
    with pytest.raises(ServerStartError, match="cannot read"):
        build_server(missing, CollectorRegistry())
    with pytest.raises(TokenTableError, match="auth_tokens:1"):
        build_server(dataclasses.replace(missing, tls_cert=str(certs.server_cert),
                                         auth_tokens="x"), CollectorRegistry())
    insecure = ServerConfig(store=store, insecure=True)
    assert describe_access(insecure) == "insecure"
    mtls = ServerConfig(store=store, tls_cert=str(certs.server_cert),
                        tls_key=str(certs.server_key), tls_client_ca=str(certs.ca),
                        auth_tokens=line)
    assert describe_access(mtls) == "mtls+tokens"


def test_token_table_lines(tmp_path: Path) -> None:
    token, line = new_token_line("writer", "alpha,beta", "trainer")
    table = parse_tokens(line, "t")
    identity = table[hash_token(token)]
    assert identity.role is Role.WRITER and identity.jobs == frozenset({"alpha", "beta"})
    assert identity.may_access("alpha") and not identity.may_access("gamma")
    assert TokenTable(text=line).identify(token) == identity
    assert TokenTable(text=line).identify(token + "x") is None
    for bad, message in [(f"{token} reader *", "hex SHA-256"),
                         (f"{hash_token('a')} owner *", "role must be one of"),
                         (f"{hash_token('a')} reader", "fields"),
                         (f"{line}\n{line}", "twice")]:
        with pytest.raises(TokenTableError, match=message):
            parse_tokens(bad, "t")
    with pytest.raises(TokenTableError, match="cannot read"):
        TokenTable(str(tmp_path / "missing"))


# ---------------------------------------------------------------- the trainer's connection

TRAINER_TOML = """
job = "alpha"
output_dir = "out"
server = "127.0.0.1:{port}"
upload = true
tls = true
ca_cert = "pki/ca.pem"
token_file = "token"
[model]
config = {{ model_type = "gpt2", n_embd = 32, n_layer = 2, n_head = 2 }}
[data]
target = "data/target.jsonl"
"""


def test_the_trainer_connects_with_tls_and_its_token_file(secured: Secured,
                                                          tmp_path: Path) -> None:
    from gradmix.trainer.config import load_config as load_train_config
    from gradmix.trainer.errors import ConfigError as TrainConfigError
    from gradmix.trainer.setup import build_client

    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.pem").write_bytes(secured.certs.ca.read_bytes())
    (tmp_path / "token").write_text(TOKENS["writer"][0] + "\n")
    path = tmp_path / "job.toml"
    path.write_text(TRAINER_TOML.format(port=secured.port))
    config = load_train_config(path, env={})
    assert config.upload and config.ca_cert == str(tmp_path / "pki" / "ca.pem")
    with build_client(config, env={}) as client:
        assert [t.name for t in client.list_tasks(JOB)] == ["helpful-0", "harmful-0", "unloadable"]
        with pytest.raises(PermissionDenied):
            client.create_job(JOB, sketch=client.get_job(JOB).spec.sketch)
    # Without the file, the token comes from GRADMIX_TOKEN.
    no_file = load_train_config(path, env={}, token_file="")
    with build_client(no_file, env={"GRADMIX_TOKEN": TOKENS["reader"][0]}) as client:
        assert [j.name for j in client.list_jobs()] == [JOB]
    path.write_text(TRAINER_TOML.format(port=secured.port).replace("tls = true", ""))
    with pytest.raises(TrainConfigError, match="ca_cert needs tls"):
        load_train_config(path, env={})


def test_a_trainer_joins_with_a_writer_token_the_job_an_admin_created(
        secured: Secured, tmp_path: Path) -> None:
    """The trainer's job setup (`join_job`) needs `admin` only to create a job: with a
    writer token it joins a job of the same spec, and for a missing job it names the
    `gradmix create-job` command an admin runs (which then lets it join)."""
    from gradmix.client.errors import AlreadyExists
    from gradmix.client.types import PolicySettings, SketchSpec
    from gradmix.trainer.errors import ConfigError as TrainConfigError
    from gradmix.trainer.setup import join_job

    def client(who: str) -> SelectionClient:
        return SelectionClient(f"127.0.0.1:{secured.port}", tls=True,
                               root_certificates=secured.certs.ca.read_bytes(),
                               token=TOKENS[who][0])

    sketch = SketchSpec(dim=DIM, seed=3, manifest_hash="manifest-1")
    policy = PolicySettings(temperature=2.0)
    spec = {"sketch": sketch, "policy": policy, "target": "val.jsonl"}
    admin_token = tmp_path / "admin-token"
    admin_token.write_text(TOKENS["admin"][0] + "\n")
    cli = ["--server", f"127.0.0.1:{secured.port}", "--tls", "--ca-cert",
           str(secured.certs.ca), "--token-file", str(admin_token)]
    try:
        with client("writer") as writer:
            with pytest.raises(TrainConfigError, match="an admin must create it first: "
                               f"gradmix create-job {SCRATCH} ") as refused:
                join_job(writer, SCRATCH, **spec)  # type: ignore[arg-type]
            assert "\n" not in str(refused.value)
            command = shlex.split(str(refused.value).split("create it first: ", 1)[1])
            assert gradmix_cli.main([*cli, *command[1:]]) == 0  # the admin runs it
            assert join_job(writer, SCRATCH, **spec) == "joined"  # type: ignore[arg-type]
            assert join_job(writer, SCRATCH, sketch=sketch, policy=None, target="") == "joined"
            for other, field in (({"sketch": dataclasses.replace(sketch, manifest_hash="m-2")},
                                  "spec.sketch.manifest_hash"),
                                 ({"policy": PolicySettings(temperature=3.0)},
                                  "spec.policy.temperature"),
                                 ({"target": "other.jsonl"}, "spec.target")):
                with pytest.raises(AlreadyExists, match=field):
                    join_job(writer, SCRATCH, **{**spec, **other})  # type: ignore[arg-type]
        with client("root") as root:
            root.delete_job(SCRATCH)
        with client("admin") as admin:  # an admin's trainer creates the job itself
            assert join_job(admin, SCRATCH, **spec) == "created"  # type: ignore[arg-type]
            assert admin.get_job(SCRATCH).spec.sketch == sketch
    finally:
        with client("root") as root, contextlib.suppress(GradmixError):
            root.delete_job(SCRATCH)


@pytest.mark.slow
def test_gradmix_train_upload_mode_needs_no_store(tmp_path: Path, certs: Any) -> None:
    """A real gradmix-train run (CPU DeepSpeed, one rank) in upload mode against a TLS
    server with a writer token: refused (exit 2, one line naming the `gradmix
    create-job` command) while the job is missing; once an admin ran that command,
    its sketch rows reach the server's store, its own `store` is never opened."""
    from test_trainer_run import write_config, write_data

    job = "upjob"
    s = start_secured(tmp_path / "server", certs,
                      tokens={"trainer": ("trainer-token", "writer", job),
                              "ops": ("ops-token", "admin", job)})
    try:
        data = write_data(tmp_path / "data")
        untouched = tmp_path / "trainer-has-no-store"
        config = write_config(data, job=job, port=s.port, store=untouched,
                              training="steps = 12", sketching="interval = 5")
        config.write_text(config.read_text().replace(
            "[model]", f'tls = true\nca_cert = "{certs.ca}"\n[model]', 1))
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "GRADMIX_TOKEN": "trainer-token"}
        train = [sys.executable, "-m", "gradmix.trainer.main", "--config", str(config),
                 "--upload"]
        refused = subprocess.run(train, cwd=data, env=env, capture_output=True, text=True,
                                 timeout=300)
        assert refused.returncode == 2, refused.stderr[-4000:]
        (line,) = [x for x in refused.stderr.splitlines() if x.startswith("gradmix-train:")]
        assert "an admin must create it first: gradmix create-job upjob" in line
        (tmp_path / "ops-token").write_text("ops-token\n")
        command = shlex.split(line.split("create it first: ", 1)[1])
        assert gradmix_cli.main(["--server", f"127.0.0.1:{s.port}", "--tls", "--ca-cert",
                                 str(certs.ca), "--token-file", str(tmp_path / "ops-token"),
                                 *command[1:]]) == 0
        run = subprocess.run(train, cwd=data, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-4000:]
        assert not untouched.exists()
        store = SketchStore.open(str(s.store_dir))
        (anchor,) = store.list_anchors(job)
        for source in (None, "add", "mul"):
            assert store.committed_rows(job, anchor.name, source, writer="rank-0") == 8
        with SelectionClient(f"127.0.0.1:{s.port}", tls=True,
                             root_certificates=certs.ca.read_bytes(),
                             token="trainer-token") as client:
            assert client.get_mixture(job).anchor == anchor.name
    finally:
        s.server.stop(grace=0)


def test_an_upload_without_a_header_is_invalid_for_every_token(secured: Secured) -> None:
    channel = secured.channel()
    stub = pb_grpc.SelectionServiceStub(channel)
    try:
        for who in ("writer", "root"):
            rows = Planted(1, 1).rows("helpful-0", 0, 2)
            with pytest.raises(grpc.RpcError) as error:
                stub.UploadSketch(iter([pb.UploadSketchRequest(rows=encode_rows(*rows))]),
                                  metadata=bearer(who))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()


def test_the_event_log_names_the_token_not_what_the_caller_claims(secured: Secured) -> None:
    channel = secured.channel()
    stub = pb_grpc.SelectionServiceStub(channel)
    try:
        claimed = (*bearer("admin"), ("x-gradmix-actor", "someone-else"))
        stub.UpdateTask(pb.UpdateTaskRequest(job=JOB, name="unloadable",
                                             metadata={"ticket": "42"}), metadata=claimed)
        events = stub.ListJobEvents(pb.ListJobEventsRequest(job=JOB),
                                    metadata=bearer("reader")).events
        last = [e for e in events if e.action == "update_task"][-1]
        assert last.actor == "token:admin" and last.details["metadata.ticket"] == "42"
    finally:
        channel.close()
