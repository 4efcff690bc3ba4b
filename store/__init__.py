"""The sketch store: the one module that owns the Zarr layout of sketches and mixtures.

Trainers append sketch rows through :class:`RowWriter`; the server reads
committed rows incrementally and keeps the mixture history here. Nothing
outside this package knows the layout. Where the bytes live is a backend
(:mod:`gradmix.store.backend`): a local directory or an fsspec URL.
"""

from gradmix.store.errors import (
    InvalidNameError,
    InvalidRowsError,
    InvalidSpecError,
    RecordNotFoundError,
    SpecMismatchError,
    StoreError,
    StoreStateError,
    StoreUnavailableError,
)
from gradmix.store.names import validate_name
from gradmix.store.records import (
    AnchorInfo,
    AppendResult,
    CalibrationRecord,
    Horizon,
    JobControl,
    JobEvent,
    JobInfo,
    MixtureRecord,
    ReadCursor,
    Rows,
    TaskInfo,
)
from gradmix.store.sketch_store import SketchStore
from gradmix.store.writer import RowWriter
from gradmix.vocabulary.sketch_spec import SketchSpec, SketchSpecError

__all__ = [
    "AnchorInfo",
    "AppendResult",
    "CalibrationRecord",
    "Horizon",
    "InvalidNameError",
    "InvalidRowsError",
    "InvalidSpecError",
    "JobControl",
    "JobEvent",
    "JobInfo",
    "MixtureRecord",
    "ReadCursor",
    "RecordNotFoundError",
    "RowWriter",
    "Rows",
    "SketchSpec",
    "SketchSpecError",
    "SketchStore",
    "SpecMismatchError",
    "StoreError",
    "StoreStateError",
    "StoreUnavailableError",
    "TaskInfo",
    "validate_name",
]
