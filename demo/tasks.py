"""The demo's built-in synthetic tasks: worked multi-digit addition and its cousins.

The target is three-digit addition worked column by column, right to left, in
the spirit of the GradEx paper's own example: each column's sum (carry
included) and then the answer::

    prompt      "172+459="
    completion  "11;13;6;631"        2+9=11, 7+5+1=13, 1+4+1=6 -> 631

The working is written compactly on purpose: the sketch value f(x) averages
log-odds over every completion token, so tokens that every task shares and the
model soon predicts with certainty (operands copied from the prompt, ``+``,
``=``) would only dilute what tells the tasks apart. The auxiliary tasks are
chosen so that what helps and what hurts is known:

- helpful: more of the target's own distribution (``add3-extra``) and the same
  working at other digit counts (``add2``, ``add4``);
- neutral: copying and reversing digit strings (same characters, other skill);
- harmful: random labels (completions unrelated to the prompt), carries
  dropped, and every answer one too high.

Two more arrive while the demo trains (``late=True``): one helpful (mixed digit
counts), one noisy (half the completion's characters corrupted).

Everything is deterministic from a seed, and the whole alphabet is
``VOCABULARY`` (digits, ``+ = ;`` and ``> <``), which suits the trainer's
char-level tokenizer.

Plugging in your own data: the trainer reads one JSONL file per task, each line
``{"prompt": ..., "completion": ...}``. Either point the job's TOML at your own
files, or copy this module and add entries to ``TASKS``: a `DemoTask` needs a
name, a label (``helpful`` / ``neutral`` / ``harmful``; only used to explain
and check the demo's outcome, never by the method) and ``make_example``, a
function from a ``random.Random`` to an `Example`. ``write_tasks`` then writes
them all, target included, into a folder.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

VOCABULARY = "0123456789+=;><"
"""Every character any built-in task emits (prompt or completion)."""

LABELS = ("target", "helpful", "neutral", "harmful")
"""What a task is known to do to the target; the method never reads this."""


class DemoTaskError(ValueError):
    """A demo task definition or request that cannot be honoured."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Example:
    """One prompt/completion pair, the unit the trainer reads from JSONL."""

    prompt: str
    completion: str

    def to_json(self) -> str:
        """The example as one JSONL line (without the newline)."""
        return json.dumps({"prompt": self.prompt, "completion": self.completion})


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoTask:
    """A named generator of examples with its known effect on the target."""

    name: str
    """Task name, as registered with the server."""
    label: str
    """One of `LABELS`: what the task is known to do to the target."""
    description: str
    """One line for humans (the demo's summary prints it)."""
    make_example: Callable[[random.Random], Example] = field(repr=False)
    """Draws one example from the generator passed in."""
    late: bool = False
    """Registered mid-run by the demo rather than at start-up."""

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise DemoTaskError(f"task {self.name!r}: label {self.label!r} not in {LABELS}")
        if not self.name or not all(ch.isalnum() or ch in "._-" for ch in self.name):
            raise DemoTaskError(f"task name {self.name!r} must match [A-Za-z0-9._-]+")


# --- worked addition -------------------------------------------------------------------


def _digits(rng: random.Random, count: int) -> int:
    """A number with exactly `count` digits (no leading zero)."""
    return rng.randint(10 ** (count - 1), 10**count - 1)


def worked_sum(a: int, b: int, *, carries: bool = True, carry_in: int = 0) -> str:
    """The worked, right-to-left solution of ``a + b`` in the demo's format.

    Args:
        a: First operand (non-negative).
        b: Second operand (non-negative).
        carries: If False, carries are dropped (each column is mod 10 and
            nothing is carried): a systematically wrong procedure.
        carry_in: A carry injected into the units column; 1 gives a
            consistent but off-by-one procedure.

    Returns:
        The column sums then the answer, e.g. ``"11;13;6;631"`` for 172+459.
    """
    xs, ys = str(a)[::-1], str(b)[::-1]
    columns: list[str] = []
    answer: list[str] = []
    carry = carry_in
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        total = x + y + carry
        if not carries:
            total %= 10
        carry = total // 10
        columns.append(str(total))
        answer.append(str(total % 10))
    if carry:
        answer.append("1")
    return ";".join([*columns, "".join(reversed(answer))])


def addition(digits: int | tuple[int, ...]) -> Callable[[random.Random], Example]:
    """Correct worked addition of two numbers with `digits` digits each."""
    choices = (digits,) if isinstance(digits, int) else digits

    def make(rng: random.Random) -> Example:
        n = rng.choice(choices)
        a, b = _digits(rng, n), _digits(rng, n)
        return Example(prompt=f"{a}+{b}=", completion=worked_sum(a, b))

    return make


def _random_label(rng: random.Random) -> Example:
    """A 3-digit problem whose completion is random digits and separators."""
    a, b = _digits(rng, 3), _digits(rng, 3)
    length = len(worked_sum(a, b))
    text = "".join(rng.choice("0123456789;") for _ in range(length))
    return Example(prompt=f"{a}+{b}=", completion=text)


def _carries_dropped(rng: random.Random) -> Example:
    a, b = _digits(rng, 3), _digits(rng, 3)
    return Example(prompt=f"{a}+{b}=", completion=worked_sum(a, b, carries=False))


