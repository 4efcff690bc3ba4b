"""What the demo shows: a live mixture table, an end summary, and a PNG plot.

`LiveTable` redraws a table of tasks (label, state, weight, score) each time a
mixture version arrives, with a progress line under it; tasks that enter
mid-run are flagged with the version they entered at. On a terminal it redraws
in place (a live view of `gradmix.client.render`, the renderer the `gradmix` CLI
uses); into a pipe or a file it prints each version once, and a progress line at
most every few seconds, so logs stay readable.

`summarize` compares the final mixture with a uniform one and the two runs'
final target losses. `plot_runs` draws per-task weights over steps and the
target loss over steps against the uniform-mixture run (matplotlib, Agg).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

from gradmix.client import render
from rich.console import Group, RenderableType
from rich.text import Text


class MixtureView(Protocol):
    """What the report reads from a mixture (`gradmix.client.Mixture` fits)."""

    @property
    def version(self) -> int: ...
    @property
    def anchor(self) -> str: ...
    @property
    def policy(self) -> str: ...
    @property
    def weights(self) -> Mapping[str, float]: ...
    @property
    def scores(self) -> Mapping[str, float]: ...
    @property
    def states(self) -> Mapping[str, str]: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class WeightPoint:
    """A mixture version and the training step it took effect at."""

    step: int
    version: int
    weights: Mapping[str, float]


@dataclass(kw_only=True, slots=True)
class RunHistory:
    """One training run as the report sees it."""

    name: str
    """"gradmix" or "uniform" (or any label for the legend)."""
    target_loss: list[tuple[int, float]] = field(default_factory=list)
    """(step, target loss) pairs, ascending step."""
    weights: list[WeightPoint] = field(default_factory=list)
    """Mixture versions in the order they took effect."""

    def final_target_loss(self) -> float | None:
        """The last recorded target loss, or None if there is none."""
        return self.target_loss[-1][1] if self.target_loss else None


_BAR_WIDTH = 20
_LABEL_STYLES = {"helpful": "green", "neutral": "dim", "harmful": "red"}


def _bar(weight: float) -> str:
    filled = round(max(0.0, min(1.0, weight)) * _BAR_WIDTH * 2.5)  # 0.4 fills the bar
    return ("#" * min(filled, _BAR_WIDTH)).ljust(_BAR_WIDTH)


class LiveTable:
    """A table of tasks and weights, redrawn as mixture versions arrive.

    Thread-safe: a watcher thread may call `on_mixture` while the training
    thread calls `on_progress`.
    """

    def __init__(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        progress_every: float = 5.0,
        show_table: bool = True,
    ) -> None:
        """Create the table.

        Args:
            labels: Known effect of each task (helpful/neutral/harmful), shown
                as a column; unknown tasks show "-".
            stream: Where to draw (default: stdout).
            interactive: Redraw in place with ANSI codes; default: the stream
                is a terminal.
            progress_every: In non-interactive mode, the least seconds between
                two printed progress lines.
            show_table: False shows the progress line alone (a run whose
                mixture is not the point, e.g. the uniform baseline).
        """
        self._labels = dict(labels or {})
        self._stream = stream if stream is not None else sys.stdout
        self._interactive = self._stream.isatty() if interactive is None else interactive
        self._progress_every = progress_every
        self._show_table = show_table
        self._lock = threading.Lock()
        self._mixture: MixtureView | None = None
        self._entered: dict[str, int] = {}
        self._initial: set[str] | None = None
        self._progress = ""
        self._live = render.LiveView(self._stream, tty=self._interactive)
        self._last_progress_print = 0.0

    @property
    def entered(self) -> dict[str, int]:
        """The version at which each task first appeared."""
        with self._lock:
            return dict(self._entered)

    def on_mixture(self, mixture: MixtureView) -> None:
        """Take a new mixture version and redraw."""
        with self._lock:
            if self._mixture is not None and mixture.version <= self._mixture.version:
                return
            for task in mixture.weights:
                self._entered.setdefault(task, mixture.version)
            if self._initial is None:
                self._initial = set(mixture.weights)
            self._mixture = mixture
            self._draw(table_changed=True)

    def on_progress(self, line: str) -> None:
        """Replace the progress line under the table."""
        with self._lock:
            self._progress = line
            self._draw(table_changed=False)

    def render(self) -> str:
        """The table and progress line as plain text."""
        with self._lock:
            return render.text(Group(*self._table(), Text(self._progress))).strip("\n")

    def close(self) -> None:
        """Leave the last drawing on screen and move below it."""
        with self._lock:
            if not self._interactive and self._progress:
                self._stream.write(self._progress + "\n")
                self._stream.flush()
            self._live.close()

    def _table(self) -> list[RenderableType]:
        """The mixture's header line and its table (nothing with `show_table` off)."""
        if not self._show_table:
            return []
        mixture = self._mixture
        if mixture is None:
            return [Text("(waiting for the first mixture)")]
        head = Text(
            f"mixture v{mixture.version}  anchor={mixture.anchor or '-'}  "
            f"policy={mixture.policy}  (uniform = {1 / max(1, len(mixture.weights)):.3f})"
        )
        rows = []
        for task, weight in sorted(mixture.weights.items(), key=lambda kv: -kv[1]):
            score = mixture.scores.get(task)
            label = self._labels.get(task, "-")
            late = ""
            if self._initial is not None and task not in self._initial:
                late = f"new in v{self._entered[task]}"
            rows.append((
                task, Text(label, style=_LABEL_STYLES.get(label, "")),
                render.state(mixture.states.get(task, "-")), f"{weight:.3f}",
                Text(_bar(weight), style=_LABEL_STYLES.get(label, "")),
                f"{score:+.4f}" if score is not None else "-", late,
            ))
        grid = render.table(("task", "label", "state", "weight", "", "score", ""), rows,
                            right=("weight", "score"))
        return [head, grid]

    def _draw(self, *, table_changed: bool) -> None:
        if self._interactive:
            self._live.update(Group(*self._table(), Text(self._progress)))
            return
        if table_changed:
            if self._show_table:
                render.show(Group(*self._table()), self._stream)
            return
        now = time.monotonic()
        if now - self._last_progress_print < self._progress_every:
            return
        self._last_progress_print = now
        self._stream.write(self._progress + "\n")
        self._stream.flush()


