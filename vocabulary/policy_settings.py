"""A job's policy settings: their one definition, with defaults and bounds.

`PolicyConfig` is the complete, validated settings a job's mixture is made
with: the server builds it from a request (fields the request leaves zero
take the server's defaults, then these) and stores it whole with the job.
Everything else derives from it:

* the wire (`gradmix.v1.PolicySettings`) carries `WIRE_FIELDS`, zero meaning
  "the server's default" (`smoothing` is optional there, since 0 is a value);
* the client's `PolicySettings` is that request, and checks each value it
  sets with `check_field`, the bounds the server applies;
* the server config's job defaults are the `DEFAULTABLE_FIELDS`.

`tests/unit/test_policy_settings.py` fails if the proto, the client or the
server config disagree with these fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from gradmix.vocabulary import DEFAULT_POLICY, Policy, choices

# What a job's settings may be: inside these, every job can always be turned
# into a mixture, however many tasks it grows to (bench/outcome.py and the
# policy tests exercise the ends). λ's range is also where calibration keeps
# the λ it derives (`gradmix.server.calibration.REGULARIZATION_MIN/MAX`).
REGULARIZATION_RANGE = (1e-8, 1e8)
TEMPERATURE_RANGE = (1e-3, 1e3)
PRIOR_WEIGHT_MAX = 1e3
SUBSET_COUNT_MAX = 20_000
BOOTSTRAP_RANGE = (2, 1000)
#: The floors of n tasks together take at most this share of the weight: the
#: floor in force is min(ε, FLOOR_SHARE / n), so it scales down as tasks grow.
FLOOR_SHARE = 0.5
#: The largest ε a job may ask for: more could not hold even for two tasks.
FLOOR_MAX = FLOOR_SHARE / 2


class PolicySettingsError(ValueError):
    """A policy setting outside its bounds (INVALID_ARGUMENT on the wire)."""

    code_name = "INVALID_ARGUMENT"


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """How scores and the mixture are computed for a job.

    Attributes:
        policy: One of `gradmix.vocabulary.Policy`.
        regularization: λ of the estimator's ridge on w. In units of the
            per-example curvature c‖g‖² (c = σ(-f)·max(σ(f), σ(-f)), the
            fast mode's; `gradmix.server.task_statistics`): λ = 1 keeps ‖w‖ moderate when
            sketch rows have norm ≈ 1; calibrate against a few fine-tunes.
        temperature: τ of `scores_to_mixture`, in standard errors of the
            scores (their sampling noise, bootstrapped over the sketched
            rows): beyond the tie margin (`TIE_MARGIN` standard errors of
            the best), each standard error costs a task a factor e^(1/τ).
        floor: Least weight of any task, ε ≤ `FLOOR_MAX`; with n tasks the
            floor in force is `floor_for(n)` = min(ε, `FLOOR_SHARE`/n), so a
            job's floor never rules out a mixture however many tasks it has.
        subset_count: Subsets drawn by ``ensemble`` / ``surrogate`` (500:
            each task is in ≈ 250 of them at q = 0.5, enough for stable means).
        subset_fraction: q in (0, 1), subset size ⌈q·n⌉.
        prior_weight: Weight of a registered task that has no sketch at the
            current anchor yet, relative to the uniform share 1/n (the server
            applies it).
        seed: Seed of the subset draws (and of the bootstrap).
        smoothing: β in [0, 1): a new anchor's mixture is (1-β)·new +
            β·(the mixture in force before that anchor), so one anchor's
            sampling noise cannot swing the mixture on its own.
        bootstrap: Replicates of the bootstrap over sketched rows that gives
            the scores' standard error (≥ 2). Server-side only: not on the wire.
    """

    policy: str = DEFAULT_POLICY
    regularization: float = 1.0
    temperature: float = 0.5
    floor: float = 0.001
    subset_count: int = 500
    subset_fraction: float = 0.5
    prior_weight: float = 1.0
    seed: int = 0
    smoothing: float = 0.3
    bootstrap: int = 8

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_field(field.name, getattr(self, field.name))

    def floor_for(self, tasks: int) -> float:
        """The floor in force for a mixture of `tasks` tasks: min(ε, FLOOR_SHARE / n)."""
        return min(self.floor, FLOOR_SHARE / tasks) if tasks else self.floor


def _within(low: float, high: float) -> Callable[[object], bool]:
    def ok(value: object) -> bool:
        return (isinstance(value, int | float) and not isinstance(value, bool)
                and low <= value <= high)
    return ok


def _integer(low: int, high: int) -> Callable[[object], bool]:
    def ok(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    return ok


def _open_unit(value: object) -> bool:
    return isinstance(value, int | float) and 0 < value < 1


def _half_open_unit(value: object) -> bool:
    return isinstance(value, int | float) and 0 <= value < 1


BOUNDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "policy": (lambda value: value in choices(Policy), f"one of {', '.join(choices(Policy))}"),
    "regularization": (_within(*REGULARIZATION_RANGE),
                       f"in [{REGULARIZATION_RANGE[0]:g}, {REGULARIZATION_RANGE[1]:g}]"),
    "temperature": (_within(*TEMPERATURE_RANGE),
                    f"in [{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}]"),
    "floor": (_within(0.0, FLOOR_MAX),
              f"in [0, {FLOOR_MAX:g}] (the floors of n tasks take at most "
              f"{FLOOR_SHARE:g} of the weight; ε scales down as tasks grow)"),
    "subset_count": (_integer(1, SUBSET_COUNT_MAX), f"an integer in [1, {SUBSET_COUNT_MAX}]"),
    "subset_fraction": (_open_unit, "in (0, 1)"),
    "prior_weight": (_within(0.0, PRIOR_WEIGHT_MAX), f"in [0, {PRIOR_WEIGHT_MAX:g}]"),
    "seed": (_integer(0, 2**64 - 1), "an integer in [0, 2^64)"),
    "smoothing": (_half_open_unit, "in [0, 1)"),
    "bootstrap": (_integer(*BOOTSTRAP_RANGE),
                  f"an integer in [{BOOTSTRAP_RANGE[0]}, {BOOTSTRAP_RANGE[1]}]"),
}
"""Each field's bound: (is the value allowed, the bound in words). NaN fails every one."""

FIELDS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(PolicyConfig))
"""Every setting, in declaration order."""
WIRE_FIELDS: tuple[str, ...] = tuple(name for name in FIELDS if name != "bootstrap")
"""The settings a request carries (`gradmix.v1.PolicySettings`, the client's `PolicySettings`)."""
ZERO_MEANS_DEFAULT: tuple[str, ...] = tuple(
    name for name in WIRE_FIELDS if name not in ("policy", "smoothing"))
"""The numeric settings that a request leaves at 0 for "the server's default"
(`policy` has its UNSPECIFIED, and `smoothing` is optional: 0 is a value)."""
DEFAULTABLE_FIELDS: tuple[str, ...] = tuple(
    name for name in WIRE_FIELDS if name != "seed")
"""The settings a server config may give new jobs a default for (the policy among them)."""


def check_field(name: str, value: object) -> None:
    """Refuse a value outside `name`'s bounds.

    Raises:
        PolicySettingsError: the value and the bound, in words.
    """
    ok, allowed = BOUNDS[name]
    if not ok(value):
        raise PolicySettingsError(f"invalid {name}: {value!r}; must be {allowed}")
