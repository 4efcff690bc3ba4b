"""Value types the store hands in and out: infos, rows, cursors, mixture records.

A job's `SketchSpec` is the vocabulary's (`gradmix.vocabulary.sketch_spec`),
re-exported by `gradmix.store`; the store keeps it as `SketchSpec.to_document` writes it and
reads it back with `SketchSpec.from_document`, so a spec stored before a field
existed means that field's wire-unspecified value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from gradmix.store.errors import InvalidSpecError, StoreStateError
from gradmix.vocabulary import TaskState, choices
from gradmix.vocabulary.sketch_spec import SketchSpec

TASK_STATES = choices(TaskState)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclass(frozen=True)
class JobInfo:
    """A job as recorded in the store."""

    name: str
    spec: SketchSpec
    settings: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class TaskInfo:
    """A registered task (an auxiliary data source) of a job.

    `retired_at` is when an operator retired it (0.0: it is not retired).
    """

    name: str
    metadata: dict[str, str]
    registered_at: float
    failure: str = ""
    """Why its data cannot be loaded, as a trainer reported it ("" if it can)."""
    retired_at: float = 0.0
    """When an operator retired it (0: it is not retired)."""


@dataclass(frozen=True, kw_only=True)
class Horizon:
    """How far training moves from an anchor before the next one, as the trainer plans it.

    The server derives the estimate's a-priori ridge weight λ₀ from it
    (`gradmix.server.calibration`).

    Attributes:
        learning_rate: the optimizer's learning rate at the anchor (> 0).
        steps: optimizer steps until the next anchor (>= 1).
        optimizer: the optimizer's name, lower case ("adamw", "adam", "sgd", ...).
        parameters: p, the number of sketched parameters (0: not given).
    """

    learning_rate: float
    steps: int
    optimizer: str
    parameters: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.learning_rate, bool) or not isinstance(
            self.learning_rate, int | float | np.number
        ):
            raise InvalidSpecError(
                f"horizon learning_rate must be a number, got {self.learning_rate!r}"
            )
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise InvalidSpecError(
                f"horizon learning_rate must be positive and finite, got {self.learning_rate!r}"
            )
        if not _is_int(self.steps) or self.steps < 1:
            raise InvalidSpecError(f"horizon steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.optimizer, str) or not self.optimizer.strip():
            raise InvalidSpecError(
                f"horizon optimizer must be a non-empty name, got {self.optimizer!r}"
            )
        if not _is_int(self.parameters) or self.parameters < 0:
            raise InvalidSpecError(
                f"horizon parameters must be a non-negative integer, got {self.parameters!r}"
            )
        object.__setattr__(self, "learning_rate", float(self.learning_rate))
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "optimizer", self.optimizer.strip().lower())
        object.__setattr__(self, "parameters", int(self.parameters))

    def to_dict(self) -> dict[str, Any]:
        """The horizon as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Horizon:
        """Rebuild a horizon stored with :meth:`to_dict`."""
        return cls(
            learning_rate=float(doc["learning_rate"]),
            steps=int(doc["steps"]),
            optimizer=str(doc["optimizer"]),
            parameters=int(doc.get("parameters", 0)),
        )


@dataclass(frozen=True)
class AnchorInfo:
    """An anchor (checkpoint sketches are taken at) of a job.

    `horizon` is None when the anchor was declared without one (and for
    anchors declared before horizons existed). `run` names the training run
    that declared it ("" when none was given). `untrained_loss` is the
    target loss of an untrained model as the declaring trainer gave it
    (log of its vocabulary size; 0.0 when not given).
    """

    name: str
    step: int
    state: str
    declared_at: float
    horizon: Horizon | None = None
    run: str = ""
    untrained_loss: float = 0.0


@dataclass(frozen=True)
class Rows:
    """Committed sketch rows.

    Attributes:
        grads: (n, d) float32 projected gradients.
        values: (n,) float64 per-row values.
        example_ids: (n,) int64 ids, distinct.
    """

    grads: np.ndarray
    values: np.ndarray
    example_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.example_ids.shape[0])

    @classmethod
    def empty(cls, dim: int) -> Rows:
        """No rows, with the right dtypes and a (0, dim) gradient block."""
        return cls(
            grads=np.zeros((0, dim), dtype=np.float32),
            values=np.zeros((0,), dtype=np.float64),
            example_ids=np.zeros((0,), dtype=np.int64),
        )


@dataclass(frozen=True)
class AppendResult:
    """Outcome of :meth:`RowWriter.append`.

    Attributes:
        written: rows newly stored by this call (re-sent ids are not counted).
        committed: the writer's committed row total after the call.
    """

    written: int
    committed: int


