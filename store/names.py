"""Names: the one rule for job, task, anchor and writer names, and the store's own keys.

Names become path segments in the store, so anything that could escape the
root or collide with a key the store keeps for itself is refused before it
reaches a path. The store's bookkeeping lives outside the user's namespace:

- Zarr's metadata key ``zarr.json`` (refused as a name);
- temporaries of a write in progress: ``.<anything>`` (our own, which a
  name can never be, since names start with a letter or digit) and
  ``<anything>.partial`` (Zarr's, which a name may not end with).

:func:`is_bookkeeping` is what listings use to leave those out; it is the
complement of what :func:`validate_name` accepts for any key a listing can
meet, so a valid name is never hidden and a temporary is never listed.
"""

from __future__ import annotations

import re
import uuid

from gradmix.store.errors import InvalidNameError
from gradmix.vocabulary import TARGET

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Allowed names: 1-128 characters, letters/digits first, then letters, digits, ``._-``."""

METADATA_KEY = "zarr.json"
"""Zarr's metadata key; a node of that name would clash with it."""

PARTIAL_SUFFIX = ".partial"
"""Suffix of the temporaries Zarr's local store writes before a rename."""


def is_bookkeeping(name: str) -> bool:
    """True for a key the store keeps for itself (never a job, task, anchor or writer)."""
    return name == METADATA_KEY or name.startswith(".") or name.endswith(PARTIAL_SUFFIX)


def scratch_name(final: str) -> str:
    """A unique temporary name to write ``final``'s bytes under before it is published."""
    return f".{final}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"


def validate_name(name: object, kind: str = "name") -> str:
    """Return ``name`` if it is a valid store name, else raise.

    Args:
        name: the candidate name.
        kind: what the name is for ("job", "task", ...), used in the message.

    Returns:
        The name, unchanged.

    Raises:
        InvalidNameError: the name is not a string, does not match
            ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$``, contains ``..``, or is one
            of the store's own keys (``zarr.json``, ``*.partial``).
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"{kind} name must be a string, got {type(name).__name__}")
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidNameError(
            f"invalid {kind} name {name[:140]!r}: must match {NAME_PATTERN.pattern}"
        )
    if ".." in name:
        raise InvalidNameError(f"invalid {kind} name {name!r}: must not contain '..'")
    if is_bookkeeping(name):
        raise InvalidNameError(
            f"invalid {kind} name {name!r}: 'zarr.json' and names ending in "
            f"'{PARTIAL_SUFFIX}' are reserved for the store's own keys"
        )
    if kind == "task" and name == TARGET:
        raise InvalidNameError(f"invalid task name {name!r}: it names the job's target")
    return name
