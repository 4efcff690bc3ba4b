"""Per-task scores (lower = more helpful) turned into a mixture.

The temperature is in units of the scores' *standard error* σ, their
sampling noise (a bootstrap over the sketched rows, see
`gradmix.server.policies.score_error`), so the mixture is sharp exactly where
the evidence is:

    z_t = (score_t - min score) / σ
    p_t ∝ exp(-z_t / τ)

A task one standard error better than another gets exp(1/τ) times its
weight. Differences inside the noise barely move the mixture; a task many
standard errors worse than the best falls to the floor.

The default τ = 4 keeps a mixture stable when its sketched rows are drawn
again (total variation ≤ 0.1 between two draws, tests/test_policies.py):
near-tied tasks, equally helpful ones say, share their weight instead of one
of them taking it by chance (at τ = 1 two draws differed by up to 0.26),
while a task whose score stands 20 standard errors behind still gets e⁻⁵ of
the best task's weight. An earlier version
divided by the scores' spread across tasks instead; that capped how sharp a
mixture could get (with τ = 0.5 the best of six tasks got ≈ 30%) and let
noise between near-tied tasks swing it. When σ is 0 (a policy that does not
read the sketches, or rows with no spread) the spread is used instead; when
all scores are equal (or there is one task) the mixture is uniform.

The floor ε then guarantees every task at least ε: tasks below it are raised
to ε and the others rescaled to fill the remaining mass, repeated until none
is below ε (ratios between unfloored tasks are kept). ε must be < 1/n.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from gradmix.server.errors import InvalidArgumentError, NonFiniteError

#: Spreads below this (relative to the score magnitude) count as "all equal".
_EQUAL_SCORES = 1e-12


def scores_to_mixture(
    scores: Mapping[str, float], *, temperature: float, floor: float, error: float = 0.0
) -> dict[str, float]:
    """Maps scores to mixture weights that sum to 1 (see the module docstring).

    Args:
        scores: Task → score, lower is more helpful. Empty gives {}.
        temperature: τ > 0, in units of `error`.
        floor: ε ≥ 0, the least weight of any task; ε·n < 1.
        error: σ ≥ 0, the scores' standard error; 0 uses their spread.

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
    spread = float(values.std())
    scale = error if error > 0 else spread
    if spread <= _EQUAL_SCORES * max(1.0, float(np.abs(values).max())):
        weights = np.full(n, 1.0 / n)
    else:
        logits = -(values - values.min()) / (scale * temperature)
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
    samples = np.asarray(replicates, dtype=np.float64)
    if samples.ndim != 2 or samples.shape[0] < 2 or samples.shape[1] == 0:
        return 0.0
    if not np.isfinite(samples).all():
        raise NonFiniteError("score replicates contain NaN or Inf")
    centred = samples - samples.mean(axis=1, keepdims=True)
    return float(np.sqrt(np.mean(centred.var(axis=0, ddof=1))))


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


def cap_weights(weights: Mapping[str, float], capped: set[str], cap: float) -> dict[str, float]:
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
