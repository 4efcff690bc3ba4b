"""The local-directory backend: keys are files under a root directory.

Every write is a plain system call sequence, so what a killed process leaves
behind is easy to state:

- ``put`` writes a scratch file beside the key and renames it over the key;
- ``create`` writes a scratch file and hard-links it to the key (``link``
  fails if the key exists, so of two racing creators exactly one wins), then
  removes the scratch. A kill before the link leaves the key absent and, at
  most, a new empty folder and a scratch file, both invisible to readers;
- a commit marker is created in place with ``O_EXCL``: its name is the
  information, and it appears whole in a listing or not at all;
- chunk writes put new rows' bytes into the chunk file at their offset
  (created at full size on first use), so committed bytes are never rewritten
  and nothing is renamed over an existing file (which ext4 turns into a
  data flush per call).

Scratch files are named by :func:`gradmix.store.names.scratch_name` and left
out of listings by :func:`gradmix.store.names.is_bookkeeping`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from gradmix.store.backend import ChunkPiece, StoreBackend
from gradmix.store.names import is_bookkeeping, scratch_name
from zarr.abc.store import Store
from zarr.storage import LocalStore

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL


class LocalBackend(StoreBackend):
    """A store in a local directory (created if missing)."""

    writes_in_place = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        with self.writing(f"create the store folder {self.root}"):
            os.makedirs(self.root, exist_ok=True)
        self._zarr = LocalStore(self.root)

    @property
    def zarr_store(self) -> Store:
        return self._zarr

    def identity(self) -> str:
        return f"file:{self.root.resolve()}"

    def get(self, key: str) -> bytes | None:
        try:
            with open(self.root / key, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def get_ranges(self, spans: Sequence[tuple[str, int, int]]) -> list[bytes]:
        blobs = []
        for key, offset, length in spans:
            try:
                with open(self.root / key, "rb") as f:
                    f.seek(offset)
                    blobs.append(f.read(length))
            except FileNotFoundError:
                blobs.append(b"")
        return blobs

    def list_dir(self, prefix: str) -> list[str]:
        try:
            names = os.listdir(self.root / prefix)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [n for n in names if not is_bookkeeping(n)]

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        with self.writing(f"put {key}"):
            scratch = self._scratch(path, data)
            try:
                os.replace(scratch, path)
            except OSError:
                _discard(scratch)
                raise

    def create(self, key: str, data: bytes) -> bool:
        path = self.root / key
        with self.writing(f"create {key}"):
            scratch = self._scratch(path, data)
            try:
                os.link(scratch, path)
                created = True
            except FileExistsError:
                created = False
            except OSError:
                _discard(scratch)
                raise
            os.unlink(scratch)
        return created

    def create_marker(self, key: str, data: bytes) -> None:
        path = self.root / key
        with self.writing(f"commit {key}"):
            try:
                fd = self._open_new(path)
            except FileExistsError:
                return  # left by a writer killed right after creating it: same count
            try:
                with contextlib.suppress(OSError):  # the name is the commit; the body is a note
                    os.write(fd, data)
            finally:
                os.close(fd)

    def delete(self, key: str) -> None:
        with self.writing(f"delete {key}"), contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / key)

    def write_pieces(self, pieces: Sequence[ChunkPiece]) -> None:
        for piece in pieces:
            with self.writing(f"write {piece.key}"):
                _write_in_place(self.root / piece.key, piece)

    def _scratch(self, path: Path, data: bytes) -> Path:
        """Write ``data`` to a new scratch file beside ``path`` (creating the folder)."""
        scratch = path.with_name(scratch_name(path.name))
        fd = self._open_new(scratch)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:  # a full disk: leave nothing behind (a kill may, hidden from listings)
            os.close(fd)
            _discard(scratch)
            raise
        os.close(fd)
        return scratch

    @staticmethod
    def _open_new(path: Path) -> int:
        try:
            return os.open(path, _NEW_FILE, 0o644)
        except FileNotFoundError:
            os.makedirs(path.parent, exist_ok=True)
            return os.open(path, _NEW_FILE, 0o644)


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _write_in_place(path: Path, piece: ChunkPiece) -> None:
    """Write new rows into a chunk file at their offset; create it at full size if missing."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except FileNotFoundError:
        os.makedirs(path.parent, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, piece.data, piece.offset)
        if os.fstat(fd).st_size < piece.chunk_nbytes:
            os.ftruncate(fd, piece.chunk_nbytes)
    finally:
        os.close(fd)
