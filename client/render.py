"""Terminal rendering of gradmix's tables and live views, on rich, shared by the `gradmix`
CLI, the trainer's console and the demo.

Every view here is a rich renderable. `show` prints one to a stream: on a terminal in
colour, folded to the window's width; into a pipe or a file as plain text that is never
folded, one table row per line, so that scripts and `grep` can read it. `text` is that
plain text (at a given width, for tests and logs). `LiveView` redraws a view in place on
a terminal (`gradmix mixture --watch`, the demo's mixture table); `console` gives the
rich console of a stream, which the trainer's progress bar and its log lines share.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import TextIO

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
from gradmix.vocabulary import TaskState
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

#: Width of plain text that must not fold (a pipe, a file): wider than any table row.
UNFOLDED = 10_000

#: Colour of each task state on a terminal.
STATE_STYLES: dict[str, str] = {
    TaskState.ACTIVE: "green",
    TaskState.PENDING: "yellow",
    TaskState.RETIRED: "dim",
    TaskState.FAILED: "bold red",
}


def console(stream: TextIO, *, tty: bool | None = None) -> Console:
    """The rich console of `stream`: a terminal's (colour, its width) if `tty` (default:
    the stream is one), else plain text that never folds."""
    terminal = stream.isatty() if tty is None else tty
    if terminal:
        return Console(file=stream, force_terminal=True, highlight=False, emoji=False)
    return Console(
        file=stream, force_terminal=False, color_system=None, width=UNFOLDED,
        highlight=False, emoji=False, soft_wrap=False,
    )


def text(view: RenderableType, width: int | None = None) -> str:
    """`view` as plain text, `width` columns wide (default: never folded), without
    trailing blanks or a final newline."""
    buffer = io.StringIO()
    out = Console(
        file=buffer, force_terminal=False, color_system=None, width=width or UNFOLDED,
        highlight=False, emoji=False,
    )
    out.print(view)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def show(view: RenderableType, stream: TextIO) -> None:
    """Print `view` to `stream`: styled on a terminal, plain unfolded text otherwise."""
    if stream.isatty():
        console(stream, tty=True).print(view)
    else:
        stream.write(text(view) + "\n")
    stream.flush()


class LiveView:
    """A view redrawn in place on a terminal (a rich Live display); elsewhere each
    update is printed whole, once.

    Args:
        stream: where to draw.
        tty: whether `stream` is a terminal (default: ask it).
    """

    def __init__(self, stream: TextIO, *, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._live: Live | None = None
        if self.tty:
            self._live = Live(
                console=console(stream, tty=True), auto_refresh=False,
                redirect_stdout=False, redirect_stderr=False,
            )

    def __enter__(self) -> LiveView:
        if self._live is not None:
            self._live.start()
        return self

    def update(self, view: RenderableType) -> None:
        """Replace what is shown by `view`."""
        if self._live is None:
            show(view, self.stream)
            return
        if not self._live.is_started:
            self._live.start()
        self._live.update(view, refresh=True)

    def close(self) -> None:
        """Leave the last view on screen and move below it."""
        if self._live is not None and self._live.is_started:
            self._live.stop()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


Cell = object


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[Cell]],
    *,
    right: Iterable[str] = (),
) -> Table:
    """Columns separated by two spaces, no borders, the header in bold; the columns
    named in `right` are right-aligned. A cell is a `Text` (kept, with its style) or
    anything else (shown as `str()`, never read as markup)."""
    aligned = set(right)
    grid = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold",
                 show_edge=False, expand=False)
    for name in header:
        grid.add_column(name, justify="right" if name in aligned else "left",
                        overflow="fold")
    for row in rows:
        grid.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in row))
    return grid


def _when(timestamp: float) -> str:
    if timestamp <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def state(name: str) -> Text:
    """A task state, coloured on a terminal."""
    return Text(name, style=STATE_STYLES.get(name, ""))


def jobs_table(jobs: Sequence[Job]) -> Table:
    """One line per job; an ARCHIVED column when some job is archived."""
    archived = any(j.archived_at for j in jobs)
    rows = [
        (j.name, j.current_anchor or "-", j.mixture_version, j.task_count,
         j.spec.sketch.dim, j.spec.policy.policy, _when(j.created_at),
         *([_when(j.archived_at)] if archived else []))
        for j in jobs
    ]
    header = ("JOB", "ANCHOR", "VERSION", "TASKS", "DIM", "POLICY", "CREATED")
    return table((*header, *(("ARCHIVED",) if archived else ())), rows,
                 right=("VERSION", "TASKS", "DIM"))


def tasks_table(tasks: Sequence[Task]) -> RenderableType:
    """One line per task, then a line for each failed task with its reason."""
    rows = [
        (t.name, state(t.state), t.sketch_rows,
         ",".join(f"{k}={v}" for k, v in sorted(t.metadata.items())) or "-")
        for t in tasks
    ]
    grid = table(("TASK", "STATE", "ROWS", "METADATA"), rows, right=("ROWS",))
    failures = [Text(f"{t.name} failed: {t.failure}", style="red") for t in tasks if t.failure]
    return Group(grid, *failures)


def anchors_table(anchors: Sequence[Anchor]) -> Table:
    """One line per anchor."""
    rows = [
        (a.name, a.step, a.state, a.target_rows, _when(a.declared_at), _horizon(a))
        for a in anchors
    ]
    return table(("ANCHOR", "STEP", "STATE", "TARGET_ROWS", "DECLARED", "HORIZON"), rows,
                 right=("STEP", "TARGET_ROWS"))


def _horizon(anchor: Anchor) -> str:
    h = anchor.horizon
    if h is None:
        return "-"
    return f"{h.optimizer} lr={h.learning_rate:.3g} steps={h.steps} p={h.parameters}"


def mixture_table(mixture: Mixture, disconnected_since: float | None = None) -> Group:
    """Two header lines (each fits 80 columns for usual names), then one line per
    task, heaviest first; with `disconnected_since`, a first line (red on a terminal)
    saying the table is the last one received before the server went away."""
    lines: list[RenderableType] = []
    if disconnected_since is not None:
        lines.append(Text(
            f"DISCONNECTED since {_when(disconnected_since)}: reconnecting; "
            "last version received:", style="bold red",
        ))
    lines.append(Text(
        f"job {mixture.job}  version {mixture.version}  anchor {mixture.anchor or '-'}  "
        f"policy {mixture.policy}"
    ))
    second = Text(
        f"anchor_loss {mixture.anchor_loss:.4f}  estimated_loss {mixture.estimated_loss:.4f}"
        f"  at {_when(mixture.created_at)}"
    )
    if mixture.pinned:
        second.append("  PINNED", style="bold yellow")
    lines.append(second)
    if mixture.held:
        lines.append(Text(held_line(mixture), style="yellow"))
    order = sorted(mixture.weights, key=lambda t: (-mixture.weights[t], t))
    rows = [
        (t, f"{mixture.weights[t]:.4f}", f"{mixture.scores.get(t, 0.0):+.5f}",
         _state(mixture, t))
        for t in order
    ]
    lines.append(table(("TASK", "WEIGHT", "SCORE", "STATE"), rows, right=("WEIGHT", "SCORE")))
    if mixture.calibration is not None:
        lines.append(Text(calibration_line(mixture.calibration)))
    return Group(*lines)


def _state(mixture: Mixture, task: str) -> Text:
    """A task's state, with how many anchors it has been pending and whether it is stale."""
    shown = state(mixture.states.get(task, "-"))
    missed = mixture.pending_anchors.get(task, 0)
    if missed:
        shown.append(f" ({missed} anchor{'s' if missed > 1 else ''})")
    if task in mixture.stale_tasks:
        shown.append(" STALE", style="bold yellow")
    return shown


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


