"""The shared vocabulary of gradmix: every enumeration, declared once.

Client, store, server and trainer import their policies, projectors, dtypes,
value kinds, estimate modes, selection methods, and task and anchor states
from here, and nowhere else declares them (`tests/unit/test_vocabulary.py` fails
on a second declaration, and on a proto enum that disagrees with these).

Members are lower-case strings (`StrEnum`), so they compare equal to the
strings in TOML files, JSON store documents and CLI flags. On the wire each
enum is the proto enum of the same name (`Policy` is `gradmix.v1.Policy`, its
members `POLICY_<NAME>`); `to_wire` and `from_wire` convert by that rule, and
`WIRE_UNSPECIFIED` says what a field left at 0 (UNSPECIFIED) means, which is
what the first clients sent and must keep meaning.

The two records every package shares have one definition each beside this
module: a job's policy settings (`gradmix.vocabulary.policy_settings`) and its
sketch spec (`gradmix.vocabulary.sketch_spec`), with their validation.

Defaults for new jobs are the `DEFAULT_*` constants; they are not always what
an unspecified wire field means (new jobs sketch `structured` gradients of the
`geometric_log_odds` value; a request from an older client that names neither
still means `dense` and `log_odds`).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Protocol, TypeVar, cast


class Policy(StrEnum):
    """How subset-loss estimates become mixture weights (`gradmix.server.policies`)."""

    ENSEMBLE = "ensemble"
    SURROGATE = "surrogate"
    SIMPLEX = "simplex"
    UNIFORM = "uniform"
    GRADIENT_SIMILARITY = "gradient_similarity"
    SUBSET_SEARCH = "subset_search"


class Projector(StrEnum):
    """How per-example gradients are projected into sketches."""

    DENSE = "dense"
    STRUCTURED = "structured"


class SketchDtype(StrEnum):
    """Storage dtype of the projected gradients."""

    FLOAT16 = "float16"
    FLOAT32 = "float32"


class ValueKind(StrEnum):
    """What the per-example value f(x) is (DESIGN.md §4)."""

    LOG_ODDS = "log_odds"
    GEOMETRIC_LOG_ODDS = "geometric_log_odds"


class EstimateMode(StrEnum):
    """How subset losses are estimated: the fast linear solve or the exact logistic fit."""

    FAST = "fast"
    EXACT = "exact"


class SelectionMethod(StrEnum):
    """How `SelectTasks` picks a subset."""

    THRESHOLD = "threshold"
    TOP_K = "top_k"
    FORWARD = "forward"


class TaskState(StrEnum):
    """A task's state at the job's current anchor (or retired, whatever the anchor)."""

    PENDING = "pending"
    """Registered, no committed sketch rows at the current anchor: carries the prior weight."""
    ACTIVE = "active"
    """Sketched at the current anchor: weighted by the policy."""
    FAILED = "failed"
    """The trainer reported its data unloadable (with a reason): weight 0 until it sketches."""
    RETIRED = "retired"
    """Retired by an operator: weight 0 until activated again (`gradmix.server.lifecycle`)."""


class AnchorState(StrEnum):
    """An anchor's state: open while sketches arrive, complete once the trainer says so."""

    OPEN = "open"
    COMPLETE = "complete"


TARGET = "target"
"""The target's name wherever a source needs one (metric labels, logs, run-log keys).

The target is a source of its own, never a task: no task may be named this
(the store refuses it), so the two can never be confused in a label.
"""

VOCABULARY: tuple[type[StrEnum], ...] = (
    Policy,
    Projector,
    SketchDtype,
    ValueKind,
    EstimateMode,
    SelectionMethod,
    TaskState,
    AnchorState,
)
"""Every enumeration of the vocabulary."""

# Defaults are plain strings, so config dataclasses typed `str` take them as is.
DEFAULT_POLICY: str = Policy.SUBSET_SEARCH.value
DEFAULT_PROJECTOR: str = Projector.STRUCTURED.value
DEFAULT_DTYPE: str = SketchDtype.FLOAT16.value
DEFAULT_VALUE_KIND: str = ValueKind.GEOMETRIC_LOG_ODDS.value
DEFAULT_MODE: str = EstimateMode.FAST.value
DEFAULT_METHOD: str = SelectionMethod.THRESHOLD.value
#: Examples sketched per task (and for the target) at an anchor. The scores'
#: noise falls as 1/√rows; README "How good are the estimates?" has the
#: outcome and stability measured at 64, 128 and 256.
DEFAULT_EXAMPLES_PER_TASK: int = 256

WIRE_UNSPECIFIED: dict[type[StrEnum], str] = {
    Policy: Policy.ENSEMBLE.value,
    Projector: Projector.DENSE.value,
    SketchDtype: SketchDtype.FLOAT16.value,
    ValueKind: ValueKind.LOG_ODDS.value,
    EstimateMode: EstimateMode.FAST.value,
    SelectionMethod: SelectionMethod.THRESHOLD.value,
}
"""What a request field left unspecified (0, or "" for the projector) means."""

E = TypeVar("E", bound=StrEnum)
W = TypeVar("W", bound=int)
"""A proto enum's number type (`pb.Policy.ValueType`, a NewType of int)."""


class ProtoEnum(Protocol[W]):
    """The part of a generated protobuf enum wrapper this module uses.

    Generic in the number type, so `to_wire(..., pb.Policy)` is typed
    `pb.Policy.ValueType`, which is what the message constructors take.
    """

    def Name(self, number: W) -> str: ...

    def Value(self, name: str) -> W: ...


def choices(enum: type[StrEnum]) -> tuple[str, ...]:
    """The member values of `enum`, in declaration order (for messages and CLI choices)."""
    return tuple(member.value for member in enum)


def parse(enum: type[E], value: str, what: str | None = None) -> E:
    """`value` as a member of `enum`; ValueError naming the choices otherwise."""
    try:
        return enum(value)
    except ValueError:
        label = what or _snake(enum.__name__).replace("_", " ")
        raise ValueError(
            f"{label} must be one of {', '.join(choices(enum))}; got {value!r}"
        ) from None


def wire_prefix(enum: type[StrEnum]) -> str:
    """The proto constants' prefix: `SketchDtype` -> ``"SKETCH_DTYPE_"``."""
    return _snake(enum.__name__).upper() + "_"


def to_wire(member: StrEnum, proto: ProtoEnum[W]) -> W:
    """The proto enum number of `member` (`Policy.SIMPLEX` -> `POLICY_SIMPLEX`)."""
    return proto.Value(wire_prefix(type(member)) + member.name)


def from_wire(enum: type[E], number: int, proto: ProtoEnum[W]) -> E:
    """The member a proto enum number stands for; 0 means `WIRE_UNSPECIFIED[enum]`.

    Raises:
        ValueError: 0 for an enum without an unspecified meaning, or a number
            this version does not know.
    """
    if number == 0:
        if enum not in WIRE_UNSPECIFIED:
            raise ValueError(f"{_snake(enum.__name__).replace('_', ' ')} is unspecified")
        return enum(WIRE_UNSPECIFIED[enum])
    try:
        name = proto.Name(cast(W, number))  # W is a NewType of int
        return enum[name.removeprefix(wire_prefix(enum))]
    except (ValueError, KeyError):
        raise ValueError(f"unknown {enum.__name__} number {number}") from None


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
