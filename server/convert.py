"""Translation between the v1 protobuf messages and the server's domain types.

A job's settings, as stored with it in the sketch store, are a JSON dict:
`{"policy": {<every PolicyConfig field>}, "target": "<description>"}`. The
policy dict is complete (server defaults filled in at creation), so a job
keeps its policy when the server's defaults change later.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server.errors import InvalidArgumentError
from gradmix.store import (
    AnchorInfo,
    CalibrationRecord,
    Horizon,
    JobEvent,
    MixtureRecord,
)
from gradmix.vocabulary import (
    WIRE_UNSPECIFIED,
    AnchorState,
    EstimateMode,
    Policy,
    SketchDtype,
    TaskState,
    ValueKind,
    from_wire,
    to_wire,
)
from gradmix.vocabulary.policy_settings import ZERO_MEANS_DEFAULT, PolicyConfig
from gradmix.vocabulary.sketch_spec import UNSPECIFIED, SketchSpec, SketchSpecError

PENDING = TaskState.PENDING
ACTIVE = TaskState.ACTIVE
FAILED = TaskState.FAILED



def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def policy_name(policy: int) -> str:
    """`POLICY_SIMPLEX` -> "simplex"; UNSPECIFIED -> "" (take the default)."""
    if policy == pb.POLICY_UNSPECIFIED:
        return ""
    try:
        return from_wire(Policy, policy, pb.Policy)
    except ValueError as exc:
        raise InvalidArgumentError(f"unknown policy enum value {policy}") from exc


def policy_enum(name: str) -> pb.Policy.ValueType:
    return to_wire(Policy(name), pb.Policy)


def estimate_mode(mode: int) -> EstimateMode:
    try:
        return from_wire(EstimateMode, mode, pb.EstimateMode)
    except ValueError as exc:
        raise InvalidArgumentError(f"unknown estimate mode enum value {mode}") from exc


def sketch_to_spec(sketch: pb.SketchSpec) -> SketchSpec:
    """The store's SketchSpec for the wire's; zero fields take their defaults.

    Raises:
        InvalidArgumentError: an enum value this server does not know, or a
            field SketchSpec refuses (e.g. dim 0).
    """
    try:
        value_kind = from_wire(ValueKind, sketch.value_kind, pb.ValueKind)
    except ValueError as exc:
        raise InvalidArgumentError(f"unknown value_kind enum value {sketch.value_kind}") from exc
    try:
        dtype = from_wire(SketchDtype, sketch.dtype, pb.SketchDtype)
    except ValueError as exc:
        raise InvalidArgumentError(f"unknown dtype enum value {sketch.dtype}") from exc
    try:
        return SketchSpec(dim=sketch.dim, seed=sketch.seed, value_kind=value_kind,
                          projector=sketch.projector or UNSPECIFIED["projector"],
                          manifest_hash=sketch.manifest_hash, dtype=dtype)
    except SketchSpecError as exc:
        raise InvalidArgumentError(str(exc)) from exc


def spec_to_sketch(spec: SketchSpec) -> pb.SketchSpec:
    return pb.SketchSpec(dim=spec.dim, seed=spec.seed,
                         value_kind=to_wire(ValueKind(spec.value_kind), pb.ValueKind),
                         projector=spec.projector, manifest_hash=spec.manifest_hash,
                         dtype=to_wire(SketchDtype(spec.dtype), pb.SketchDtype))


def requested_policy(settings: pb.PolicySettings) -> dict[str, Any]:
    """The policy fields a request sets explicitly (non-zero)."""
    requested: dict[str, Any] = {}
    name = policy_name(settings.policy)
    if name:
        requested["policy"] = name
    for field in ZERO_MEANS_DEFAULT:
        value = getattr(settings, field)
        if value:
            requested[field] = value
    if settings.HasField("smoothing"):
        requested["smoothing"] = settings.smoothing
    return requested


def full_policy(requested: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Every PolicyConfig field: requested, else the server default, else PolicyConfig's.

    Raises:
        InvalidArgumentError: PolicyConfig refuses a value (its own message).
    """
    merged = {**defaults, **requested}
    try:
        config = PolicyConfig(**merged)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"invalid policy settings: {exc}") from exc
    return dataclasses.asdict(config)


def policy_config(settings: Mapping[str, Any]) -> PolicyConfig:
    """The PolicyConfig of a stored job's settings."""
    known = {f.name for f in dataclasses.fields(PolicyConfig)}
    stored = settings.get("policy", {})
    return PolicyConfig(**{k: v for k, v in stored.items() if k in known})


