"""Errors raised on the server side.

Every domain error derives from `ServerError`. The gRPC servicer is the one
place that maps them to status codes (see `code_name` on each class); nothing
else in the server knows about gRPC.
"""

from __future__ import annotations


class ServerError(Exception):
    """Base of every error the server raises on purpose."""

    #: Name of the grpc.StatusCode this error maps to in the servicer.
    code_name = "INTERNAL"


class InvalidArgumentError(ServerError, ValueError):
    """The caller sent something malformed: a bad name, shape, or value."""

    code_name = "INVALID_ARGUMENT"


class NonFiniteError(InvalidArgumentError):
    """Sketch rows (or weights) contain NaN or Inf."""


class EmptyTaskError(InvalidArgumentError):
    """A task (or the target) was given zero rows."""


class DimensionMismatchError(InvalidArgumentError):
    """Arrays whose dimension disagrees with the job's projection dim.

    INVALID_ARGUMENT, as the store answers the same rows on the direct path:
    the rows are malformed for the job, whatever its state.
    """


class NotFoundError(ServerError, KeyError):
    """A job, task, anchor or mixture version that does not exist."""

    code_name = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnknownTaskError(NotFoundError):
    """A subset or mixture names a task the estimator does not have."""


class AlreadyExistsError(ServerError):
    """A job or task exists with a different spec."""

    code_name = "ALREADY_EXISTS"


class PreconditionError(ServerError):
    """The request is valid but the state does not allow it yet.

    Examples: estimating at an anchor that is not complete, or before the
    target has been sketched.
    """

    code_name = "FAILED_PRECONDITION"


class ConvergenceError(ServerError):
    """An iterative solver (the estimator's exact mode) did not converge."""

    code_name = "INTERNAL"


class LimitExceededError(ServerError):
    """A count or cost past one of the server's limits (`gradmix.server.limits`)."""

    code_name = "RESOURCE_EXHAUSTED"


class QueryDeadlineError(ServerError):
    """A query ran past its deadline (the client's, or the server's query timeout)."""

    code_name = "DEADLINE_EXCEEDED"


class ShuttingDownError(ServerError):
    """The server is stopping: the caller should reconnect (to this or another replica)."""

    code_name = "UNAVAILABLE"
