"""The one place server errors become gRPC status codes, plus RPC metrics.

`RpcInstrumentation` wraps each method handler of a service once, when the
service is registered (`add_instrumented_service`): the wrapper times the
call, counts it by status code, and turns the domain errors raised by the
servicer, the estimator and the store into a status code and a message the
caller can act on. Anything unexpected is logged with its traceback and
answered INTERNAL. Request bytes that do not parse as the method's message are
INVALID_ARGUMENT (gRPC itself would answer INTERNAL), and a status message
never carries more than `MAX_DETAILS` characters, however long the input it
quotes. Wrapping at registration (rather than in a per-call
`aio.ServerInterceptor`) keeps the per-call cost to one coroutine frame.

The wrapper also keeps the task of every call in progress, so that the server's
stop can wait for them (`RpcInstrumentation.finish`): gRPC's own stop returns
once gRPC core holds no call, which can be before the handlers of calls whose
clients have left have run to their end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from gradmix.server.errors import InvalidArgumentError, ServerError
from gradmix.server.metrics import ServerMetrics
from gradmix.store import StoreError
from grpc import aio

log = logging.getLogger(__name__)

#: Longest status message sent; longer ones are cut (the full one is not logged either).
MAX_DETAILS = 1000


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status code and message for a domain error; None if unexpected.

    The table is the errors' own `code_name` (server errors and store errors
    alike); a store that cannot be read or written (a bare `StoreError`, an
    OSError) is UNAVAILABLE.
    """
    if isinstance(exc, ServerError):
        return grpc.StatusCode[exc.code_name], str(exc)
    if type(exc) is StoreError or isinstance(exc, OSError):
        return grpc.StatusCode.UNAVAILABLE, f"sketch store error: {exc}"
    if isinstance(exc, StoreError):
        return grpc.StatusCode[exc.code_name], str(exc)
    return None


class _MethodStats:
    """The metric children of one method, looked up once."""

    __slots__ = ("_counts", "_requests", "duration", "name")

    def __init__(self, metrics: ServerMetrics, name: str) -> None:
        self.name = name
        self.duration = metrics.rpc_duration.labels(name)
        self._requests = metrics.rpc_requests
        self._counts: dict[str, Any] = {}

    def count(self, code: str) -> None:
        child = self._counts.get(code)
        if child is None:
            child = self._counts[code] = self._requests.labels(self.name, code)
        child.inc()


class _CallOutcome:
    """Measures one call and records it when it ends."""

    __slots__ = ("_recorded", "_start", "_stats", "code")

    def __init__(self, stats: _MethodStats) -> None:
        self._stats = stats
        self._start = time.perf_counter()
        self._recorded = False
        self.code = "OK"

    def record(self) -> None:
        """Count the call once (before its status reaches the caller where possible)."""
        if self._recorded:
            return
        self._recorded = True
        self._stats.duration.observe(time.perf_counter() - self._start)
        self._stats.count(self.code)

    async def fail(self, exc: BaseException, context: aio.ServicerContext) -> None:
        """Abort the call with the status `exc` maps to (always raises)."""
        if isinstance(exc, asyncio.CancelledError):
            self.code = "CANCELLED"
            raise exc
        if isinstance(exc, aio.AbortError):  # aborted by the handler itself
            code = context.code()
            self.code = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            raise exc
        mapped = status_of(exc)
        if mapped is None:
            log.exception("unexpected error in %s", self._stats.name, exc_info=exc)
            mapped = (grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        self.code = mapped[0].name
        self.record()
        details = mapped[1]
        if len(details) > MAX_DETAILS:
            details = f"{details[:MAX_DETAILS]}… (message cut at {MAX_DETAILS} characters)"
        await context.abort(mapped[0], details)


class MalformedRequest:
    """Stands for request bytes that did not parse; the handler wrapper refuses it."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error

    def refuse(self) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"the request is not a valid protobuf message of this method "
            f"({type(self.error).__name__})")


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning a `MalformedRequest` instead of raising."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or bytes that are not UTF-8 in a string
            return MalformedRequest(exc)

    return parse


async def _parsed(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream that raises at the first malformed message."""
    async for request in requests:
        if isinstance(request, MalformedRequest):
            raise request.refuse()
        yield request


Handler = Callable[..., Any]


class RpcInstrumentation:
    """Error mapping and per-method RPC metrics, wrapped around method handlers."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._running: set[asyncio.Task[Any]] = set()

    async def finish(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for the calls still in progress, then cancel them.

        For after gRPC's `Server.stop`: a call whose client left while the server
        was busy can still be sending its status then (gRPC core counts it as
        over); stopping the event loop under it would leave its handler suspended,
        and asyncio logs an error for each one. Returns how many were cancelled.
        """
        running = [task for task in self._running if not task.done()]
        if not running:
            return 0
        _, late = await asyncio.wait(running, timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=timeout)
            log.warning("%d call(s) still running %.1f s after the server stopped were "
                        "cancelled", len(late), timeout)
        return len(late)

    def _track(self) -> None:
        """Keep the current call's task until it is done (for `finish`)."""
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def wrap(self, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler of method `name`, instrumented."""
        stats = _MethodStats(self._metrics, name)
        kwargs = {"request_deserializer": _lenient(handler.request_deserializer),
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _unary(stats, handler.unary_unary, self._track), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _unary(stats, handler.stream_unary, self._track, streaming_request=True),
                **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(stats, handler.unary_stream, self._track), **kwargs)
        return grpc.stream_stream_rpc_method_handler(
            _streaming(stats, handler.stream_stream, self._track), **kwargs)


def _unary(stats: _MethodStats, behavior: Handler, track: Callable[[], None], *,
           streaming_request: bool = False) -> Handler:
    async def call(request: Any, context: aio.ServicerContext) -> Any:
        track()
        outcome = _CallOutcome(stats)
        try:
            if isinstance(request, MalformedRequest):
                raise request.refuse()
            if streaming_request:
                request = _parsed(request)
            return await behavior(request, context)
        except BaseException as exc:
            await outcome.fail(exc, context)
        finally:
            outcome.record()

    return call


def _streaming(stats: _MethodStats, behavior: Handler, track: Callable[[], None]) -> Handler:
    async def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        track()
        outcome = _CallOutcome(stats)
        try:
            if isinstance(request, MalformedRequest):
                raise request.refuse()
            async for response in behavior(request, context):
                yield response
        except BaseException as exc:
            if isinstance(exc, GeneratorExit):
                outcome.code = "CANCELLED"
                raise
            await outcome.fail(exc, context)
        finally:
            outcome.record()

    return call


class _Registration:
    """Stands in for the server while generated code registers a service."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the same handlers arrive by `add_registered_method_handlers`."""

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service = service
        self.handlers = dict(handlers)


def add_instrumented_service(add_to_server: Callable[[Any, Any], None], servicer: Any,
                             server: aio.Server, instrumentation: RpcInstrumentation) -> None:
    """Register `servicer` (with its generated `add_..._to_server`) with every method wrapped."""
    registration = _Registration()
    add_to_server(servicer, registration)
    if not registration.handlers:
        raise RuntimeError("generated code did not register method handlers")
    wrapped = {name: instrumentation.wrap(name, handler)
               for name, handler in registration.handlers.items()}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(registration.service, wrapped),))
    server.add_registered_method_handlers(registration.service, wrapped)
