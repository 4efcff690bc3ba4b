"""Per-task scores (lower = more helpful) turned into a mixture.

Scores are compared in units of their *standard error*, their sampling
noise (a bootstrap over the sketched rows, `gradmix.server.policies.
bootstrap_scores`), so the mixture is sharp exactly where the evidence is.
With σ the standard error of one score, a task's gap to the best is a
difference of two scores, whose standard error is √2·σ:

    z_t = (score_t - min score) / (√2·σ)
    p_t ∝ exp(-max(0, z_t - m) / τ)

Tasks within the margin m of the best score cannot be told apart from it
and share the weight equally; each standard error beyond the margin costs a
factor e^(1/τ). With the defaults (m = 2, τ = 0.5) a task 4 standard errors
of the gap behind the best gets e⁻⁴ ≈ 2% of its weight, one 6 behind e⁻⁸.

Why a margin: two equally helpful tasks' scores differ by noise alone, and
a plain softmax at a temperature sharp enough to drop the harmful tasks
hands most of the weight to whichever of the two the draw favoured. At one
anchor of bench/outcome.py's near-misses suite (dense sketches, two truly
near-tied helpful tasks), redrawing the sketched rows moved a plain softmax
mixture by a total variation of 0.6–0.9 and the margin's by ≤ 0.05; on other
suites and anchors the margin still leaves 0.3–0.6 (the bench's stability
line), so it is no guarantee. An
earlier version divided the scores by their spread across tasks instead of
σ; that capped how sharp a mixture could get (the best of six tasks got
≈ 30% at τ = 0.5) and let noise between near-tied tasks swing it.

Where each task's own σ_t is known (`task_errors`, from the same
bootstrap), task t is behind the best task b by (score_t − score_b) /
√(σ_t² + σ_b²) instead: a task whose rows are noisy has a noisier
score, and one σ for all, their root mean square, put such a task several
σ behind the best where it was within the noise of it. bench/outcome.py's
near-misses suite (with the fast mode's curvature bound,
`gradmix.server.task_statistics`): stability at one anchor 0.199 with one
σ, 0 with each task's own.

An earlier version divided the gap by √((σ_t² + σ_b²)/2), the noise of one
score rather than of the gap, so its margin was 1.4 standard errors of the
gap, not 2. A gap near the margin moves by about one of its standard errors
between two draws of the rows, and beyond the margin each one costs a
factor e² of the weight: bench/outcome.py's stability at the second anchor
of seeds 0-3, near-misses 0 / 0.384 / 0.464 / 0.332 with the narrower
margin and 0 / 0.068 / 0.266 / 0.006 with this one (sizes-and-noise 0.084 /
0.226 / 0 / 0.470 and 0.140 / 0.279 / 0 / 0.488, before elimination capped
thin tasks, `gradmix.server.compose`); gradmix over seeds 0-5
near-misses 0.527 and 0.557, complementary 0.867 and 0.861,
sizes-and-noise 1.653 and 1.672, and over seeds 6-11 0.580 and 0.584,
0.818 both, 1.713 and 1.720: the same within the seeds' spread.

When σ is 0 (a policy that does not read the sketches, or rows with no
spread) the spread across tasks stands in for it; when all scores are equal
(or there is one task) the mixture is uniform.

The floor ε then guarantees every task at least ε: tasks below it are raised
to ε and the others rescaled to fill the remaining mass, repeated until none
is below ε (ratios between unfloored tasks are kept). ε must be < 1/n.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np
from gradmix.server.errors import InvalidArgumentError, NonFiniteError

#: Spreads below this (relative to the score magnitude) count as "all equal".
_EQUAL_SCORES = 1e-12
#: m: tasks within this many standard errors of the best share its weight.
TIE_MARGIN = 2.0


def scores_to_mixture(
    scores: Mapping[str, float],
    *,
    temperature: float,
    floor: float,
    error: float = 0.0,
    margin: float = TIE_MARGIN,
    errors: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Maps scores to mixture weights that sum to 1 (see the module docstring).

    Args:
        scores: Task → score, lower is more helpful. Empty gives {}.
        temperature: τ > 0, in standard errors of a gap to the best (√2·`error`).
        floor: ε ≥ 0, the least weight of any task; ε·n < 1.
        error: σ ≥ 0, the scores' standard error; 0 uses their spread.
        margin: m ≥ 0, in standard errors of the gap: tasks this close to the best tie
            with it.
        errors: each task's own standard error σ_t (`task_errors`), where known:
            task t is then behind the best task b by (score_t − score_b) /
            √(σ_t² + σ_b²), in place of √2·σ (√2·σ where a pair's is 0).

    Raises:
        InvalidArgumentError: τ ≤ 0, ε < 0 or ε·n ≥ 1.
        NonFiniteError: a score is NaN or Inf.
    """
    if not math.isfinite(temperature) or temperature <= 0:
        raise InvalidArgumentError(f"temperature must be positive and finite, got {temperature}")
    n = len(scores)
    if not math.isfinite(floor) or floor < 0 or (n and floor * n >= 1):
        raise InvalidArgumentError(f"floor must be in [0, 1/{n}) for {n} tasks, got {floor}")
    if n == 0:
        return {}
    names = list(scores)
    values = np.array([scores[name] for name in names], dtype=np.float64)
    if not np.isfinite(values).all():
        raise NonFiniteError("scores contain NaN or Inf")
    if not math.isfinite(error) or error < 0:
        raise InvalidArgumentError(f"error must be finite and >= 0, got {error}")
    if not math.isfinite(margin) or margin < 0:
        raise InvalidArgumentError(f"margin must be finite and >= 0, got {margin}")
    own = np.array([(errors or {}).get(name, 0.0) for name in names], dtype=np.float64)
    if not np.isfinite(own).all() or (own < 0).any():
        raise InvalidArgumentError("errors must be finite and >= 0")
    spread = float(values.std())
    scale: float | np.ndarray = math.sqrt(2.0) * error if error > 0 else spread
    if errors:
        pair = np.sqrt(own**2 + own[int(values.argmin())] ** 2)
        scale = np.where(pair > 0, pair, scale)
    if spread <= _EQUAL_SCORES * max(1.0, float(np.abs(values).max())):
        weights = np.full(n, 1.0 / n)
    else:
        tied = margin if error > 0 or (own > 0).any() else 0.0
        behind = np.maximum(0.0, (values - values.min()) / scale - tied)
        logits = -behind / temperature
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
    weights = apply_floor(weights, floor)
    return {name: float(w) for name, w in zip(names, weights, strict=True)}


