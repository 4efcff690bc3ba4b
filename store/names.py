"""Name validation: the one rule for job, task, anchor and writer names.

Names become path segments in the store, so anything that could escape the
root or collide with Zarr's own keys is refused before it reaches a path.
"""

from __future__ import annotations

import re

from gradmix.store.errors import InvalidNameError
from gradmix.vocabulary import TARGET

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Allowed names: 1-128 characters, letters/digits first, then letters, digits, ``._-``."""

_RESERVED = frozenset({"zarr.json"})
"""Names Zarr uses for its own metadata keys; a node of that name would clash with them."""


def validate_name(name: object, kind: str = "name") -> str:
    """Return ``name`` if it is a valid store name, else raise.

    Args:
        name: the candidate name.
        kind: what the name is for ("job", "task", ...), used in the message.

    Returns:
        The name, unchanged.

    Raises:
        InvalidNameError: the name is not a string, does not match
            ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$``, contains ``..`` or is reserved.
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"{kind} name must be a string, got {type(name).__name__}")
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidNameError(
            f"invalid {kind} name {name!r}: must match {NAME_PATTERN.pattern}"
        )
    if ".." in name:
        raise InvalidNameError(f"invalid {kind} name {name!r}: must not contain '..'")
    if name in _RESERVED:
        raise InvalidNameError(f"invalid {kind} name {name!r}: reserved by the store format")
    if kind == "task" and name == TARGET:
        raise InvalidNameError(f"invalid task name {name!r}: it names the job's target")
    return name