@dataclass(frozen=True)
class ReadCursor:
    """Where an incremental reader stands on one source (opaque; pickle it as is).

    Attributes:
        source: (job, anchor, task-or-None) the cursor belongs to.
        offsets: committed rows already consumed, per writer id.
        seen: sorted example ids already returned along this cursor's lineage.
    """

    source: tuple[str, str, str | None]
    offsets: tuple[tuple[str, int], ...] = ()
    seen: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))

    def check_source(self, source: tuple[str, str, str | None]) -> None:
        """Refuse a cursor handed to a different job/anchor/task than it came from."""
        if self.source != source:
            raise StoreStateError(f"cursor belongs to {self.source}, not to {source}")


@dataclass(frozen=True, kw_only=True)
class CalibrationRecord:
    """How a mixture version's ridge weight λ was set (`gradmix.server.calibration`).

    Attributes:
        regularization: λ = prior × factor, the λ the version was estimated with.
        prior: λ₀, from the anchor's horizon or the job's λ setting.
        prior_source: where λ₀ came from ("sgd", "adam", or "configured ...").
        factor: c, the correction learnt from the run so far.
        observations: anchor intervals that corrected c so far.
        predicted_change: at the previous anchor, L̂(mixture in force) − L̂(∅)
            (0 if there was none).
        realized_change: the target loss here minus there (0 if none).
        ratio: realized / predicted, the realized change rescaled to the
            planned horizon's steps (0 if not observed).
        note: whether this anchor corrected c, and why not if it did not.
    """

    regularization: float
    prior: float
    prior_source: str = "configured"
    factor: float = 1.0
    observations: int = 0
    predicted_change: float = 0.0
    realized_change: float = 0.0
    ratio: float = 0.0
    note: str = ""

    def __post_init__(self) -> None:
        for name in ("regularization", "prior", "factor"):
            value = getattr(self, name)
            if not isinstance(value, int | float | np.number) or not (
                math.isfinite(value) and value > 0
            ):
                raise InvalidSpecError(
                    f"calibration {name} must be positive and finite, got {value!r}"
                )
        if not _is_int(self.observations) or self.observations < 0:
            raise InvalidSpecError(
                "calibration observations must be a non-negative integer, "
                f"got {self.observations!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-serialisable dict (non-finite floats become strings)."""
        doc = asdict(self)
        for name in ("predicted_change", "realized_change", "ratio"):
            doc[name] = _encode_float(doc[name])
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> CalibrationRecord:
        """Rebuild a record stored with :meth:`to_dict`."""
        return cls(
            regularization=float(doc["regularization"]),
            prior=float(doc["prior"]),
            prior_source=str(doc.get("prior_source", "configured")),
            factor=float(doc.get("factor", 1.0)),
            observations=int(doc.get("observations", 0)),
            predicted_change=float(doc.get("predicted_change", 0.0)),
            realized_change=float(doc.get("realized_change", 0.0)),
            ratio=float(doc.get("ratio", 0.0)),
            note=str(doc.get("note", "")),
        )


@dataclass(frozen=True, kw_only=True)
class MixtureRecord:
    """One published mixture version of a job.

    `score_error`, `calibration`, `pinned`, the `held_*` fields,
    `pending_anchors` and `stale` came later: records stored before them read
    back as 0.0, None, False, "" and empty. `pinned`: the weights were pinned
    by an operator, not estimated. `held`: the re-estimate was held back by the
    sanity check (`held_reason` says why, `held_estimated_loss` is what it
    predicted) and the weights are the previous version's. `pending_anchors`:
    each pending task's complete anchors in a row without its rows; `stale`:
    the pending tasks whose weight decays for it (`gradmix.server.staleness`).
    """

    version: int
    created_at: float
    anchor: str
    policy: str
    weights: dict[str, float]
    scores: dict[str, float]
    states: dict[str, str]
    anchor_loss: float
    estimated_loss: float
    score_error: float = 0.0
    calibration: CalibrationRecord | None = None
    pinned: bool = False
    held: bool = False
    held_reason: str = ""
    held_estimated_loss: float = 0.0
    pending_anchors: dict[str, int] = field(default_factory=dict)
    stale: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.version) or self.version < 1:
            raise InvalidSpecError(f"mixture version must be an integer >= 1, got {self.version!r}")
        for name, mapping in (("weights", self.weights), ("scores", self.scores)):
            if not all(isinstance(v, int | float | np.number) for v in mapping.values()):
                raise InvalidSpecError(f"mixture {name} must map task names to numbers")
        if any(not math.isfinite(v) or v < 0 for v in self.weights.values()):
            raise InvalidSpecError("mixture weights must be finite and non-negative")
        bad = {s for s in self.states.values() if s not in TASK_STATES}
        if bad:
            raise InvalidSpecError(f"mixture task states must be in {TASK_STATES}: {sorted(bad)}")

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-serialisable dict (non-finite floats become strings).

        Built field by field, every field named (`calibration` left out when
        None): `dataclasses.asdict` deep-copied each task mapping first, which
        was half the time of a 1000-task version's write.
        """
        doc: dict[str, Any] = {
            "version": self.version,
            "created_at": self.created_at,
            "anchor": self.anchor,
            "policy": self.policy,
            "weights": {k: float(v) for k, v in self.weights.items()},
            "scores": {k: _encode_float(v) for k, v in self.scores.items()},
            "states": dict(self.states),
            "anchor_loss": _encode_float(self.anchor_loss),
            "estimated_loss": _encode_float(self.estimated_loss),
            "score_error": _encode_float(self.score_error),
            "pinned": self.pinned,
            "held": self.held,
            "held_reason": self.held_reason,
            "held_estimated_loss": _encode_float(self.held_estimated_loss),
            "pending_anchors": dict(self.pending_anchors),
            "stale": list(self.stale),
        }
        if self.calibration is not None:
            doc["calibration"] = self.calibration.to_dict()
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> MixtureRecord:
        """Rebuild a record stored with :meth:`to_dict`."""
        return cls(
            version=int(doc["version"]),
            created_at=float(doc["created_at"]),
            anchor=doc["anchor"],
            policy=doc["policy"],
            weights={k: float(v) for k, v in doc["weights"].items()},
            scores={k: float(v) for k, v in doc["scores"].items()},
            states=dict(doc["states"]),
            anchor_loss=float(doc["anchor_loss"]),
            estimated_loss=float(doc["estimated_loss"]),
            score_error=float(doc.get("score_error", 0.0)),
            calibration=(CalibrationRecord.from_dict(doc["calibration"])
                         if doc.get("calibration") else None),
            pinned=bool(doc.get("pinned", False)),
            held=bool(doc.get("held", False)),
            held_reason=str(doc.get("held_reason", "")),
            held_estimated_loss=float(doc.get("held_estimated_loss", 0.0)),
            pending_anchors={str(k): int(v) for k, v in doc.get("pending_anchors", {}).items()},
            stale=tuple(str(t) for t in doc.get("stale", ())),
        )


@dataclass(frozen=True, kw_only=True)
class JobEvent:
    """One change an operator made to a job, in the job's event log.

    Attributes:
        sequence: strictly increasing per job, from 1.
        created_at: Unix time.
        actor: who made it.
        action: what was done (e.g. "retire_task", "pin").
        task: the task it concerns ("" for none).
        details: what else says what changed (strings).
    """

    sequence: int
    created_at: float
    actor: str
    action: str
    task: str = ""
    details: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> JobEvent:
        """Rebuild an event stored with :meth:`to_dict`."""
        return cls(sequence=int(doc["sequence"]), created_at=float(doc["created_at"]),
                   actor=str(doc["actor"]), action=str(doc["action"]),
                   task=str(doc.get("task", "")),
                   details={str(k): str(v) for k, v in doc.get("details", {}).items()})


@dataclass(frozen=True, kw_only=True)
class JobControl:
    """A job's operator state.

    Attributes:
        pin: task -> weight the job's mixture is pinned to (None: not pinned).
        archived_at: when the job was archived (0.0: it is not).
    """

    pin: dict[str, float] | None = None
    archived_at: float = 0.0

    def __post_init__(self) -> None:
        if self.pin is not None and (
            not self.pin
            or any(not isinstance(w, int | float) or not math.isfinite(w) or w < 0
                   for w in self.pin.values())
            or sum(self.pin.values()) <= 0
        ):
            raise InvalidSpecError("pinned weights must be finite, >= 0 and not all 0")

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.pin is not None:
            doc["pin"] = {k: float(v) for k, v in self.pin.items()}
        if self.archived_at:
            doc["archived_at"] = self.archived_at
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> JobControl:
        pin = doc.get("pin")
        return cls(pin={k: float(v) for k, v in pin.items()} if pin is not None else None,
                   archived_at=float(doc.get("archived_at", 0.0)))


def _encode_float(value: float) -> float | str:
    """JSON has no NaN/Inf: keep finite floats, spell the rest as strings float() reads back."""
    value = float(value)
    return value if math.isfinite(value) else repr(value)
