"""Sketch sources and rows as they arrive over gRPC, checked before the store sees them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server.errors import (
    DimensionMismatchError,
    EmptyTaskError,
    InvalidArgumentError,
    NonFiniteError,
)
from gradmix.server.limits import Limits


@dataclass(frozen=True)
class SourceRef:
    """Which rows: `task` at `anchor` of `job` (task None = the target)."""

    job: str
    anchor: str
    task: str | None

    def describe(self) -> str:
        what = "the target" if self.task is None else f"task {self.task!r}"
        return f"{what} at anchor {self.anchor!r} of job {self.job!r}"


def source_ref(source: pb.SketchSource) -> SourceRef:
    """Parse a SketchSource; it must name a task or set `target: true`.

    Raises:
        InvalidArgumentError: neither (or target false).
    """
    kind = source.WhichOneof("source")
    if kind == "task":
        return SourceRef(source.job, source.anchor, source.task)
    if kind == "target" and source.target:
        return SourceRef(source.job, source.anchor, None)
    raise InvalidArgumentError("the sketch source must name a task or set target=true")


@dataclass(frozen=True)
class DecodedRows:
    grads: np.ndarray        # (n, dim) float32
    values: np.ndarray       # (n,) float64
    example_ids: np.ndarray  # (n,) int64


def row_problems(grads: np.ndarray, values: np.ndarray, limits: Limits
                 ) -> tuple[np.ndarray, str]:
    """The one check of sketch rows' contents, on every path rows reach an estimator.

    Returns:
        A mask of the rows that break a bound (NaN or Inf anywhere, |value| above
        `max_value_abs`, gradient norm above `max_row_norm`) and a message that
        names the first kind found ("" when no row is bad).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(np.asarray(grads, dtype=np.float64), axis=1)
        finite = np.isfinite(norms) & np.isfinite(values)
        too_large = ~(np.abs(values) <= limits.max_value_abs)
        too_long = ~(norms <= limits.max_row_norm)
    if not finite.all():
        return ~finite, "contain NaN or Inf"
    if too_large.any():
        first = float(values[np.flatnonzero(too_large)[0]])
        return too_large | too_long, (
            f"have |value| above max_value_abs {limits.max_value_abs:g} (e.g. {first:g})")
    if too_long.any():
        first = float(norms[np.flatnonzero(too_long)[0]])
        return too_long, (
            f"have a gradient norm above max_row_norm {limits.max_row_norm:g} (e.g. {first:g})")
    return too_long, ""


def decode_rows(rows: pb.SketchRows, dim: int, limits: Limits) -> DecodedRows:
    """Check a SketchRows chunk against the job's dim and the limits, and decode it.

    Raises:
        DimensionMismatchError: rows.dim is not the job's projection dim.
        EmptyTaskError: a chunk without rows.
        InvalidArgumentError: lengths that disagree, or a row past a bound.
        NonFiniteError: a NaN or Inf gradient entry or value.
    """
    if rows.dim != dim:
        raise DimensionMismatchError(
            f"rows have dim {rows.dim} but the job's projection dim is {dim}: sketch with "
            "the job's SketchSpec")
    n = len(rows.values)
    if n == 0:
        raise EmptyTaskError("a rows chunk must carry at least one row")
    if len(rows.example_ids) != n:
        raise InvalidArgumentError(
            f"a rows chunk has {n} values but {len(rows.example_ids)} example_ids")
    expected = n * dim * 4
    if len(rows.grads) != expected:
        raise InvalidArgumentError(
            f"grads has {len(rows.grads)} bytes; {n} rows × dim {dim} × 4 bytes (float32) "
            f"= {expected} expected")
    grads = np.frombuffer(rows.grads, dtype="<f4").reshape(n, dim).astype(np.float32)
    values = np.asarray(rows.values, dtype=np.float64)
    bad, problem = row_problems(grads, values, limits)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        error = NonFiniteError if "NaN" in problem else InvalidArgumentError
        raise error(
            f"{int(bad.sum())} row(s) {problem} (first: row {first}, example id "
            f"{rows.example_ids[first]}); nothing of this chunk was stored")
    return DecodedRows(grads, values, np.asarray(rows.example_ids, dtype=np.int64))


def encode_rows(grads: np.ndarray, values: np.ndarray, example_ids: np.ndarray) -> pb.SketchRows:
    """The SketchRows message for float arrays (the inverse of `decode_rows`)."""
    grads32 = np.ascontiguousarray(grads, dtype="<f4")
    return pb.SketchRows(dim=grads32.shape[1], grads=grads32.tobytes(),
                         values=[float(v) for v in values],
                         example_ids=[int(i) for i in example_ids])
