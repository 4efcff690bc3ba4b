"""Errors raised by the gradmix client.

Every error the client raises on purpose derives from `GradmixError`, which
carries the gRPC status code (`.code`) and the server's message (`.details`).
RPC failures are mapped back to the subclass for their code by
`from_rpc_error`; errors the client detects locally (a bad argument, a sampler
misuse) use the same classes with the code the server would have used.

One exception: a `SketchSpec` is the shared vocabulary's
(`gradmix.vocabulary.sketch_spec`, also the store's), so building one with a
bad field raises its `SketchSpecError` (a ValueError whose `code_name` is
INVALID_ARGUMENT), re-exported as `gradmix.client.SketchSpecError`.
"""

from __future__ import annotations

import grpc


class GradmixError(Exception):
    """Base of every error the gradmix client raises on purpose.

    Attributes:
        code: The gRPC status code of the failure.
        details: The human-readable message (the server's, for RPC errors).
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        self.code: grpc.StatusCode = code if code is not None else self.default_code

    def __str__(self) -> str:
        return self.details


class InvalidArgument(GradmixError, ValueError):
    """The request was malformed: a bad name, shape, value or option."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GradmixError, LookupError):
    """A job, task, anchor or mixture version that does not exist."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(GradmixError):
    """A job or task exists already with a different spec."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(GradmixError):
    """The request is valid but the job's state does not allow it yet."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(GradmixError):
    """The server could not be reached (retried where that was safe)."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(GradmixError):
    """The call did not finish within its deadline."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(GradmixError):
    """The caller is known but not allowed to do this."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(GradmixError):
    """The call carried no valid credentials (token)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class Cancelled(GradmixError):
    """The call was cancelled (usually by the client closing)."""

    default_code = grpc.StatusCode.CANCELLED


class Internal(GradmixError):
    """The server failed in a way that is not the caller's fault."""

    default_code = grpc.StatusCode.INTERNAL


class SamplerError(InvalidArgument):
    """A mixture or schedule the sampler cannot use (bad weights, step order)."""


class UnknownTaskError(SamplerError):
    """A mixture names a task outside the sampler's known task set."""


class NoMixtureError(FailedPrecondition):
    """A draw was asked for before any mixture was in force."""


_BY_CODE: dict[grpc.StatusCode, type[GradmixError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        PermissionDenied,
        Unauthenticated,
        Cancelled,
        Internal,
    )
}


def error_class(code: grpc.StatusCode) -> type[GradmixError]:
    """The typed error for a status code (the base class for codes without one)."""
    return _BY_CODE.get(code, GradmixError)


def from_rpc_error(error: grpc.RpcError) -> GradmixError:
    """Map a failed gRPC call to the typed error for its status code.

    Args:
        error: The exception grpc raised (it is also a `grpc.Call`).

    Returns:
        The `GradmixError` subclass for the code (the base class, with the
        code set, for codes without a subclass), carrying the server's details.
    """
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else None
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    cls = error_class(code)
    return cls(details or code.name.lower().replace("_", " "), code=code)
