"""Task suites for bench/outcome.py: targets and auxiliary tasks whose effect is known.

Each suite is a target plus auxiliary tasks of different sizes, built so that
a mixture has to do more than find a copy of the target (no suite holds one):

- ``near-misses``: the target is 3-digit worked addition; the helpful tasks
  are other digit counts; the harmful ones share the target's prompts and
  get the answers systematically wrong (carries dropped, off by one) or
  random, or answered with another problem's working. Off by one is a near
  miss: only the units column and the answer's last digit are wrong, so it
  is labelled apart. Cosine similarity with the target's gradient is high
  for all of them, since they share prompts and most tokens.
- ``complementary``: the target has two kinds of examples, 3-digit worked
  addition and reversing digit strings of 3–6 digits. One task is that
  addition, another that reversal: each covers half the target and neither
  is the target, so only a mixture of both does well, and a mixture that goes
  all in on the single best task loses. Distractors: copying strings (the
  reversal's format, the wrong skill), addition with carries dropped, and
  random labels. (Its first version taught other digit counts and shorter
  strings than the target's; the tiny model learnt neither half in 400 steps
  from them, every mixture ended near ln 10 and a 50/50 mixture of the two
  tasks scored 2.82 against uniform's 2.31, so the suite could not tell
  mixtures apart.)
- ``sizes-and-noise``: the target is 3-digit worked addition; the tasks are
  correct addition at other digit counts at several sizes (one of 48
  examples) and noise levels (a fraction of completion characters replaced
  at random), plus the target's prompts with half the answer corrupted.

A task's label (helpful / neutral / harmful) only explains the outcome; no
mixture method reads it. Sizes are the number of distinct examples in a
task's pool (what a size-proportional mixture weighs by).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from gradmix.demo.tasks import Example, addition, worked_sum

#: Every character the suites emit (the char tokenizer's alphabet).
ALPHABET = "0123456789+=;><"

Maker = Callable[[random.Random], Example]


@dataclass(frozen=True, kw_only=True)
class SuiteTask:
    """One auxiliary task of a suite: its generator, pool size and known effect."""

    name: str
    label: str
    size: int
    make: Maker


@dataclass(frozen=True, kw_only=True)
class Suite:
    """A target and its auxiliary tasks."""

    name: str
    description: str
    target: Maker
    tasks: tuple[SuiteTask, ...]

    def examples(self, task: str | None, count: int, seed: int) -> list[Example]:
        """`count` examples of `task` (None: the target), deterministic in (seed, suite, task)."""
        make = self.target if task is None else self.task(task).make
        rng = random.Random(hash_seed(seed, f"{self.name}/{task or '<target>'}"))
        return [make(rng) for _ in range(count)]

    def task(self, name: str) -> SuiteTask:
        return next(t for t in self.tasks if t.name == name)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


def hash_seed(seed: int, name: str) -> int:
    """A stable per-(seed, name) integer (Python's hash() is salted per process)."""
    value = seed * 1_000_003
    for ch in name:
        value = (value * 131 + ord(ch)) % (1 << 61)
    return value


def _digits(rng: random.Random, count: int) -> int:
    return rng.randint(10 ** (count - 1), 10**count - 1)


def _corrupt(text: str, rng: random.Random, rate: float) -> str:
    return "".join(rng.choice(ALPHABET) if rng.random() < rate else ch for ch in text)


def noisy_addition(digits: int | tuple[int, ...], rate: float) -> Maker:
    """Worked addition with each completion character replaced at random with probability `rate`."""
    clean = addition(digits)

    def make(rng: random.Random) -> Example:
        ex = clean(rng)
        return Example(prompt=ex.prompt, completion=_corrupt(ex.completion, rng, rate))

    return make


def wrong_addition(*, carries: bool = True, carry_in: int = 0) -> Maker:
    """3-digit worked addition done systematically wrong (same prompts as the target)."""

    def make(rng: random.Random) -> Example:
        a, b = _digits(rng, 3), _digits(rng, 3)
        return Example(prompt=f"{a}+{b}=",
                       completion=worked_sum(a, b, carries=carries, carry_in=carry_in))

    return make


def random_labels(rng: random.Random) -> Example:
    a, b = _digits(rng, 3), _digits(rng, 3)
    length = len(worked_sum(a, b))
    return Example(prompt=f"{a}+{b}=",
                   completion="".join(rng.choice("0123456789;") for _ in range(length)))


def shuffled_answers(rng: random.Random) -> Example:
    """A 3-digit problem answered with the (correct) working of another problem."""
    a, b = _digits(rng, 3), _digits(rng, 3)
    return Example(prompt=f"{a}+{b}=", completion=worked_sum(_digits(rng, 3), _digits(rng, 3)))


def reverse(rng: random.Random) -> Example:
    s = "".join(str(rng.randrange(10)) for _ in range(rng.randint(3, 6)))
    return Example(prompt=f"{s}<", completion=s[::-1])


def copy(rng: random.Random) -> Example:
    s = "".join(str(rng.randrange(10)) for _ in range(rng.randint(3, 5)))
    return Example(prompt=f"{s}>", completion=s)


def either(first: Maker, second: Maker) -> Maker:
    """Half the examples from `first`, half from `second`."""

    def make(rng: random.Random) -> Example:
        return first(rng) if rng.random() < 0.5 else second(rng)

    return make


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            name="near-misses",
            description="3-digit worked addition; other digit counts vs same-prompt wrong answers",
            target=addition(3),
            tasks=(
                SuiteTask(name="add2", label="helpful", size=1500, make=addition(2)),
                SuiteTask(name="add4", label="helpful", size=800, make=addition(4)),
                SuiteTask(name="add3-no-carry", label="harmful", size=2000,
                          make=wrong_addition(carries=False)),
                SuiteTask(name="add3-off-by-one", label="near-miss", size=2000,
                          make=wrong_addition(carry_in=1)),
                SuiteTask(name="add3-shuffled", label="harmful", size=1200,
                          make=shuffled_answers),
                SuiteTask(name="add3-random-labels", label="harmful", size=1000,
                          make=random_labels),
                SuiteTask(name="reverse", label="neutral", size=1000, make=reverse),
            ),
        ),
        Suite(
            name="complementary",
            description="half addition, half reversal; one task adds, one reverses",
            target=either(addition(3), reverse),
            tasks=(
                SuiteTask(name="add3", label="helpful", size=2000, make=addition(3)),
                SuiteTask(name="reverse", label="helpful", size=1000, make=reverse),
                SuiteTask(name="copy", label="neutral", size=2000, make=copy),
                SuiteTask(name="add3-no-carry", label="harmful", size=1500,
                          make=wrong_addition(carries=False)),
                SuiteTask(name="add3-random-labels", label="harmful", size=1000,
                          make=random_labels),
            ),
        ),
        Suite(
            name="sizes-and-noise",
            description="3-digit worked addition; other digit counts, sizes and noise levels",
            target=addition(3),
            tasks=(
                SuiteTask(name="add2", label="helpful", size=3000, make=addition(2)),
                SuiteTask(name="add4-small", label="helpful", size=48, make=addition(4)),
                SuiteTask(name="add4-noise30", label="helpful", size=1500,
                          make=noisy_addition(4, 0.3)),
                SuiteTask(name="add-mixed-noise70", label="harmful", size=3000,
                          make=noisy_addition((2, 4), 0.7)),
                SuiteTask(name="add3-noise50", label="harmful", size=800,
                          make=noisy_addition(3, 0.5)),
                SuiteTask(name="reverse", label="neutral", size=400, make=reverse),
            ),
        ),
    )
}