def _off_by_one(rng: random.Random) -> Example:
    a, b = _digits(rng, 3), _digits(rng, 3)
    return Example(prompt=f"{a}+{b}=", completion=worked_sum(a, b, carry_in=1))


def _noisy(rng: random.Random) -> Example:
    """Correct working with each character replaced at random with probability 1/2."""
    a, b = _digits(rng, 3), _digits(rng, 3)
    text = "".join(rng.choice(VOCABULARY) if rng.random() < 0.5 else ch for ch in worked_sum(a, b))
    return Example(prompt=f"{a}+{b}=", completion=text)


# --- string tasks ----------------------------------------------------------------------


def _digit_string(rng: random.Random) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(rng.randint(4, 9)))


def _copy(rng: random.Random) -> Example:
    s = _digit_string(rng)
    return Example(prompt=f"{s}>", completion=s)


def _reverse(rng: random.Random) -> Example:
    s = _digit_string(rng)
    return Example(prompt=f"{s}<", completion=s[::-1])


# --- the registry ----------------------------------------------------------------------

TARGET = DemoTask(
    name="add3",
    label="target",
    description="3-digit worked addition (the target)",
    make_example=addition(3),
)
"""The target task: its examples are the validation set whose loss should fall."""

_ALL = (
    DemoTask(
        name="add3-extra",
        label="helpful",
        description="more 3-digit worked addition (the target's own distribution)",
        make_example=addition(3),
    ),
    DemoTask(
        name="add2",
        label="helpful",
        description="2-digit worked addition",
        make_example=addition(2),
    ),
    DemoTask(
        name="add4",
        label="helpful",
        description="4-digit worked addition",
        make_example=addition(4),
    ),
    DemoTask(name="copy", label="neutral", description="copy a digit string", make_example=_copy),
    DemoTask(
        name="reverse",
        label="neutral",
        description="reverse a digit string",
        make_example=_reverse,
    ),
    DemoTask(
        name="add3-random-labels",
        label="harmful",
        description="3-digit addition, completions random (unrelated to the prompt)",
        make_example=_random_label,
    ),
    DemoTask(
        name="add3-no-carry",
        label="harmful",
        description="3-digit addition with carries dropped",
        make_example=_carries_dropped,
    ),
    DemoTask(
        name="add3-off-by-one",
        label="harmful",
        description="3-digit addition, every answer one too high",
        make_example=_off_by_one,
    ),
    DemoTask(
        name="add-mixed",
        label="helpful",
        late=True,
        description="2- to 4-digit worked addition (arrives mid-run)",
        make_example=addition((2, 3, 4)),
    ),
    DemoTask(
        name="add3-noisy",
        label="harmful",
        late=True,
        description="3-digit addition, half the completion corrupted (arrives mid-run)",
        make_example=_noisy,
    ),
)

TASKS: dict[str, DemoTask] = {task.name: task for task in _ALL}
"""Auxiliary tasks by name: copy this module and add yours here."""


def initial_tasks() -> list[str]:
    """Names of the tasks registered at start-up, in registry order."""
    return [name for name, task in TASKS.items() if not task.late]


def late_tasks() -> list[str]:
    """Names of the tasks the demo registers while training runs."""
    return [name for name, task in TASKS.items() if task.late]


def task_seed(seed: int, name: str) -> int:
    """A per-task seed, stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def generate(task: DemoTask, count: int, seed: int) -> list[Example]:
    """`count` examples of `task`, the same for the same (seed, task name)."""
    if count < 1:
        raise DemoTaskError(f"count must be >= 1, got {count}")
    rng = random.Random(task_seed(seed, task.name))
    return [task.make_example(rng) for _ in range(count)]


def write_jsonl(path: Path, examples: Iterable[Example]) -> Path:
    """Write examples as JSONL (one ``{"prompt","completion"}`` object per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for example in examples:
            out.write(example.to_json() + "\n")
    return path


@dataclass(frozen=True, kw_only=True, slots=True)
class WrittenTasks:
    """Where `write_tasks` put each task's JSONL file."""

    target: Path
    tasks: dict[str, Path]


def write_tasks(
    folder: Path | str,
    *,
    count: int = 2000,
    target_count: int = 256,
    seed: int = 0,
    tasks: Mapping[str, DemoTask] | None = None,
    target: DemoTask = TARGET,
) -> WrittenTasks:
    """Write the target and every task (late ones too) as JSONL into `folder`.

    Args:
        folder: Output directory (created if missing).
        count: Examples per auxiliary task.
        target_count: Examples of the target (its validation set).
        seed: Base seed; each task draws from its own stream.
        tasks: Tasks to write (default: `TASKS`).
        target: The target task (default: `TARGET`).

    Returns:
        The paths, the target's as ``<folder>/<target.name>.jsonl``.
    """
    root = Path(folder)
    chosen = TASKS if tasks is None else tasks
    target_path = write_jsonl(root / f"{target.name}.jsonl", generate(target, target_count, seed))
    paths = {
        name: write_jsonl(root / f"{name}.jsonl", generate(task, count, seed))
        for name, task in chosen.items()
    }
    return WrittenTasks(target=target_path, tasks=paths)
