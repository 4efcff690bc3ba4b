"""Conversions between the client's dataclasses and the v1 protobuf messages.

The only module in the client that builds or reads protobuf messages field by
field; `SelectionClient` calls these and never hands a message to its caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp
from gradmix.client.errors import InvalidArgument
from gradmix.client.types import (
    METHODS,
    MODES,
    Anchor,
    Calibration,
    EstimateResult,
    Horizon,
    Job,
    JobEvent,
    JobSpec,
    Mixture,
    PolicySettings,
    Selection,
    SketchSpec,
    Task,
)
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.vocabulary import (
    WIRE_UNSPECIFIED,
    Policy,
    ProtoEnum,
    W,
)
from gradmix.vocabulary.policy_settings import ZERO_MEANS_DEFAULT
from gradmix.vocabulary.sketch_spec import UNSPECIFIED


def _enum_name(enum: ProtoEnum[W], prefix: str, value: int, unspecified: str) -> str:
    """`POLICY_SIMPLEX` -> "simplex"; the unspecified value -> `unspecified`."""
    if value == 0:
        return unspecified
    try:
        return enum.Name(cast(W, value)).removeprefix(prefix).lower()
    except ValueError:
        return f"unknown({value})"


def _enum_value(enum: ProtoEnum[W], prefix: str, name: str, what: str) -> W:
    try:
        return enum.Value(prefix + name.upper())
    except ValueError:
        raise InvalidArgument(f"unknown {what} {name!r}") from None


def _time(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def policy_name(value: int) -> str:
    """Policy enum -> name ("ensemble" for unspecified, the server default)."""
    return _enum_name(pb.Policy, "POLICY_", value, WIRE_UNSPECIFIED[Policy])


def task_state_name(value: int) -> str:
    """TaskState enum -> "pending" | "active" | "failed" | "unspecified"."""
    return _enum_name(pb.TaskState, "TASK_STATE_", value, "unspecified")


def sketch_spec_to_pb(spec: SketchSpec) -> pb.SketchSpec:
    """SketchSpec -> message."""
    return pb.SketchSpec(
        dim=spec.dim,
        seed=spec.seed,
        value_kind=_enum_value(pb.ValueKind, "VALUE_KIND_", spec.value_kind, "value kind"),
        projector=spec.projector,
        manifest_hash=spec.manifest_hash,
        dtype=_enum_value(pb.SketchDtype, "SKETCH_DTYPE_", spec.dtype, "dtype"),
    )


def policy_to_pb(policy: PolicySettings) -> pb.PolicySettings:
    """PolicySettings -> message."""
    message = pb.PolicySettings(policy=_enum_value(pb.Policy, "POLICY_", policy.policy, "policy"))
    for name in ZERO_MEANS_DEFAULT:
        setattr(message, name, getattr(policy, name))
    if policy.smoothing is not None:
        message.smoothing = policy.smoothing
    return message


def job_spec_to_pb(spec: JobSpec) -> pb.JobSpec:
    """JobSpec -> message."""
    return pb.JobSpec(
        sketch=sketch_spec_to_pb(spec.sketch), policy=policy_to_pb(spec.policy), target=spec.target
    )


def job_spec_from_pb(msg: pb.JobSpec) -> JobSpec:
    """Message -> JobSpec (unspecified enums read as the server defaults)."""
    s, p = msg.sketch, msg.policy
    sketch = SketchSpec(
        dim=max(s.dim, 1),
        seed=s.seed,
        value_kind=_enum_name(pb.ValueKind, "VALUE_KIND_", s.value_kind, UNSPECIFIED["value_kind"]),
        projector=s.projector or UNSPECIFIED["projector"],
        manifest_hash=s.manifest_hash,
        dtype=_enum_name(pb.SketchDtype, "SKETCH_DTYPE_", s.dtype, UNSPECIFIED["dtype"]),
    )
    policy = PolicySettings(
        policy=policy_name(p.policy),
        smoothing=p.smoothing if p.HasField("smoothing") else None,
        **{name: getattr(p, name) for name in ZERO_MEANS_DEFAULT},
    )
    return JobSpec(sketch=sketch, policy=policy, target=msg.target)


def job_from_pb(msg: pb.Job) -> Job:
    """Message -> Job."""
    return Job(
        name=msg.name,
        spec=job_spec_from_pb(msg.spec),
        current_anchor=msg.current_anchor,
        mixture_version=msg.mixture_version,
        task_count=msg.task_count,
        created_at=_time(msg.created_at),
        archived_at=_time(msg.archived_at) if msg.HasField("archived_at") else 0.0,
    )


def task_from_pb(msg: pb.Task) -> Task:
    """Message -> Task."""
    return Task(
        job=msg.job,
        name=msg.name,
        metadata=dict(msg.metadata),
        state=task_state_name(msg.state),
        sketch_rows=msg.sketch_rows,
        registered_at=_time(msg.registered_at),
        failure=msg.failure,
    )


def horizon_to_pb(horizon: Horizon) -> pb.Horizon:
    """Horizon -> message."""
    return pb.Horizon(
        learning_rate=horizon.learning_rate,
        steps=horizon.steps,
        optimizer=horizon.optimizer,
        parameters=horizon.parameters,
    )


def horizon_from_pb(msg: pb.Horizon) -> Horizon:
    """Message -> Horizon."""
    return Horizon(
        learning_rate=msg.learning_rate,
        steps=msg.steps,
        optimizer=msg.optimizer,
        parameters=msg.parameters,
    )


def anchor_from_pb(msg: pb.Anchor) -> Anchor:
    """Message -> Anchor."""
    return Anchor(
        job=msg.job,
        name=msg.name,
        step=msg.step,
        state=_enum_name(pb.AnchorState, "ANCHOR_STATE_", msg.state, "unspecified"),
        target_rows=msg.target_rows,
        declared_at=_time(msg.declared_at),
        horizon=horizon_from_pb(msg.horizon) if msg.HasField("horizon") else None,
        run=msg.run,
        untrained_loss=msg.untrained_loss,
    )


def calibration_from_pb(msg: pb.Calibration) -> Calibration:
    """Message -> Calibration."""
    return Calibration(
        regularization=msg.regularization,
        prior_regularization=msg.prior_regularization,
        prior_source=msg.prior_source,
        factor=msg.factor,
        observations=msg.observations,
        predicted_change=msg.predicted_change,
        realized_change=msg.realized_change,
        ratio=msg.ratio,
        note=msg.note,
    )


def mixture_from_pb(msg: pb.Mixture) -> Mixture:
    """Message -> Mixture."""
    return Mixture(
        job=msg.job,
        version=msg.version,
        anchor=msg.anchor,
        policy=policy_name(msg.policy),
        weights={w.task: w.weight for w in msg.weights},
        scores={w.task: w.score for w in msg.weights},
        states={w.task: task_state_name(w.state) for w in msg.weights},
        pending_tasks=tuple(msg.pending_tasks),
        created_at=_time(msg.created_at),
        anchor_loss=msg.anchor_loss,
        estimated_loss=msg.estimated_loss,
        score_error=msg.score_error,
        calibration=calibration_from_pb(msg.calibration) if msg.HasField("calibration") else None,
        pinned=msg.pinned,
        held=msg.held,
        held_reason=msg.held_reason,
        held_estimated_loss=msg.held_estimated_loss,
        stale_tasks=tuple(msg.stale_tasks),
        pending_anchors={w.task: w.pending_anchors for w in msg.weights if w.pending_anchors},
    )


def source_to_pb(job: str, anchor: str, task: str | None) -> pb.SketchSource:
    """(job, anchor, task or None for the target) -> SketchSource."""
    if task is None:
        return pb.SketchSource(job=job, anchor=anchor, target=True)
    return pb.SketchSource(job=job, anchor=anchor, task=task)


def mode_to_pb(mode: str) -> pb.EstimateMode.ValueType:
    """"fast" | "exact" -> EstimateMode."""
    if mode not in MODES:
        raise InvalidArgument(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    return _enum_value(pb.EstimateMode, "ESTIMATE_MODE_", mode, "mode")


def method_to_pb(method: str) -> pb.SelectionMethod.ValueType:
    """"threshold" | "top_k" | "forward" -> SelectionMethod."""
    if method not in METHODS:
        raise InvalidArgument(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return _enum_value(pb.SelectionMethod, "SELECTION_METHOD_", method, "method")


def subsets_to_pb(
    subsets: Sequence[Sequence[str]], weights: Sequence[Sequence[float]] | None
) -> list[pb.Subset]:
    """Task-name subsets (and optional per-task weights) -> Subset messages."""
    if isinstance(subsets, str) or any(isinstance(s, str) for s in subsets):
        raise InvalidArgument("subsets must be a sequence of sequences of task names")
    if weights is not None and len(weights) != len(subsets):
        raise InvalidArgument(f"{len(weights)} weight lists for {len(subsets)} subsets")
    out = []
    for i, tasks in enumerate(subsets):
        w = list(weights[i]) if weights is not None else []
        if w and len(w) != len(tasks):
            raise InvalidArgument(f"subset {i}: {len(w)} weights for {len(tasks)} tasks")
        out.append(pb.Subset(tasks=list(tasks), weights=w))
    return out


def estimate_from_pb(
    msg: pb.EstimateSubsetsResponse, subsets: Sequence[Sequence[str]]
) -> EstimateResult:
    """Response -> EstimateResult (paired with the subsets asked for)."""
    return EstimateResult(
        anchor=msg.anchor,
        subsets=tuple(tuple(s) for s in subsets),
        losses=tuple(msg.losses),
        anchor_loss=msg.anchor_loss,
    )


def selection_from_pb(msg: pb.SelectTasksResponse, method: str) -> Selection:
    """Response -> Selection."""
    return Selection(
        anchor=msg.anchor,
        method=method,
        selected=tuple(msg.selected),
        estimated_loss=msg.estimated_loss,
        anchor_loss=msg.anchor_loss,
        scores={w.task: w.score for w in msg.scores},
    )


def metadata_to_pb(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Check a task's metadata is str -> str."""
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgument(f"task metadata must map str to str; got {k!r}: {v!r}")
    return meta


def job_event_from_pb(msg: pb.JobEvent) -> JobEvent:
    """Message -> JobEvent."""
    return JobEvent(
        job=msg.job,
        sequence=msg.sequence,
        created_at=_time(msg.created_at),
        actor=msg.actor,
        action=msg.action,
        task=msg.task,
        details=dict(msg.details),
    )