def standard_error(replicates: np.ndarray) -> float:
    """σ of scores from their bootstrap replicates (B, n): 0 with fewer than two.

    Scores only matter relative to each other, so each replicate is centred
    first; σ is the root mean square over tasks of each centred score's
    standard deviation across the replicates.
    """
    return pooled_error(task_errors(replicates).tolist())


def pooled_error(errors: Collection[float]) -> float:
    """σ from tasks' own σ_t: their root mean square (0 for none)."""
    return float(np.sqrt(np.mean(np.square(list(errors))))) if errors else 0.0


def task_errors(replicates: np.ndarray) -> np.ndarray:
    """σ_t of each task's score from bootstrap replicates (B, n): the standard
    deviation across replicates of its centred score (`standard_error` is their
    root mean square); zeros with fewer than two replicates.

    A task whose rows are noisy (a noisy label, few distinct examples) has a
    noisier score than the others: one σ for all of them, the root mean square,
    understates how far apart such a task and the best can be by chance
    (bench/outcome.py's sizes-and-noise suite: redraws of the sketched rows
    swapped the lead between two tasks several σ apart).
    """
    samples = np.asarray(replicates, dtype=np.float64)
    if samples.ndim != 2 or samples.shape[0] < 2:
        return np.zeros(samples.shape[-1] if samples.ndim == 2 else 0)
    if not np.isfinite(samples).all():
        raise NonFiniteError("score replicates contain NaN or Inf")
    centred = samples - samples.mean(axis=1, keepdims=True)
    deviations: np.ndarray = centred.std(axis=0, ddof=1)
    return deviations


def apply_floor(weights: np.ndarray, floor: float) -> np.ndarray:
    """Raises weights below `floor` to it, rescaling the rest to keep the sum 1."""
    result = weights / weights.sum()
    floored = np.zeros(result.shape, dtype=bool)
    while True:
        low = ~floored & (result < floor)
        if not low.any():
            return result
        floored |= low
        free = result[~floored].sum()
        result = np.where(floored, floor, result * (1.0 - floor * floored.sum()) / free)


def smooth_mixture(
    previous: Mapping[str, float] | None, new: Mapping[str, float], smoothing: float
) -> dict[str, float]:
    """(1-β)·new + β·previous over the tasks of `new`, renormalised to sum to 1.

    A task absent from `previous` keeps its new weight. With no previous
    mixture (or β = 0) `new` is returned as it is.
    """
    if not previous or smoothing <= 0 or not new:
        return dict(new)
    mixed = {t: (1 - smoothing) * w + smoothing * previous.get(t, w) for t, w in new.items()}
    total = sum(mixed.values())
    return {t: w / total for t, w in mixed.items()}


def cap_weights(weights: Mapping[str, float], capped: Collection[str],
                cap: float) -> dict[str, float]:
    """Limits the tasks in `capped` to at most `cap`, giving the excess to the others
    in proportion to their weights (ratios between uncapped tasks are kept)."""
    result = dict(weights)
    if not capped or all(t in capped for t in result):
        return result
    for _ in range(len(result)):
        over = [t for t in capped if result.get(t, 0.0) > cap]
        if not over:
            break
        excess = sum(result[t] - cap for t in over)
        for t in over:
            result[t] = cap
        free = {t: w for t, w in result.items() if t not in capped}
        total = sum(free.values())
        for t, w in free.items():
            result[t] = w + excess * (w / total if total > 0 else 1 / len(free))
    return result
