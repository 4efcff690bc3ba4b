"""Plain Python values the client takes and returns (never protobuf).

Enumerations travel as lower-case strings: a policy is "ensemble", a task
state "pending" or "active", an anchor state "open" or "complete", an estimator
mode "fast" or "exact". Conversions to and from the v1 protobuf messages live
in `gradmix.client.convert`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gradmix.client.errors import InvalidArgument
from gradmix.vocabulary import (
    DEFAULT_POLICY,
    EstimateMode,
    Policy,
    Projector,
    SelectionMethod,
    SketchDtype,
    TaskState,
    ValueKind,
    choices,
)
from gradmix.vocabulary.policy_settings import (
    WIRE_FIELDS,
    ZERO_MEANS_DEFAULT,
    PolicySettingsError,
    check_field,
)

# The sketch spec is the vocabulary's one definition, re-exported for the client's users.
from gradmix.vocabulary.sketch_spec import SketchSpec as SketchSpec
from gradmix.vocabulary.sketch_spec import SketchSpecError as SketchSpecError

POLICIES = choices(Policy)
PROJECTORS = choices(Projector)
DTYPES = choices(SketchDtype)
VALUE_KINDS = choices(ValueKind)
MODES = choices(EstimateMode)
METHODS = choices(SelectionMethod)
TASK_STATES = choices(TaskState)


@dataclass(frozen=True, kw_only=True)
class PolicySettings:
    """How the mixture is made from the sketches; zero numbers take server defaults.

    The request form of `gradmix.vocabulary.policy_settings.PolicyConfig`: the
    same fields (`WIRE_FIELDS`), each value it sets checked against the bounds
    the server applies, so a bad one fails here instead of at the server.
    """

    policy: str = DEFAULT_POLICY
    """ensemble | surrogate | simplex | uniform | gradient_similarity | subset_search."""
    regularization: float = 0.0
    """λ of the subset regression."""
    temperature: float = 0.0
    """τ in w ∝ exp(-score/τ)."""
    floor: float = 0.0
    """ε, the minimum weight of an active task."""
    subset_count: int = 0
    """Subsets drawn by ensemble/surrogate."""
    subset_fraction: float = 0.0
    """q: subset size = ceil(q·n)."""
    prior_weight: float = 0.0
    """Weight of a pending task, relative to the mean."""
    seed: int = 0
    """Subset-sampling seed."""
    smoothing: float | None = None
    """β in [0, 1): share of the previous anchor's mixture kept in a new
    anchor's (None: the server default)."""

    def __post_init__(self) -> None:
        for name in WIRE_FIELDS:
            value = getattr(self, name)
            if value is None or (value == 0 and name in ZERO_MEANS_DEFAULT):
                continue  # the server's default
            try:
                check_field(name, value)
            except PolicySettingsError as exc:
                raise InvalidArgument(f"policy settings: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A job's full spec: how it sketches, how it mixes, and its target."""

    sketch: SketchSpec
    policy: PolicySettings = field(default_factory=PolicySettings)
    target: str = ""
    """Free-form description of the target (e.g. a data URI)."""


@dataclass(frozen=True, kw_only=True)
class ServerInfo:
    """Where a server keeps its state."""

    store_identity: str
    """Where its store's data lives ("file:/abs/path", "s3:bucket/prefix", ...)."""
    store_url: str
    """The store as the server was configured with it."""


@dataclass(frozen=True, kw_only=True)
class Job:
    """A training run that wants a mixture."""

    name: str
    spec: JobSpec
    current_anchor: str
    """The latest complete anchor ("" if none)."""
    mixture_version: int
    """The latest published mixture version (0 if none)."""
    task_count: int
    created_at: float
    """Unix time."""
    archived_at: float = 0.0
    """Unix time it was archived (0: it is not; only `list_jobs(include_archived=True)`
    lists archived jobs)."""


@dataclass(frozen=True, kw_only=True)
class Task:
    """An auxiliary data source of a job."""

    job: str
    name: str
    metadata: dict[str, str]
    state: str
    """"pending" (no sketch at the current anchor yet), "active", "failed" (its data
    cannot be loaded: weight 0; `failure` says why), or "retired" (by an operator:
    weight 0 until activated again)."""
    sketch_rows: int
    """Committed rows at the current anchor."""
    registered_at: float
    failure: str = ""
    """Why the task failed ("" unless its state is "failed")."""


@dataclass(frozen=True, kw_only=True)
class Horizon:
    """How far training moves from an anchor before the next one, as the trainer plans
    it: the server derives the estimate's prior λ₀ from it."""

    learning_rate: float
    """The optimizer's learning rate at the anchor (> 0)."""
    steps: int
    """Optimizer steps until the next anchor (>= 1)."""
    optimizer: str = "adamw"
    """"adamw", "adam" or "sgd" (another name: the server uses the job's λ)."""
    parameters: int = 0
    """p, the number of sketched parameters (needed for Adam-type optimizers)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InvalidArgument(
                f"horizon learning_rate must be finite and > 0; got {self.learning_rate}"
            )
        if not 1 <= self.steps < 2**64:
            raise InvalidArgument(f"horizon steps must be in [1, 2**64); got {self.steps}")
        if not self.optimizer:
            raise InvalidArgument("horizon optimizer must be named")
        if not 0 <= self.parameters < 2**64:
            raise InvalidArgument(
                f"horizon parameters must be in [0, 2**64); got {self.parameters}"
            )


@dataclass(frozen=True, kw_only=True)
class Anchor:
    """A checkpoint of the job's model that sketches are taken at."""

    job: str
    name: str
    step: int
    state: str
    """"open" or "complete"."""
    target_rows: int
    declared_at: float
    horizon: Horizon | None = None
    """The horizon it was declared with (None: none)."""
    run: str = ""
    """The training run that declared it ("" when none was given)."""
    untrained_loss: float = 0.0
    """The untrained target loss it was declared with (log of the vocabulary size; 0: none)."""


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """How a mixture version's λ (the estimate's horizon) was set: λ = prior × factor."""

    regularization: float
    """λ the version was estimated with."""
    prior_regularization: float
    """λ₀, from the anchor's horizon or the job's λ setting."""
    prior_source: str
    """Where λ₀ came from: "sgd", "adam" or "configured (<reason>)"."""
    factor: float
    """c, the correction learnt from the target loss changes the run realised."""
    observations: int
    """Anchor intervals that corrected c so far."""
    predicted_change: float
    """At the previous anchor: L̂(mixture in force) − L̂(∅) (0 if none)."""
    realized_change: float
    """The target loss here minus there (0 if none)."""
    ratio: float
    """Realized / predicted (realized rescaled to the planned steps); 0 if not observed."""
    note: str
    """Whether this anchor corrected the factor, and why not if it did not."""


@dataclass(frozen=True, kw_only=True)
class Mixture:
    """One published version of a job's mixture (a probability vector over tasks)."""

    job: str
    version: int
    anchor: str
    """The anchor it was estimated at ("" while no anchor is complete)."""
    policy: str
    weights: dict[str, float]
    """Task name -> probability; the weights sum to 1."""
    scores: dict[str, float]
    """Task name -> policy score (lower = more helpful; 0 while pending)."""
    states: dict[str, str]
    """Task name -> "pending" | "active" | "retired"."""
    pending_tasks: tuple[str, ...]
    created_at: float
    anchor_loss: float
    """L̂(∅): the anchor's own target loss."""
    estimated_loss: float
    """L̂ of this mixture's weights over the active tasks."""
    score_error: float = 0.0
    """Bootstrap standard error of the scores (the temperature's unit)."""
    calibration: Calibration | None = None
    """How the estimate's λ was set (None before the first anchor, or from older servers)."""
    pinned: bool = False
    """The weights were pinned by an operator (`pin_mixture`), not estimated."""
    held: bool = False
    """The server's sanity check held the re-estimate back: the weights are the previous
    version's (`held_reason` says why)."""
    held_reason: str = ""
    """Why it was held: "loss_change" (the estimate moved the loss implausibly far),
    "untrained" (the anchor's model had not learnt yet) or "non_finite"; "" if not held."""
    held_estimated_loss: float = 0.0
    """The target loss the held-back estimate predicted (0 if not held)."""
    stale_tasks: tuple[str, ...] = ()
    """Pending tasks pending for too long: their weight decays until they are sketched."""
    pending_anchors: dict[str, int] = field(default_factory=dict)
    """Pending task -> complete anchors in a row it has missed."""


@dataclass(frozen=True, kw_only=True)
class EstimateResult:
    """Estimated fine-tuning losses L̂(S) of given subsets."""

    anchor: str
    subsets: tuple[tuple[str, ...], ...]
    losses: tuple[float, ...]
    """One per subset, in request order."""
    anchor_loss: float
    """L̂(∅)."""


@dataclass(frozen=True, kw_only=True)
class Selection:
    """A discrete task selection (threshold, top-k or forward stepwise)."""

    anchor: str
    method: str
    selected: tuple[str, ...]
    estimated_loss: float
    """L̂ of the selected tasks, uniform weights."""
    anchor_loss: float
    scores: dict[str, float]
    """Task name -> policy score the selection was based on."""


@dataclass(frozen=True, kw_only=True)
class JobEvent:
    """One change an operator made to a job (retire, pin, delete, ...), from its event log."""

    job: str
    sequence: int
    """Strictly increasing per job, from 1."""
    created_at: float
    """Unix time."""
    actor: str
    """Who made it (the client's `actor`, else its address as the server saw it)."""
    action: str
    """"update_task", "retire_task", "activate_task", "pin", "unpin", "archive_job" or
    "delete_job"."""
    task: str
    """The task it concerns ("" for none)."""
    details: dict[str, str]
    """What changed: e.g. "weight.<task>" of a pin, "metadata.<key>", "reason"."""