def job_settings(policy: Mapping[str, Any], target: str) -> dict[str, Any]:
    return {"policy": dict(policy), "target": target}


def settings_to_pb(settings: Mapping[str, Any]) -> tuple[pb.PolicySettings, str]:
    policy = settings.get("policy", {})
    message = pb.PolicySettings(policy=policy_enum(policy.get("policy", WIRE_UNSPECIFIED[Policy])))
    for field in (*ZERO_MEANS_DEFAULT, "smoothing"):
        if field in policy:
            setattr(message, field, policy[field])
    return message, str(settings.get("target", ""))


def horizon_from_pb(request: pb.DeclareAnchorRequest) -> Horizon | None:
    """The request's horizon (None if unset).

    Raises:
        InvalidSpecError: (store) a horizon with a non-positive rate or steps, or no
            optimizer name.
    """
    if not request.HasField("horizon"):
        return None
    h = request.horizon
    return Horizon(learning_rate=h.learning_rate, steps=h.steps, optimizer=h.optimizer,
                   parameters=h.parameters)


def horizon_to_pb(horizon: Horizon) -> pb.Horizon:
    return pb.Horizon(learning_rate=horizon.learning_rate, steps=horizon.steps,
                      optimizer=horizon.optimizer, parameters=horizon.parameters)


def anchor_to_pb(job: str, anchor: AnchorInfo, target_rows: int) -> pb.Anchor:
    message = pb.Anchor(job=job, name=anchor.name, step=anchor.step,
                        state=to_wire(AnchorState(anchor.state), pb.AnchorState),
                        target_rows=target_rows, declared_at=timestamp(anchor.declared_at),
                        run=anchor.run, untrained_loss=anchor.untrained_loss)
    if anchor.horizon is not None:
        message.horizon.CopyFrom(horizon_to_pb(anchor.horizon))
    return message


def task_state(state: str) -> pb.TaskState.ValueType:
    return to_wire(TaskState(state), pb.TaskState)


def mixture_to_pb(job: str, record: MixtureRecord) -> pb.Mixture:
    """A stored mixture version as the Mixture message (tasks sorted by name)."""
    tasks = sorted(record.weights)
    weights = [pb.TaskWeight(task=task, weight=record.weights[task],
                             score=record.scores.get(task, 0.0),
                             state=task_state(record.states.get(task, ACTIVE)),
                             pending_anchors=record.pending_anchors.get(task, 0),
                             stale=task in record.stale)
               for task in tasks]
    pending = [task for task in tasks if record.states.get(task) == PENDING]
    message = pb.Mixture(
        job=job, version=record.version, anchor=record.anchor,
        policy=policy_enum(record.policy) if record.policy else pb.POLICY_UNSPECIFIED,
        weights=weights, pending_tasks=pending, created_at=timestamp(record.created_at),
        anchor_loss=record.anchor_loss, estimated_loss=record.estimated_loss,
        score_error=record.score_error, pinned=record.pinned, held=record.held,
        held_reason=record.held_reason, held_estimated_loss=record.held_estimated_loss,
        stale_tasks=[task for task in tasks if task in record.stale])
    if record.calibration is not None:
        message.calibration.CopyFrom(calibration_to_pb(record.calibration))
    return message


def calibration_to_pb(calibration: CalibrationRecord) -> pb.Calibration:
    return pb.Calibration(
        regularization=calibration.regularization,
        predicted_change=calibration.predicted_change,
        realized_change=calibration.realized_change,
        observations=calibration.observations,
        prior_regularization=calibration.prior, prior_source=calibration.prior_source,
        factor=calibration.factor, ratio=calibration.ratio, note=calibration.note)


def scores_to_pb(scores: Mapping[str, float], weights: Mapping[str, float],
                 order: Sequence[str]) -> list[pb.TaskWeight]:
    return [pb.TaskWeight(task=task, score=scores[task], weight=weights.get(task, 0.0),
                          state=pb.TASK_STATE_ACTIVE) for task in order if task in scores]


def event_to_pb(job: str, event: JobEvent) -> pb.JobEvent:
    return pb.JobEvent(job=job, sequence=event.sequence, created_at=timestamp(event.created_at),
                       actor=event.actor, action=event.action, task=event.task,
                       details=event.details)
