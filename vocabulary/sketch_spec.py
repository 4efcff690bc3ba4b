"""A job's sketch spec: its one definition, with defaults, bounds and stored form.

`SketchSpec` is everything that must match for two sketch rows to be pooled:
the projection's dimension and seed, the projector, the sketched parameters
(their manifest hash), the storage dtype and the per-example value. The
client takes it in `create_job`, the store keeps it with the job, the server
converts it to and from the wire; none of them declares these fields again
(`tests/unit/test_sketch_spec.py` fails if one does).

Two meanings of "not given", kept apart on purpose:

* a spec built here without `projector`, `dtype` or `value_kind` takes the
  current defaults for new jobs (`DEFAULT_PROJECTOR`, ...: what
  `gradmix-train` sketches);
* a wire message or a stored document that leaves one out means what the
  first clients sent (`UNSPECIFIED`, from `WIRE_UNSPECIFIED`): `dense`,
  `float16`, `log_odds`. `from_document` reads stored specs that way.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gradmix.vocabulary import (
    DEFAULT_DTYPE,
    DEFAULT_PROJECTOR,
    DEFAULT_VALUE_KIND,
    WIRE_UNSPECIFIED,
    Projector,
    SketchDtype,
    ValueKind,
    choices,
)

DIM_MAX = 2**32 - 1
"""The largest projection dimension (the wire's `uint32`)."""
SEED_MAX = 2**64 - 1
"""The largest projection seed (the wire's `uint64`)."""


class SketchSpecError(ValueError):
    """A sketch-spec field outside its bounds (INVALID_ARGUMENT on the wire)."""

    code_name = "INVALID_ARGUMENT"


@dataclass(frozen=True, kw_only=True)
class SketchSpec:
    """How a job's sketches are made; fixed for the job's life.

    Attributes:
        dim: Projection dimension d, in [1, `DIM_MAX`].
        seed: Projection seed, in [0, `SEED_MAX`].
        projector: One of `gradmix.vocabulary.Projector` ("structured", the
            default as in `gradmix-train`, or "dense").
        manifest_hash: Hash of the sketched parameter manifest ("" when not
            given).
        dtype: Storage dtype of the projected gradients, one of
            `gradmix.vocabulary.SketchDtype`.
        value_kind: What the per-example value f(x) is (DESIGN.md §4), one of
            `gradmix.vocabulary.ValueKind`: "log_odds", the mean of the
            completion tokens' logit(p_t), or "geometric_log_odds", the logit
            of their geometric-mean probability, for which softplus(−f) is the
            mean token cross-entropy.

    Raises:
        SketchSpecError: a field outside its bounds (bools are not integers;
            NumPy integers are taken and stored as `int`).
    """

    dim: int
    seed: int = 0
    projector: str = DEFAULT_PROJECTOR
    manifest_hash: str = ""
    dtype: str = DEFAULT_DTYPE
    value_kind: str = DEFAULT_VALUE_KIND

    def __post_init__(self) -> None:
        for name in FIELDS:
            check_field(name, getattr(self, name))
        object.__setattr__(self, "dim", int(self.dim))
        object.__setattr__(self, "seed", int(self.seed))

    def to_document(self) -> dict[str, Any]:
        """The spec as a JSON-serialisable dict, every field named."""
        return dataclasses.asdict(self)

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> SketchSpec:
        """A spec stored with `to_document`; a field it lacks means `UNSPECIFIED`'s value.

        Documents written before a field existed lack it, and mean what the
        clients of that time sent.

        Raises:
            SketchSpecError: an unknown or missing field, or one outside its bounds.
        """
        unknown = set(doc) - set(FIELDS)
        if unknown:
            raise SketchSpecError(f"unknown sketch spec fields: {sorted(unknown)}")
        if "dim" not in doc:
            raise SketchSpecError("the sketch spec has no dim")
        return cls(**{**UNSPECIFIED, **doc})


def _integer(low: int, high: int) -> Callable[[object], bool]:
    # numbers.Integral takes NumPy's integers too (they register with it), not bools.
    def ok(value: object) -> bool:
        return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                and low <= int(value) <= high)
    return ok


def _one_of(values: tuple[str, ...]) -> Callable[[object], bool]:
    return lambda value: value in values


BOUNDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "dim": (_integer(1, DIM_MAX), f"an integer in [1, {DIM_MAX}]"),
    "seed": (_integer(0, SEED_MAX), f"an integer in [0, {SEED_MAX}]"),
    "projector": (_one_of(choices(Projector)), f"one of {', '.join(choices(Projector))}"),
    "manifest_hash": (lambda value: isinstance(value, str), "a string"),
    "dtype": (_one_of(choices(SketchDtype)), f"one of {', '.join(choices(SketchDtype))}"),
    "value_kind": (_one_of(choices(ValueKind)), f"one of {', '.join(choices(ValueKind))}"),
}
"""Each field's bound: (is the value allowed, the bound in words)."""

FIELDS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(SketchSpec))
"""Every field, in declaration order (the wire's `gradmix.v1.SketchSpec` carries the same)."""

UNSPECIFIED: dict[str, str] = {
    "projector": WIRE_UNSPECIFIED[Projector],
    "dtype": WIRE_UNSPECIFIED[SketchDtype],
    "value_kind": WIRE_UNSPECIFIED[ValueKind],
    "manifest_hash": "",
}
"""What a wire message or stored document that leaves a field out means."""


def check_field(name: str, value: object) -> None:
    """Refuse a value outside `name`'s bounds.

    Raises:
        SketchSpecError: the field, the value and the bound, in words.
    """
    ok, allowed = BOUNDS[name]
    if not ok(value):
        raise SketchSpecError(f"invalid sketch {name}: {value!r}; must be {allowed}")
