"""Assembling and running the selection server.

`build_server(config, registry)` opens the store, rebuilds every job from it,
starts the grpc.aio server (SelectionService, grpc.health.v1 Health, server
reflection) on its own event loop in a background thread, starts /metrics on
its own port, and returns at once with a `RunningServer` handle and the bound
gRPC port. The gRPC port serves TLS from the configured certificate files
(mutual TLS when a client CA is set; new connections get rotated files,
`gradmix.server.certificates`) and checks every SelectionService call's
bearer token (`gradmix.server.auth`); plaintext only when the config says
`insecure`. `main()` is the `gradmix-server` entry point: it only loads the
config, calls `build_server`, prints the start-up line and waits for SIGTERM
or SIGINT, then drains the streams and stops within the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import FrameType

from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.proto.v1 import selection_pb2_grpc as pb_grpc
from gradmix.server.auth import AuthInterceptor, TokenTable
from gradmix.server.certificates import CertificateError, CertificateFiles
from gradmix.server.config import ServerConfig, ServerConfigError, load_config
from gradmix.server.convert import mixture_to_pb
from gradmix.server.errors import ServerError
from gradmix.server.instrumentation import RpcInstrumentation, add_instrumented_service
from gradmix.server.jobs import JobRegistry
from gradmix.server.metrics import MetricsEndpoint, ServerMetrics
from gradmix.server.publisher import MixturePublisher
from gradmix.server.servicer import SelectionServicer
from gradmix.store import SketchStore, StoreError
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry

log = logging.getLogger(__name__)

#: Longest the stop waits, after gRPC's own drain, for calls still running to end.
FINISH_SECONDS = 5.0

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SelectionService"].full_name


class ServerStartError(ServerError):
    """The server could not bind its port or load its store."""

    code_name = "UNAVAILABLE"


class _Core:
    """The parts that live on the server's event loop."""

    def __init__(self, config: ServerConfig, store: SketchStore, metrics: ServerMetrics,
                 interceptors: Sequence[aio.ServerInterceptor],
                 certificates: CertificateFiles | None = None) -> None:
        self.config = config
        self.interceptors = list(interceptors)
        #: The gRPC port's TLS files (None: plaintext).
        self.certificates = certificates
        self.store = store
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(config.estimation_workers,
                                           thread_name_prefix="gradmix-estimate")
        self.publisher = MixturePublisher(metrics, self._load_history, limits=config.limits())
        self.registry = JobRegistry(store, config, metrics, self.publisher, self.executor)
        self.instrumentation = RpcInstrumentation(metrics)
        self.health = health.aio.HealthServicer()
        self.server: aio.Server | None = None
        self.health_server: aio.Server | None = None
        self.health_port: int | None = None

    async def _load_history(self, job: str, after_version: int) -> list[pb.Mixture]:
        records = await asyncio.to_thread(self.store.read_mixtures, job, after_version)
        return [mixture_to_pb(job, r) for r in records]

    async def start(self) -> int:
        await self.registry.load_all()
        # Calls gRPC core holds until the event loop takes them up: soft = hard limit,
        # so none is dropped at random below max_pending_calls (gRPC: 1000 / 3000).
        pending = self.config.max_pending_calls
        options = [("grpc.so_reuseport", 0),
                   ("grpc.max_receive_message_length", self.config.max_message_bytes),
                   ("grpc.max_send_message_length", self.config.max_message_bytes),
                   ("grpc.server.max_pending_requests", pending),
                   ("grpc.server.max_pending_requests_hard_limit", pending)]
        server = aio.server(options=options, interceptors=self.interceptors)
        add_instrumented_service(
            pb_grpc.add_SelectionServiceServicer_to_server,
            SelectionServicer(self.registry, self.publisher, self.metrics), server,
            self.instrumentation)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.certificates is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, self.certificates.server_credentials())
        except RuntimeError as exc:
            raise ServerStartError(f"cannot bind gRPC to {address}: {exc}") from exc
        if port == 0:
            raise ServerStartError(f"cannot bind gRPC to {address}")
        await server.start()
        self.server = server
        if self.config.health_port is not None:
            await self._start_health_port()
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", serving)
        await self.health.set(SERVICE_NAME, serving)
        return port

    async def _start_health_port(self) -> None:
        """Plaintext grpc.health.v1 alone, for probes that cannot speak TLS."""
        server = aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{self.config.host}:{self.config.health_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ServerStartError(f"cannot bind the health port {address}: {exc}") from exc
        if port == 0:
            raise ServerStartError(f"cannot bind the health port {address}")
        await server.start()
        self.health_server, self.health_port = server, port

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        self.publisher.close()  # ends watch streams so the drain below can finish
        if self.server is not None:
            await self.server.stop(grace)
            # gRPC's stop returns when gRPC core holds no call; handlers of calls whose
            # clients left may still be sending their status: let them end before the loop.
            await self.instrumentation.finish(FINISH_SECONDS)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.registry.close()


class RunningServer:
    """Handle on a started server: its ports, `stop()` and `wait()`."""

    def __init__(self, core: _Core, loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                 port: int, endpoint: MetricsEndpoint) -> None:
        self._core = core
        self._loop = loop
        self._thread = thread
        self._endpoint = endpoint
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self.port = port
        self.metrics_port = endpoint.port
        self.health_port = core.health_port
        """The plaintext health-only port (None: not configured)."""
        self.config = core.config

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def stop(self, grace: float | None = 5.0) -> None:
        """Drain streams and calls for up to `grace` seconds, then stop everything."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            try:
                future = asyncio.run_coroutine_threadsafe(self._core.stop(grace), self._loop)
                future.result(timeout=None if grace is None else grace + 10.0)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10.0)
                self._core.executor.shutdown(wait=True, cancel_futures=True)
                self._endpoint.close()
                self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `stop()` has finished (True) or `timeout` passed (False)."""
        return self._stopped.wait(timeout)


def _certificates(config: ServerConfig) -> CertificateFiles | None:
    """The TLS certificate files, followed for rotation (None: plaintext, `insecure`)."""
    if config.insecure:
        return None
    try:
        return CertificateFiles(config.tls_key, config.tls_cert, config.tls_client_ca)
    except CertificateError as exc:
        raise ServerStartError(str(exc)) from exc


def _interceptors(config: ServerConfig,
                  registry: CollectorRegistry) -> list[aio.ServerInterceptor]:
    """The token check, when tokens are configured (always under TLS)."""
    if not (config.auth_tokens_file or config.auth_tokens):
        return []
    return [AuthInterceptor(TokenTable(config.auth_tokens_file, config.auth_tokens), registry)]


def _metrics_endpoint(config: ServerConfig, registry: CollectorRegistry,
                      certificates: CertificateFiles | None) -> MetricsEndpoint:
    if not config.tls_metrics or certificates is None:
        return MetricsEndpoint(registry, config.host, config.metrics_port)
    endpoint = MetricsEndpoint(registry, config.host, config.metrics_port,
                               certfile=config.tls_cert, keyfile=config.tls_key,
                               client_cafile=config.tls_client_ca or None)
    endpoint.watch_certificates(certificates)
    return endpoint


def describe_access(config: ServerConfig) -> str:
    """How the ports are protected, for the start-up line: `insecure`, `tls+tokens`,
    `mtls+tokens`, with `+metrics-tls` when /metrics is HTTPS."""
    access = "insecure" if config.insecure else "mtls" if config.tls_client_ca else "tls"
    if config.auth_tokens_file or config.auth_tokens:
        access += "+tokens"
    return access + ("+metrics-tls" if config.tls_metrics else "")


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


def build_server(config: ServerConfig,
                 registry: CollectorRegistry | None = None) -> tuple[RunningServer, int]:
    """Start the server in a background thread and return at once.

    Args:
        config: the server config (`port=0` / `metrics_port=0` pick free ports).
        registry: where the metrics live (None: prometheus_client's default).

    Returns:
        The running server's handle and its bound gRPC port.

    Raises:
        ServerStartError: a port could not be bound.
        StoreError: the store could not be opened or read.
    """
    registry = REGISTRY if registry is None else registry
    interceptors = _interceptors(config, registry)  # a bad token table fails before anything
    certificates = _certificates(config)  # so do unreadable certificate files
    # The server is the one writer of task documents (RegisterTask, ReportTaskFailure,
    # UpdateTask): it keeps them instead of reading every one on each re-estimate.
    store = SketchStore.open(config.store, cache_task_documents=True)
    metrics = ServerMetrics(registry)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), name="gradmix-server",
                              daemon=True)
    thread.start()
    core = _Core(config, store, metrics, interceptors, certificates)
    try:
        port = asyncio.run_coroutine_threadsafe(core.start(), loop).result()
        try:
            endpoint = _metrics_endpoint(config, registry, core.certificates)
        except OSError as exc:
            raise ServerStartError(
                f"cannot serve /metrics on {config.host}:{config.metrics_port}: "
                f"{exc.strerror or exc} (set metrics_port, or 0 for a free one)") from exc
    except BaseException:
        asyncio.run_coroutine_threadsafe(core.stop(0), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10.0)
        core.executor.shutdown(wait=False, cancel_futures=True)
        raise
    running = RunningServer(core, loop, thread, port, endpoint)
    log.info("gradmix-server started on %s (%s)", running.address, describe_access(config))
    if config.insecure:
        log.warning("serving plaintext gRPC (insecure): tokens and data cross the network "
                    "unencrypted")
    return running, port


def main(argv: Sequence[str] | None = None) -> int:
    """`gradmix-server`: run until SIGTERM/SIGINT, then stop within the grace period."""
    try:
        config = load_config(sys.argv[1:] if argv is None else argv)
    except ServerConfigError as exc:
        print(f"gradmix-server: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server, port = build_server(config)
    except (ServerError, StoreError, OSError, ssl.SSLError) as exc:
        print(f"gradmix-server: {exc}", file=sys.stderr)
        return 1
    print(f"gradmix-server listening grpc={config.host}:{port} "
          f"metrics={config.host}:{server.metrics_port} store={config.store} "
          + (f"health={config.host}:{server.health_port} " if server.health_port else "")
          + f"access={describe_access(config)}", flush=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: draining for up to %.1f s", signal.Signals(signum).name,
                 config.grace_seconds)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1.0):
        pass
    server.stop(config.grace_seconds)
    return 0


__all__ = ["RunningServer", "ServerStartError", "build_server", "main"]


if __name__ == "__main__":
    sys.exit(main())
