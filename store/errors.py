"""Typed errors of the sketch store.

Every error the store raises derives from :class:`StoreError`; the ones that
describe bad input also derive from ``ValueError`` (or ``KeyError`` for a
missing object) so callers can catch them the standard way.

Each class names the gRPC status code it means (``code_name``, a
``grpc.StatusCode`` member name; the store itself never imports grpc). The
server's status table (`gradmix.server.instrumentation.status_of`) and the
client's direct-to-store path (`gradmix.client.sketch_writer`) both read it,
so one error gets one code whichever way the rows travelled.
"""

from __future__ import annotations

from typing import Any


class StoreError(Exception):
    """Base class of every sketch-store error: the store could not be read or written."""

    #: Name of the grpc.StatusCode this error means to a caller.
    code_name = "UNAVAILABLE"


class InvalidNameError(StoreError, ValueError):
    """A job, task, anchor or writer name breaks the naming rule."""

    code_name = "INVALID_ARGUMENT"


class InvalidSpecError(StoreError, ValueError):
    """A job spec (or its settings) is malformed."""

    code_name = "INVALID_ARGUMENT"


class InvalidRowsError(StoreError, ValueError):
    """Rows handed to a writer are malformed: wrong shape, dtype, non-finite, duplicated ids."""

    code_name = "INVALID_ARGUMENT"


class SpecMismatchError(StoreError):
    """An existing object was re-declared with a different value for one field.

    Attributes:
        field: the field that differs (e.g. ``"dim"``, ``"settings.policy"``, ``"step"``).
        stored: the value recorded in the store.
        requested: the value the caller asked for.
    """

    code_name = "ALREADY_EXISTS"

    def __init__(self, field: str, stored: Any, requested: Any, *, what: str = "") -> None:
        self.field = field
        self.stored = stored
        self.requested = requested
        prefix = f"{what}: " if what else ""
        super().__init__(
            f"{prefix}{field} differs from the stored value: "
            f"stored={stored!r} requested={requested!r}"
        )


class RecordNotFoundError(StoreError, KeyError):
    """A job, task, anchor or record does not exist."""

    code_name = "NOT_FOUND"

    def __str__(self) -> str:
        # KeyError quotes its argument; the message reads better as plain text.
        return str(self.args[0]) if self.args else ""


class StoreStateError(StoreError):
    """An operation conflicts with the store's state (e.g. a mixture version not above the last)."""

    code_name = "FAILED_PRECONDITION"

class StoreUnavailableError(StoreError):
    """The store refused a write (read-only, full, no permission, unreachable).

    Reads may still work; the write can be retried once the store takes writes again.

    Attributes:
        operation: what was being written (e.g. ``"put jobs/j/zarr.json"``).
        reason: the underlying error, as text.
    """

    code_name = "UNAVAILABLE"

    def __init__(self, operation: str, reason: str) -> None:
        self.operation = operation
        self.reason = reason
        super().__init__(f"sketch store is not writable ({operation}): {reason}")
