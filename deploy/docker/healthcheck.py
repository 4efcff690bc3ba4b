"""Container health probe for gradmix-server: one grpc.health.v1 Check call.

Docker's HEALTHCHECK runs it inside the server image (Kubernetes uses its
native gRPC probe instead). It exits 0 when the server answers SERVING for the
requested service, 1 otherwise (not serving, unreachable, timed out), and
prints one line saying which.

Usage: python healthcheck.py [--address HOST:PORT] [--service NAME] [--timeout S]
The address defaults to 127.0.0.1 and the server's plaintext health port
(GRADMIX_HEALTH_PORT) if it has one, else its gRPC port (GRADMIX_PORT, else
50551; plaintext only when the server runs --insecure).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_PORT = 50551


def default_address() -> str:
    """The loopback address of the server configured in this container."""
    port = os.environ.get("GRADMIX_HEALTH_PORT") or os.environ.get("GRADMIX_PORT")
    return f"127.0.0.1:{port or DEFAULT_PORT}"


def check(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """Ask the server at `address` whether `service` is SERVING.

    Returns:
        (healthy, a one-line description of the answer).
    """
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{address}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=default_address())
    parser.add_argument("--service", default="", help="health service name ('' = server)")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    healthy, line = check(args.address, args.service, args.timeout)
    print(line)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