def progress_line(
    *,
    run: str,
    step: int,
    total: int,
    loss: float | None = None,
    target_loss: float | None = None,
    version: int | None = None,
    elapsed: float | None = None,
) -> str:
    """One progress line: ``[gradmix] step 120/600 loss 1.23 target 0.98 mixture v4 31s``."""
    parts = [f"[{run}] step {step}/{total}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if target_loss is not None:
        parts.append(f"target {target_loss:.4f}")
    if version is not None:
        parts.append(f"mixture v{version}")
    if elapsed is not None:
        parts.append(f"{elapsed:.0f}s")
    return "  ".join(parts)


def summarize(
    final: MixtureView,
    *,
    labels: Mapping[str, str] | None = None,
    gradmix_loss: float | None = None,
    uniform_loss: float | None = None,
) -> str:
    """The end summary: tasks up- and down-weighted vs uniform, final target losses."""
    known = labels or {}
    n = max(1, len(final.weights))
    uniform = 1.0 / n
    ranked = sorted(final.weights.items(), key=lambda kv: -kv[1])

    def describe(items: Sequence[tuple[str, float]]) -> str:
        if not items:
            return "  (none)"
        rows = [(task, f"{weight:.3f}", f"{weight / uniform:.2f}x", known.get(task, "-"))
                for task, weight in items]
        grid = render.table(("task", "weight", "vs uniform", "label"), rows,
                            right=("weight", "vs uniform"))
        return "\n".join("  " + line for line in render.text(grid).splitlines())

    up = [(t, w) for t, w in ranked if w > uniform * 1.05]
    down = [(t, w) for t, w in ranked if w < uniform / 1.05]
    lines = [
        f"final mixture v{final.version} (anchor {final.anchor or '-'}, policy "
        f"{final.policy}); uniform would give each of {n} tasks {uniform:.3f}",
        "up-weighted:",
        describe(up),
        "down-weighted:",
        describe(down),
    ]
    if gradmix_loss is not None:
        text = f"final target loss: gradmix {gradmix_loss:.4f}"
        if uniform_loss is not None:
            change = (gradmix_loss - uniform_loss) / uniform_loss * 100.0
            text += f", uniform {uniform_loss:.4f} ({change:+.1f}% vs uniform)"
        lines.append(text)
    return "\n".join(lines)


_COLORS = {"helpful": "tab:green", "neutral": "tab:gray", "harmful": "tab:red"}
_STYLES = ("-", "--", ":", "-.")


def _weight_series(run: RunHistory, task: str, last_step: int) -> tuple[list[int], list[float]]:
    """Step-function coordinates of one task's weight, from when it entered."""
    steps: list[int] = []
    values: list[float] = []
    for point in run.weights:
        if task in point.weights:
            if steps:  # hold the previous value until this step
                steps.append(point.step)
                values.append(values[-1])
            steps.append(point.step)
            values.append(point.weights[task])
    if steps:
        steps.append(max(last_step, steps[-1]))
        values.append(values[-1])
    return steps, values


def plot_runs(
    path: Path | str,
    *,
    gradmix: RunHistory,
    uniform: RunHistory | None = None,
    labels: Mapping[str, str] | None = None,
    total_steps: int | None = None,
) -> Path:
    """Write the PNG: per-task weights over steps (top), target loss (bottom).

    Args:
        path: Output PNG path (parent created if missing).
        gradmix: The run following gradmix's mixtures.
        uniform: The same run with a uniform mixture, if it was run.
        labels: Known effect of each task; colours helpful green, neutral
            grey, harmful red.
        total_steps: Right end of the x axis (default: the last step seen).

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    known = labels or {}
    steps_seen = [s for s, _ in gradmix.target_loss] + [p.step for p in gradmix.weights]
    last = total_steps if total_steps is not None else max(steps_seen, default=0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    tasks = list(dict.fromkeys(t for p in gradmix.weights for t in p.weights))
    per_label: dict[str, int] = {}
    for task in tasks:
        label = known.get(task, "other")
        style = _STYLES[per_label.get(label, 0) % len(_STYLES)]
        per_label[label] = per_label.get(label, 0) + 1
        xs, ys = _weight_series(gradmix, task, last)
        top.plot(
            xs, ys, style, color=_COLORS.get(label, "tab:blue"), lw=1.8, label=f"{task} ({label})"
        )
    if gradmix.weights:  # what a uniform mixture would give, as tasks arrive
        xs_u = [p.step for p in gradmix.weights] + [last]
        ys_u = [1.0 / max(1, len(p.weights)) for p in gradmix.weights]
        top.step(
            xs_u,
            [*ys_u, ys_u[-1]],
            where="post",
            color="black",
            lw=1,
            alpha=0.6,
            label="uniform (1/n)",
        )
    top.set_ylabel("mixture weight")
    top.set_title("gradmix: per-task weights (green helpful, grey neutral, red harmful)")
    top.legend(fontsize=8, ncol=2, loc="upper left")
    top.grid(alpha=0.3)
    for run, color in ((gradmix, "tab:blue"), (uniform, "tab:orange")):
        if run is not None and run.target_loss:
            xs_l, ys_l = zip(*run.target_loss, strict=True)
            bottom.plot(xs_l, ys_l, "-o", ms=3, color=color, label=f"{run.name} mixture")
    bottom.set_xlabel("training step")
    bottom.set_ylabel("target loss (token cross-entropy)")
    bottom.set_title("target loss")
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
