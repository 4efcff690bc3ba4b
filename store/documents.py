"""Group documents: the small JSON records (Zarr v3 group ``zarr.json`` keys) the
registry, anchors and mixture versions live in, read and written through a backend.

A document is written as one whole key (``StoreBackend.put`` or ``create``),
so a reader sees the old document or the new one, never a torn one, and a
group without its document (what a write killed half-way may leave on a
local disk) reads as no group at all.
"""

from __future__ import annotations

import json
from typing import Any

from gradmix.store.backend import StoreBackend
from gradmix.store.errors import StoreError
from gradmix.store.names import METADATA_KEY


def _group_doc(attributes: dict[str, Any]) -> bytes:
    doc = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
    return json.dumps(doc, allow_nan=False, sort_keys=True).encode()


def _key(path: str) -> str:
    return f"{path}/{METADATA_KEY}" if path else METADATA_KEY


class GroupDocs:
    """Synchronous access to group attribute documents, and the backend they live in."""

    def __init__(self, backend: StoreBackend) -> None:
        self.backend = backend

    def read(self, path: str) -> dict[str, Any] | None:
        """The attributes of the group at ``path``, or None if there is no group there."""
        data = self.backend.get(_key(path))
        if data is None:
            return None
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise StoreError(f"group document of {path!r} is not JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("node_type") != "group":
            raise StoreError(f"{path!r} is not a group in this store")
        attributes: dict[str, Any] = doc.get("attributes", {})
        return attributes

    def delete_tree(self, path: str) -> None:
        """Remove the group at ``path`` and every key under it."""
        self.backend.delete_tree(path)

    def write(self, path: str, attributes: dict[str, Any]) -> None:
        """Replace the group document at ``path`` whole."""
        self.backend.put(_key(path), _group_doc(attributes))

    def create(self, path: str, attributes: dict[str, Any]) -> dict[str, Any]:
        """Create the group at ``path`` unless one exists; return the attributes that won."""
        self.backend.create(_key(path), _group_doc(attributes))
        stored = self.read(path)
        if stored is None:  # pragma: no cover - a store that dropped the write
            raise StoreError(f"group {path!r} vanished right after it was created")
        return stored

    def ensure(self, path: str) -> None:
        """Create an attribute-less group at ``path`` if there is none."""
        if self.read(path) is None:
            self.create(path, {})

    def children(self, path: str) -> list[str]:
        """Names of the keys and sub-folders directly under ``path`` (unsorted), bookkeeping
        left out."""
        return self.backend.list_dir(path)
