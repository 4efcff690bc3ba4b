"""`SketchWriter`: how a trainer hands its sketch rows to gradmix.

With store access (the fast path), rows are appended through the store's
`RowWriter` (data first, committed count last) and the server is told the
writer's new committed total with CommitSketch; the server then reads them
from the store. Without store access, the rows travel over gRPC
(UploadSketch) and the server writes them. Either way a re-sent example id is
never stored twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from gradmix.client.client import SelectionClient
from gradmix.client.errors import GradmixError, error_class

if TYPE_CHECKING:
    from gradmix.store import SketchStore


def _store_error(error: Exception) -> GradmixError:
    """The client error for a failure on the direct-to-store path.

    A store error carries the status code the server would answer with
    (`code_name`, the one table); a store that cannot be reached or written
    (an OSError, a bare StoreError) is Unavailable, as over gRPC.
    """
    code = grpc.StatusCode[getattr(error, "code_name", "UNAVAILABLE")]
    details = f"sketch store error: {error}" if code is grpc.StatusCode.UNAVAILABLE else str(error)
    return error_class(code)(details, code=code)


def _is_store_failure(error: Exception) -> bool:
    from gradmix.store import StoreError

    return isinstance(error, StoreError | OSError)


class SketchWriter:
    """Writes one writer's sketch rows of one source (a task or the target).

    Args:
        client: The client of the job's server.
        job: The job.
        anchor: The anchor the gradients were taken at.
        task: The task, or None for the target.
        writer: This writer's id, unique per process (e.g. "rank-3").
        store: The job's sketch store, if this process can reach it.

    Raises:
        NotFound: (store path) The job, anchor or task is unknown to the store.
    """

    def __init__(
        self,
        client: SelectionClient,
        job: str,
        anchor: str,
        task: str | None,
        writer: str,
        store: SketchStore | None = None,
    ) -> None:
        self.client, self.job, self.anchor, self.task, self.writer = (
            client, job, anchor, task, writer,
        )
        self.total_rows = 0
        """The source's committed rows, all writers, as of the last store-path write."""
        self._rows: Any = None
        if store is not None:
            try:
                self._rows = store.writer(job, anchor, task, writer)
            except Exception as error:
                if _is_store_failure(error):
                    raise _store_error(error) from error
                raise

    @property
    def via_store(self) -> bool:
        """Whether rows go through the store (else over gRPC)."""
        return self._rows is not None

    def write(self, grads: np.ndarray, values: np.ndarray, example_ids: np.ndarray) -> int:
        """Store rows and make them visible to the server.

        Args:
            grads: (n, dim) projected gradients.
            values: (n,) values f(x).
            example_ids: (n,) unique integer ids; ids already stored are skipped.

        Returns:
            Rows newly stored by this call.

        Raises:
            InvalidArgument: Bad shapes, dtypes or non-finite values.
            GradmixError: The commit or upload failed.
        """
        if self._rows is None:
            return self.client.upload_sketch(
                self.job, self.anchor, self.task, self.writer, grads, values, example_ids
            )
        try:
            result = self._rows.append(grads, values, example_ids)
        except Exception as error:
            if _is_store_failure(error):
                raise _store_error(error) from error
            raise
        self.total_rows = self.client.commit_sketch(
            self.job, self.anchor, self.task, self.writer, result.committed
        )
        return int(result.written)
