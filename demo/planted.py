"""Planted synthetic sketches: tasks whose effect on the target is known.

The target's gradients share one hidden unit direction u (g_v = s·u + noise).
Fitting w on a task moves w along the mean direction of that task's rows:

* helpful tasks have rows along +u, so their w raises the target's margins
  f_v + g_vᵀw and lowers its loss;
* harmful tasks are either anti-aligned (rows along -u) or label-noise-like
  (rows along +u or -u at random, mostly -u), so their w lowers the margins;
* neutral tasks have rows along a direction orthogonal to u: their w leaves
  the target's margins unchanged on average.

Used by tests, the estimator demo and benchmarks; numpy only.
"""

from __future__ import annotations

import numpy as np

HELPFUL = "helpful"
HARMFUL = "harmful"
NEUTRAL = "neutral"
#: Fraction of rows along +u in a label-noise-like harmful task.
NOISY_LABEL_AGREEMENT = 0.2

TaskRows = tuple[np.ndarray, np.ndarray]


def planted_tasks(
    n_helpful: int,
    n_harmful: int,
    n_neutral: int,
    rows: int,
    dim: int,
    seed: int,
    *,
    signal: float = 1.0,
    noise: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, dict[str, TaskRows], dict[str, str]]:
    """Builds planted target and task sketches.

    Args:
        n_helpful, n_harmful, n_neutral: Number of tasks of each kind.
        rows: Rows per task and for the target.
        dim: Sketch dimension d (≥ 2).
        seed: Seed of every random draw.
        signal: Length of the planted component of each row.
        noise: Norm (in expectation) of the isotropic noise added to each row.

    Returns:
        (target_grads float32 (rows, d), target_values float64 (rows,),
        {task: (grads, values)} in a shuffled order, {task: "helpful" |
        "harmful" | "neutral"}). Tasks are named "<kind>-<i>"; harmful tasks
        alternate between anti-aligned (even i) and label-noise-like (odd i).
    """
    if min(n_helpful, n_harmful, n_neutral) < 0 or rows < 1 or dim < 2:
        raise ValueError("need nonnegative task counts, rows >= 1 and dim >= 2")
    rng = np.random.default_rng(seed)
    u = _unit(rng.standard_normal(dim))

    def sketch(direction: np.ndarray, agreement: float) -> TaskRows:
        signs = np.where(rng.random(rows) < agreement, 1.0, -1.0)
        grads = signal * signs[:, None] * direction + rng.standard_normal((rows, dim)) * (
            noise / np.sqrt(dim)
        )
        values = rng.normal(0.0, 0.5, rows)
        return grads.astype(np.float32), values

    target_grads, target_values = sketch(u, 1.0)
    planted: list[tuple[str, str, TaskRows]] = []
    for i in range(n_helpful):
        planted.append((f"{HELPFUL}-{i}", HELPFUL, sketch(u, 1.0)))
    for i in range(n_harmful):
        agreement = 0.0 if i % 2 == 0 else NOISY_LABEL_AGREEMENT
        planted.append((f"{HARMFUL}-{i}", HARMFUL, sketch(u, agreement)))
    for i in range(n_neutral):
        other = rng.standard_normal(dim)
        planted.append((f"{NEUTRAL}-{i}", NEUTRAL, sketch(_unit(other - (other @ u) * u), 1.0)))
    order = rng.permutation(len(planted))
    tasks = {planted[j][0]: planted[j][2] for j in order}
    labels = {planted[j][0]: planted[j][1] for j in order}
    return target_grads, target_values, tasks, labels


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)
