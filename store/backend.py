"""The key/value layer under the store: opening a Zarr store from a URL, and the
small JSON group documents (attributes) the registry and commit markers live in.

Group documents are written as whole Zarr v3 ``zarr.json`` keys in one ``set``:
LocalStore writes a key to a temporary file and renames it over the old one, and
an object store PUT replaces an object whole, so a reader sees either the old
document or the new one, never a torn one. That atomic replace is what commit
markers rely on.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradmix.store.errors import StoreError
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

_METADATA_KEY = "zarr.json"


def open_zarr_store(url: str, storage_options: Mapping[str, Any] | None = None) -> Store:
    """Open a local directory (created if missing) or an fsspec URL as a Zarr store.

    Args:
        url: a filesystem path or ``file://`` URL (the embedded default), or any
            fsspec URL: ``memory://name`` (tests), ``s3://bucket/prefix`` (needs
            the ``s3`` extra, ``pip install 'gradmix[s3]'``; credentials come from
            the usual AWS environment/config, or ``storage_options``), ``gs://``,
            ``abfs://`` and so on with their fsspec packages.
        storage_options: passed to the fsspec filesystem (e.g. ``{"anon": False,
            "endpoint_url": "http://minio:9000"}``); not allowed for local paths.

    Raises:
        StoreError: the URL cannot be opened.
    """
    if not isinstance(url, str) or not url:
        raise StoreError(f"store URL must be a non-empty string, got {url!r}")
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" not in url:
        if storage_options:
            raise StoreError("storage_options apply to fsspec URLs, not to local paths")
        root = Path(url).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        return LocalStore(root)
    try:
        return FsspecStore.from_url(url, storage_options=dict(storage_options or {}))
    except (ImportError, ValueError, TypeError) as exc:
        raise StoreError(f"cannot open store {url!r}: {exc}") from exc


def store_identity(store: Store) -> str:
    """A string naming where a store's data lives (equal for two opens of the same place)."""
    if isinstance(store, LocalStore):
        return f"file:{Path(store.root).resolve()}"
    if isinstance(store, FsspecStore):
        protocol = store.fs.protocol
        name = protocol if isinstance(protocol, str) else protocol[0]
        return f"{name}:{store.path}"
    return f"{type(store).__name__}:{id(store)}"


def _group_doc(attributes: dict[str, Any]) -> bytes:
    doc = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
    return json.dumps(doc, allow_nan=False, sort_keys=True).encode()


def _key(path: str) -> str:
    return f"{path}/{_METADATA_KEY}" if path else _METADATA_KEY


class GroupDocs:
    """Synchronous access to group attribute documents in a Zarr store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._proto = default_buffer_prototype()

    def read(self, path: str) -> dict[str, Any] | None:
        """The attributes of the group at ``path``, or None if there is no group there."""
        get_sync = getattr(self.store, "get_sync", None)
        if get_sync is not None:  # a direct read, no hop to Zarr's event loop
            buf = get_sync(_key(path), prototype=self._proto)
        else:
            buf = sync(self.store.get(_key(path), prototype=self._proto))
        if buf is None:
            return None
        doc = json.loads(buf.to_bytes())
        if doc.get("node_type") != "group":
            raise StoreError(f"{path!r} is not a group in this store")
        attributes: dict[str, Any] = doc.get("attributes", {})
        return attributes

    def write(self, path: str, attributes: dict[str, Any]) -> None:
        """Replace the group document at ``path`` in one atomic ``set``."""
        value = self._proto.buffer.from_bytes(_group_doc(attributes))
        set_sync = getattr(self.store, "set_sync", None)
        if set_sync is not None:  # the same atomic put as Store.set, without the loop hop
            set_sync(_key(path), value)
        else:
            sync(self.store.set(_key(path), value))

    def create(self, path: str, attributes: dict[str, Any]) -> dict[str, Any]:
        """Create the group at ``path`` unless one exists; return the attributes that won.

        On a local directory the create is exclusive (a hard link that fails if
        the key exists), so of two racing creators exactly one wins and both
        get its attributes back. On object storage it is check-then-put: two
        processes declaring the same object at the same instant with different
        values may both succeed, the last put winning (the server is the one
        process that declares jobs, tasks and anchors in a deployment).
        """
        value = self._proto.buffer.from_bytes(_group_doc(attributes))
        sync(self.store.set_if_not_exists(_key(path), value))
        stored = self.read(path)
        if stored is None:  # pragma: no cover - a store that dropped the write
            raise StoreError(f"group {path!r} vanished right after it was created")
        return stored

    def ensure(self, path: str) -> None:
        """Create an attribute-less group at ``path`` if there is none."""
        if self.read(path) is None:
            self.create(path, {})

    def children(self, path: str) -> list[str]:
        """Names of the keys and sub-folders directly under ``path`` (unsorted).

        Zarr's metadata key and the ``.partial`` temporaries a killed write may
        leave behind are left out.
        """
        if isinstance(self.store, LocalStore):
            try:
                names = os.listdir(self.store.root / path)
            except (FileNotFoundError, NotADirectoryError):
                names = []
        else:

            async def collect() -> list[str]:
                return [name async for name in self.store.list_dir(path)]

            names = sync(collect())
        return [n for n in names if n != _METADATA_KEY and not n.endswith(".partial")]

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (an atomic whole-key write)."""
        value = self._proto.buffer.from_bytes(data)
        set_sync = getattr(self.store, "set_sync", None)
        if set_sync is not None:
            set_sync(key, value)
        else:
            sync(self.store.set(key, value))

    def create_marker(self, key: str, data: bytes) -> None:
        """Create a new key whose existence is what matters (a commit marker).

        On a local directory the file is created in place (O_EXCL), not written
        aside and renamed: its name is the information, and it appears whole
        in a directory listing or not at all. Elsewhere it is an ordinary put.
        """
        if not isinstance(self.store, LocalStore):
            self.put(key, data)
            return
        path = self.store.root / key
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            return  # left by a writer killed right after creating it: same count
        try:
            with contextlib.suppress(OSError):  # the name is the commit; the body is a note
                os.write(fd, data)
        finally:
            os.close(fd)

    def delete(self, key: str) -> None:
        """Remove ``key`` if it exists."""
        delete_sync = getattr(self.store, "delete_sync", None)
        if delete_sync is not None:
            delete_sync(key)
        else:
            sync(self.store.delete(key))

    def delete_tree(self, path: str) -> None:
        """Remove every key under ``path`` (a whole group and what it holds)."""
        sync(self.store.delete_dir(path))
