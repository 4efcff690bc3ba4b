"""Plain-text tables of jobs, tasks, mixtures and estimates for the `gradmix` CLI."""

from __future__ import annotations

import time
from collections.abc import Sequence

from gradmix.client.types import (
    Anchor,
    Calibration,
    EstimateResult,
    Job,
    JobEvent,
    Mixture,
    Selection,
    Task,
)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _when(timestamp: float) -> str:
    if timestamp <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def jobs_table(jobs: Sequence[Job]) -> str:
    """One line per job; an ARCHIVED column when some job is archived."""
    archived = any(j.archived_at for j in jobs)
    rows = [
        (j.name, j.current_anchor or "-", j.mixture_version, j.task_count,
         j.spec.sketch.dim, j.spec.policy.policy, _when(j.created_at),
         *([_when(j.archived_at)] if archived else []))
        for j in jobs
    ]
    header = ("JOB", "ANCHOR", "VERSION", "TASKS", "DIM", "POLICY", "CREATED")
    return table((*header, *(("ARCHIVED",) if archived else ())), rows)


def tasks_table(tasks: Sequence[Task]) -> str:
    """One line per task."""
    rows = [
        (t.name, t.state, t.sketch_rows,
         ",".join(f"{k}={v}" for k, v in sorted(t.metadata.items())) or "-")
        for t in tasks
    ]
    text = table(("TASK", "STATE", "ROWS", "METADATA"), rows)
    failures = [f"{t.name} failed: {t.failure}" for t in tasks if t.failure]
    return "\n".join([text, *failures])


def anchors_table(anchors: Sequence[Anchor]) -> str:
    """One line per anchor."""
    rows = [
        (a.name, a.step, a.state, a.target_rows, _when(a.declared_at), _horizon(a))
        for a in anchors
    ]
    return table(("ANCHOR", "STEP", "STATE", "TARGET_ROWS", "DECLARED", "HORIZON"), rows)


def _horizon(anchor: Anchor) -> str:
    h = anchor.horizon
    if h is None:
        return "-"
    return f"{h.optimizer} lr={h.learning_rate:.3g} steps={h.steps} p={h.parameters}"


def mixture_table(mixture: Mixture, disconnected_since: float | None = None) -> str:
    """Two header lines (each fits 80 columns for usual names), then one line per
    task, heaviest first; with `disconnected_since`, a first line saying the table is
    the last one received before the server went away."""
    head = (
        f"job {mixture.job}  version {mixture.version}  anchor {mixture.anchor or '-'}  "
        f"policy {mixture.policy}\n"
        f"anchor_loss {mixture.anchor_loss:.4f}  estimated_loss {mixture.estimated_loss:.4f}"
        f"  at {_when(mixture.created_at)}"
        + ("  PINNED" if mixture.pinned else "")
    )
    if mixture.held:
        head += "\n" + held_line(mixture)
    if disconnected_since is not None:
        head = (
            f"DISCONNECTED since {_when(disconnected_since)}: reconnecting; "
            f"last version received:\n{head}"
        )
    order = sorted(mixture.weights, key=lambda t: (-mixture.weights[t], t))
    rows = [
        (t, f"{mixture.weights[t]:.4f}", f"{mixture.scores.get(t, 0.0):+.5f}",
         _state(mixture, t))
        for t in order
    ]
    body = head + "\n" + table(("TASK", "WEIGHT", "SCORE", "STATE"), rows)
    if mixture.calibration is not None:
        body += "\n" + calibration_line(mixture.calibration)
    return body


def _state(mixture: Mixture, task: str) -> str:
    """A task's state, with how many anchors it has been pending and whether it is stale."""
    state = mixture.states.get(task, "-")
    missed = mixture.pending_anchors.get(task, 0)
    if missed:
        state += f" ({missed} anchor{'s' if missed > 1 else ''})"
    return state + (" STALE" if task in mixture.stale_tasks else "")


def held_line(mixture: Mixture) -> str:
    """Why a version's re-estimate was held back, on one line."""
    return (f"HELD ({mixture.held_reason}): the estimate predicted "
            f"{mixture.held_estimated_loss:.4g} from anchor loss {mixture.anchor_loss:.4g}; "
            "the previous weights stay in force")


def calibration_line(c: Calibration) -> str:
    """λ = λ₀ × c and what the last anchor interval said about it, on one line."""
    line = (
        f"lambda {c.regularization:.4g} = prior {c.prior_regularization:.4g} "
        f"[{c.prior_source}] x factor {c.factor:.4g}  observations {c.observations}"
    )
    if c.predicted_change or c.realized_change:
        line += (
            f"  predicted {c.predicted_change:+.4f}  realized {c.realized_change:+.4f}"
        )
    return line + (f"  ({c.note})" if c.note else "")


def history_table(mixtures: Sequence[Mixture]) -> str:
    """One line per version, oldest first."""
    rows = []
    for m in mixtures:
        top = sorted(m.weights.items(), key=lambda kv: (-kv[1], kv[0]))
        weights = " ".join(f"{t}={w:.3f}" for t, w in top)
        policy = f"{m.policy} (pinned)" if m.pinned else m.policy
        flags = [f"held:{m.held_reason}"] if m.held else []
        flags += [f"stale:{','.join(m.stale_tasks)}"] if m.stale_tasks else []
        rows.append((m.version, _when(m.created_at), m.anchor or "-", policy,
                     " ".join(flags) or "-", weights))
    return table(("VERSION", "CREATED", "ANCHOR", "POLICY", "FLAGS", "WEIGHTS"), rows)


def estimate_table(result: EstimateResult) -> str:
    """One line per subset, with the anchor's own loss first."""
    rows = [("(empty)", f"{result.anchor_loss:.6f}", "+0.000000")]
    rows += [
        (",".join(s) or "(empty)", f"{loss:.6f}", f"{loss - result.anchor_loss:+.6f}")
        for s, loss in zip(result.subsets, result.losses, strict=True)
    ]
    return f"anchor {result.anchor}\n" + table(("SUBSET", "LOSS", "VS_ANCHOR"), rows)


def selection_table(selection: Selection) -> str:
    """The selected tasks and the scores behind them."""
    head = (
        f"anchor {selection.anchor}  method {selection.method}  "
        f"selected {','.join(selection.selected) or '(none)'}  "
        f"estimated_loss {selection.estimated_loss:.6f}  anchor_loss {selection.anchor_loss:.6f}"
    )
    order = sorted(selection.scores, key=lambda t: (selection.scores[t], t))
    rows = [
        (t, f"{selection.scores[t]:+.5f}", "yes" if t in selection.selected else "")
        for t in order
    ]
    return head + "\n" + table(("TASK", "SCORE", "SELECTED"), rows)


def events_table(events: Sequence[JobEvent]) -> str:
    """One line per event of a job's log, oldest first."""
    rows = [
        (e.sequence, _when(e.created_at), e.actor, e.action, e.task or "-",
         " ".join(f"{k}={v}" for k, v in sorted(e.details.items())) or "-")
        for e in events
    ]
    return table(("SEQ", "WHEN", "ACTOR", "ACTION", "TASK", "DETAILS"), rows)
