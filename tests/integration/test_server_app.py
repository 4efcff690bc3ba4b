"""The `gradmix-server` entry point: start-up line, serving, clean stop on SIGTERM."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.proto.v1 import selection_pb2_grpc as pb_grpc
from gradmix.server.app import ServerStartError, build_server
from gradmix.server.config import ServerConfig
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

LINE = re.compile(r"^gradmix-server listening grpc=(\S+):(\d+) metrics=(\S+):(\d+) store=(\S+)"
                  r" access=insecure$")


def test_entry_point_prints_ports_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = {**os.environ, "GRADMIX_GRACE_SECONDS": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gradmix.server.app", "--store", str(store), "--port", "0",
         "--metrics-port", "0", "--log-level", "WARNING", "--insecure"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        match = LINE.match(line)
        if not match:
            process.kill()
            pytest.fail(f"unexpected start-up line {line!r}; stderr: {process.communicate()[1]}")
        host, port, _, metrics_port, store_url = match.groups()
        assert (host, store_url) == ("127.0.0.1", str(store))
        assert int(port) > 0 and int(metrics_port) > 0 and port != metrics_port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.SelectionServiceStub(channel)
            stub.CreateJob(pb.CreateJobRequest(
                name="j", spec=pb.JobSpec(sketch=pb.SketchSpec(dim=4, seed=1))), timeout=10)
            stub.RegisterTask(pb.RegisterTaskRequest(job="j", name="t"), timeout=10)
            watch = stub.WatchMixture(pb.WatchMixtureRequest(job="j"), timeout=30)
            assert next(watch).version == 1
            process.send_signal(signal.SIGTERM)
            # The open stream is ended by the server, not left hanging, with UNAVAILABLE:
            # what gRPC clients reconnect on (OK would read as a normal end).
            with pytest.raises(grpc.RpcError) as ended:
                list(watch)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_taken_port_is_a_clear_start_error(tmp_path: Path) -> None:
    config = ServerConfig(store=str(tmp_path / "store"), port=0, metrics_port=0, insecure=True)
    first, port = build_server(config, CollectorRegistry())
    try:
        taken = dataclasses.replace(config, port=port)
        with pytest.raises(ServerStartError, match=str(port)):
            build_server(taken, CollectorRegistry())
    finally:
        first.stop(grace=0)
    assert first.wait(timeout=0)


def test_bad_flags_exit_with_a_message() -> None:
    result = subprocess.run([sys.executable, "-m", "gradmix.server.app", "--port", "nope"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "port must be int" in result.stderr
