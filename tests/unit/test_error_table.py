"""One error table: every domain error has one status code, on every path.

The server answers a store or server error with the code the error class
names (`code_name`); the client's direct-to-store path raises the client
error for that same code. A new error class is covered automatically.
"""

from __future__ import annotations

import grpc
import pytest
from gradmix.client.sketch_writer import _store_error
from gradmix.server import errors as server_errors
from gradmix.server.instrumentation import status_of
from gradmix.store import errors as store_errors


def _subclasses(base: type) -> list[type]:
    found = []
    for cls in base.__subclasses__():
        found += [cls, *_subclasses(cls)]
    return found


def _instance(cls: type[Exception]) -> Exception:
    if issubclass(cls, store_errors.SpecMismatchError):
        return cls("dim", 16, 32)
    if issubclass(cls, store_errors.StoreUnavailableError):
        return cls("put jobs/j/zarr.json", "read-only file system")
    return cls("detail")


STORE = [store_errors.StoreError, *_subclasses(store_errors.StoreError)]
SERVER = [server_errors.ServerError, *_subclasses(server_errors.ServerError)]


@pytest.mark.parametrize("cls", STORE + SERVER, ids=lambda c: c.__name__)
def test_the_server_answers_the_code_the_error_names(cls: type[Exception]) -> None:
    status = status_of(_instance(cls))
    assert status is not None
    assert status[0] == grpc.StatusCode[cls.code_name]  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", STORE, ids=lambda c: c.__name__)
def test_the_direct_store_path_raises_the_same_code(cls: type[Exception]) -> None:
    assert _store_error(_instance(cls)).code == grpc.StatusCode[cls.code_name]  # type: ignore[attr-defined]


def test_an_unreachable_store_is_unavailable_on_both_paths() -> None:
    error = PermissionError("read-only file system")
    assert status_of(error) == (grpc.StatusCode.UNAVAILABLE, f"sketch store error: {error}")
    assert _store_error(error).code == grpc.StatusCode.UNAVAILABLE


def test_rows_of_the_wrong_dimension_are_an_invalid_argument_everywhere() -> None:
    assert server_errors.DimensionMismatchError.code_name == "INVALID_ARGUMENT"
    assert store_errors.InvalidRowsError.code_name == "INVALID_ARGUMENT"


def test_unexpected_errors_are_not_in_the_table() -> None:
    assert status_of(ZeroDivisionError("bug")) is None