def history_table(mixtures: Sequence[Mixture]) -> Table:
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
    return table(("VERSION", "CREATED", "ANCHOR", "POLICY", "FLAGS", "WEIGHTS"), rows,
                 right=("VERSION",))


def estimate_table(result: EstimateResult) -> Group:
    """One line per subset, with the anchor's own loss first."""
    rows = [("(empty)", f"{result.anchor_loss:.6f}", "+0.000000")]
    rows += [
        (",".join(s) or "(empty)", f"{loss:.6f}", f"{loss - result.anchor_loss:+.6f}")
        for s, loss in zip(result.subsets, result.losses, strict=True)
    ]
    return Group(Text(f"anchor {result.anchor}"),
                 table(("SUBSET", "LOSS", "VS_ANCHOR"), rows, right=("LOSS", "VS_ANCHOR")))


def selection_table(selection: Selection) -> Group:
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
    return Group(Text(head), table(("TASK", "SCORE", "SELECTED"), rows, right=("SCORE",)))


def events_table(events: Sequence[JobEvent]) -> Table:
    """One line per event of a job's log, oldest first."""
    rows = [
        (e.sequence, _when(e.created_at), e.actor, e.action, e.task or "-",
         " ".join(f"{k}={v}" for k, v in sorted(e.details.items())) or "-")
        for e in events
    ]
    return table(("SEQ", "WHEN", "ACTOR", "ACTION", "TASK", "DETAILS"), rows, right=("SEQ",))
