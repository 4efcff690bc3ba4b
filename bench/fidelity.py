"""Fidelity of the subset-loss estimate L̂(S) against true fine-tunes, in two regimes.

    python bench/fidelity.py [--projector structured|dense] [--seeds 3] [--quick] ...

Protocol, per model shape and seed (the seed changes the task data, the anchor's
initialisation and training, the subsets drawn and the projection):

1. Anchor: a small causal LM (transformers config, nothing downloaded; the
   trainer's builder, char tokenizer and loss) trained with AdamW on every demo
   task for `--anchor-steps` steps, one task per step as the trainer does.
2. Sketches at the anchor with the trainer's sketch functions: the target's
   `--target-rows` examples and the first `--rows` examples of each task, for
   each value kind (`log_odds`, `geometric_log_odds`) and each projector (the
   chosen `--projector`, plus the other one unless `--no-compare`), gradients
   rounded to the trainer's storage dtype ([sketching].dtype, float16) as the
   store keeps them, each fed to a `SubsetEstimator` (fast mode, the one the
   server's policies use). The defaults of `--projector`, `--value-kind` and
   `--dim` are the trainer's (`SketchingConfig`: structured,
   geometric_log_odds, 256).
3. Subsets: `--calibration` + `--subsets` distinct random subsets of the tasks
   (sizes 2..n-2), task weights α uniform over the subset (the estimate's α).
4. Truth, in two regimes:

   * matched (the regime the estimate models): deterministic full-batch
     gradient descent from the anchor on Σ_{t∈S} α_t mean_{i∈t} softplus(-f_i)
     over the subset's sketched examples, f of the value kind being scored,
     T = `--ft-steps` steps of a learning rate η chosen a priori so that the
     all-tasks fine-tune moves ‖Δθ‖/‖θ‖ ≈ `--displacement` (η = r‖θ‖/(T‖∇L_all‖));
     the realised ‖Δθ‖/‖θ‖ is printed. λ = 1/(ηT), no calibration: the GD
     objective is the estimator's (α summing to one over S, a mean over each
     task's rows, no other factor), its displacement is -ηT·∇L(S) up to
     O((ηT)²H) terms, and the ridge step -(H+λ)⁻¹b is -ηT·b up to the same
     order at λ = 1/(ηT); b = P∇L(S), and E[PᵀP] = I makes the predicted
     margin change g_vᵀw unbiased for ∇f_vᵀΔθ. The in-sample best λ of a grid
     around it is printed for information only.
     Truth L(S) = mean softplus(-f_v) over the target at the fine-tuned θ_S.
     Noise floor: GD is deterministic; it is measured by fine-tuning one
     subset twice (expected 0).

     The horizon (T = 2, r = 1e-4) is where first order applies, chosen by the
     ceiling below (the first-order prediction from the TRUE Δθ, which uses
     neither the sketch nor the estimate), never by the estimate's score; the
     bench prints the ceiling's skill per shape and says whether it is ≥ 0.8 in
     every run. Ceiling skill measured at T = 2 (one seed per shape; gpt2-tied
     seed 0, gpt2-untied and gpt2-deep seed 1):

       r = ‖Δθ‖/‖θ‖    log_odds       geometric_log_odds
       3e-3            0.81 – 0.89    0.24 – 0.74
       1e-3            0.94 – 0.98    0.60 – 0.91
       3e-4            0.98           0.84 – 0.97
       1e-4            0.99 – 1.00    0.94 – 0.99   (every shape and seed of the
                                                    default run: min 0.99, 0.94)

     (the previous horizon, T = 3 at r = 1e-2: 0.88 and 0.15 on gpt2-tied).
     geometric_log_odds (softplus(-f) = mean token CE) is the less linear
     value: first order needs r ≲ 3e-4 for it, and the target's first-order
     change is small there (L changes by ~0.1%), so r = 1e-4 leaves a margin.
     ‖θ‖ is mostly LayerNorm gains (~70-75% of ‖θ‖² in these shapes), so
     relative to the other parameters the move is about twice r. At this
     horizon the in-sample best λ of λ₀·2^k is λ₀ = 1/(ηT) itself in all 18
     dense runs of the default run and in 14 of 18 structured ones (2λ₀ in the
     other four: three projection draws with scale 1.39–1.44, below, and one
     with 0.66); at r = 1e-2 it was
     2–3 λ₀ because the true fine-tune moved the loss less than first order
     predicts (the ceiling was no better than doing nothing) and a larger λ
     shrank the estimate towards it: λ absorbed the curvature, it was not a
     scale error of λ₀. What is left of a scale error is the projection
     draw's, in the "scale" column.
   * trainer (what the trainer really does): AdamW on token cross-entropy,
     minibatches of `--batch` from one task of S drawn per step, for
     `--trainer-steps` steps, `--replicates` replicates with different draws;
     the truth is the replicate mean. Noise floor: mean |L₁ - L₂| / mean(L₁, L₂)
     between the first two replicates. λ is calibrated on the calibration
     subsets (least mean relative error on a grid), never on the scored ones.
     For `geometric_log_odds`, softplus(-f) is the example's mean token CE, so
     that row is a cross-entropy-consistent estimate scored against CE; the
     `log_odds` row is scored in its own softplus(-f) units (the mismatch of
     objective is part of this regime).

Statistics over the scored subsets of one run (L: truth, L̂: estimate, L(∅): the
anchor's own target loss; CE: the target's mean token cross-entropy, averaged per
example then over examples, after the fine-tune):

  do_nothing  mean |L(∅) - L| / L            (the estimate "nothing changes")
  ceiling     mean |L₁ - L| / L, L₁ = mean softplus(-(f_v + ∇f_v·Δθ_S)): the
              first-order prediction from the TRUE displacement, with exact
              (unprojected) per-sample gradients of the target (torch.func);
              no first-order estimate can be expected to beat it
  rel_err     mean |L̂ - L| / L
  skill       1 - rel_err / do_nothing       (1: exact; 0: no better than nothing)
  spearman    ρ(L̂, L)
  rel_rss     Σ(L̂ - L)² / ΣL²                (the paper's squared measure)
  ρ_CE        ρ(L̂, CE)

  c.skill     1 - ceiling / do_nothing       (the ceiling's skill: ≥ 0.8 is the
              bench's criterion that first order applies in that regime)

Columns besides those: λ (matched: 1/(ηT); trainer: calibrated), "λ best" and
"err@best" (matched only: the in-sample best λ₀·2^k and its rel_err, to check
the scale of λ₀; never used for the headline), scale (the slope of the sketched
g_vᵀb_all on the exact ∇f_vᵀ∇L_all over the target rows, b_all the estimator's
all-tasks loss gradient: 1 in expectation over projection draws; one draw's
slope s acts on the estimate roughly like λ/s, so it shows how much of rel_err
is the projection's scale error. The target's and the tasks' gradients are
nearly parallel, so this error is common to every target row and does not
average out over them: over 8 draws on one anchor (gpt2-deep, seed 2, d = 256)
the structured projector's slope had mean 1.03 / 1.01 and standard deviation
0.23 / 0.21 (geometric_log_odds / log_odds; about √(2/k) for its Kronecker
factors' k = 34), the dense one's 1.03 / 1.02 and 0.07 / 0.09 (about √(2/d))),
|Δθ|/|θ| (mean over subsets and replicates), noise (the noise floor above).
Model shapes (`--shapes`): GPT-2 with tied embeddings (the demo's kind of
model), GPT-2 untied, a deeper narrower GPT-2, and optionally a tiny Llama; the
header of each run says how many parameters each projector covers.

Selection: `forward_selection` (the server's SelectTasks code) on each
estimator picks a subset; it and the all-tasks subset are truly fine-tuned in
the same regime. Reported: whether the selected subset beats all tasks, and
whether any scored subset did (i.e. whether a better subset exists at all).

Last line: the chosen `--projector`, the matched regime, value kind
`--value-kind`; each figure is the plain mean over every (shape, seed) run of
that run's figure (skill too is averaged per run, not recomputed from means):

  fidelity: skill=<> spearman=<> rel_err=<> rel_rss=<> do_nothing_rel_err=<> noise_floor=<>

`--quick` is a smoke run (one shape, one seed, tiny sizes, well under a minute);
its figures mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gradmix.demo.tasks import VOCABULARY, write_tasks
from gradmix.server.estimator import SubsetEstimator
from gradmix.server.selection import forward_selection
from gradmix.trainer.config import ModelConfig, SketchingConfig, TokenizerConfig
from gradmix.trainer.data import Batch, TokenizedExample, collate, read_jsonl
from gradmix.trainer.projectors import build_projector
from gradmix.trainer.setup import build_model, build_tokenizer
from gradmix.trainer.sketch import per_sample_gradients, sketch_examples
from gradmix.trainer.values import (
    VALUE_KINDS,
    completion_loss,
    logistic_loss,
    token_log_probs,
    values_of,
)
from gradmix.vocabulary import Projector
from scipy.stats import spearmanr
from torch import nn

PROJECTORS = (Projector.STRUCTURED, Projector.DENSE)  # the default first
REGIMES = ("matched", "trainer")
#: Trainer-regime λ grid (calibrated on held-out subsets).
LAMBDA_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
#: Matched regime, information only: the in-sample best λ among λ₀·2^k (λ₀ = 1/(ηT)).
LAMBDA_FACTORS = tuple(2.0**k for k in range(-4, 5))
MAX_LENGTH = 48
_GPT2 = {"model_type": "gpt2", "n_head": 4, "n_positions": 64}
_GPT2_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
#: Model shapes: transformers configs (vocabulary and special ids from the tokenizer). The
#: default run uses the GPT-2s (tied as in the demo, untied, deeper); add llama-tiny with
#: --shapes (it costs about a quarter more time).
SHAPES: dict[str, dict[str, Any]] = {
    "gpt2-tied": {**_GPT2, **_GPT2_NO_DROPOUT, "n_embd": 64, "n_layer": 2},
    "gpt2-untied": {
        **_GPT2,
        **_GPT2_NO_DROPOUT,
        "n_embd": 64,
        "n_layer": 2,
        "tie_word_embeddings": False,
    },
    "gpt2-deep": {**_GPT2, **_GPT2_NO_DROPOUT, "n_embd": 48, "n_layer": 4},
    "llama-tiny": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    },
}


# ------------------------------------------------------------------ set-up


@dataclass(frozen=True)
class Data:
    """Tokenised examples: the target's rows, each task's sketched rows, each task's pool."""

    target: list[TokenizedExample]
    tasks: dict[str, list[TokenizedExample]]
    train: dict[str, list[TokenizedExample]]

    @property
    def names(self) -> list[str]:
        return sorted(self.tasks)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--projector",
        choices=PROJECTORS,
        default=SketchingConfig().projector,
        help="the projector of the last line (default: the trainer's, [sketching].projector)",
    )
    p.add_argument(
        "--no-compare",
        action="store_true",
        help="sketch with --projector only (default: report both projectors)",
    )
    p.add_argument(
        "--value-kind",
        choices=VALUE_KINDS,
        default=SketchingConfig().value_kind,
        help="the value kind of the last line (default: the trainer's, [sketching].value_kind)",
    )
    p.add_argument(
        "--value-kinds", default=",".join(VALUE_KINDS), help="value kinds to run, comma-separated"
    )
    p.add_argument(
        "--shapes",
        default="gpt2-tied,gpt2-untied,gpt2-deep",
        help=f"model shapes, comma-separated, of: {', '.join(SHAPES)}",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (or from --first-seed)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--subsets", type=int, default=12, help="scored subsets K")
    p.add_argument("--calibration", type=int, default=4, help="held-out subsets for the trainer λ")
    p.add_argument("--rows", type=int, default=64, help="sketched (and fine-tuned) rows per task")
    p.add_argument("--target-rows", type=int, default=128)
    p.add_argument(
        "--dim",
        type=int,
        default=SketchingConfig().dim,
        help="sketch dimension d (default: the trainer's)",
    )
    p.add_argument("--anchor-steps", type=int, default=150)
    p.add_argument("--anchor-lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=32, help="anchor and trainer-regime batch")
    p.add_argument("--ft-steps", type=int, default=2, help="matched regime: GD steps T")
    p.add_argument(
        "--displacement",
        type=float,
        default=1e-4,
        help="matched regime: ‖Δθ‖/‖θ‖ the all-tasks fine-tune aims at (sets η); the default "
        "is the horizon where first order applies (see the module docstring)",
    )
    p.add_argument(
        "--ft-lr",
        type=float,
        default=None,
        help="matched regime: fixed η instead of the --displacement rule",
    )
    p.add_argument("--trainer-steps", type=int, default=12)
    p.add_argument("--trainer-lr", type=float, default=1e-3)
    p.add_argument("--replicates", type=int, default=2, help="trainer regime replicates (≥ 2)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: one shape, one seed, few small subsets (under a minute)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.seeds, args.subsets, args.calibration = "gpt2-tied", 1, 4, 2
        args.rows, args.target_rows, args.anchor_steps = 16, 32, 40
        args.trainer_steps, args.batch = 6, 16
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.value_kinds = [k for k in args.value_kinds.split(",") if k]
    unknown = [s for s in args.shapes if s not in SHAPES] + [
        k for k in args.value_kinds if k not in VALUE_KINDS
    ]
    if unknown or args.value_kind not in args.value_kinds or args.replicates < 2:
        p.error(f"bad --shapes/--value-kinds/--replicates ({unknown or args.value_kind})")
    args.projectors = [args.projector] + (
        [] if args.no_compare else [k for k in PROJECTORS if k != args.projector]
    )
    return args


def load_data(seed: int, args: argparse.Namespace) -> Data:
    """The demo tasks (all of them, late ones too) and the target, tokenised."""
    tokenizer = build_tokenizer(TokenizerConfig(kind="char", alphabet=VOCABULARY))
    with tempfile.TemporaryDirectory() as folder:
        files = write_tasks(Path(folder), count=1000, target_count=args.target_rows, seed=seed)
        train = {n: read_jsonl(p, tokenizer, MAX_LENGTH) for n, p in files.tasks.items()}
        target = read_jsonl(files.target, tokenizer, MAX_LENGTH)
    tasks = {name: examples[: args.rows] for name, examples in train.items()}
    return Data(target=target, tasks=tasks, train=train)


def build_shape(shape: str, seed: int) -> nn.Module:
    """A freshly initialised model of `shape` (seeded), via the trainer's builder."""
    tokenizer = build_tokenizer(TokenizerConfig(kind="char", alphabet=VOCABULARY))
    torch.manual_seed(seed)
    return build_model(ModelConfig(config=dict(SHAPES[shape])), tokenizer)


def draw_subsets(n: int, count: int, seed: int) -> np.ndarray:
    """`count` distinct random subsets of sizes 2..n-2, as a bool (count, n) matrix."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, ...]] = []
    while len(rows) < count:
        size = int(rng.integers(2, n - 1))
        members = tuple(sorted(rng.choice(n, size=size, replace=False).tolist()))
        if members not in rows:
            rows.append(members)
    subsets = np.zeros((count, n), dtype=bool)
    for i, members in enumerate(rows):
        subsets[i, list(members)] = True
    return subsets


# --------------------------------------------------------------- training


def ce_per_example(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B,) mean token cross-entropy of each row's completion tokens."""
    logp = token_log_probs(logits, batch.input_ids)
    mask = batch.loss_mask[:, 1:].to(logp.dtype)
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def objective(model: nn.Module, batch: Batch, kind: str) -> torch.Tensor:
    """mean softplus(-f) over a batch: what the estimate models for value kind `kind`."""
    logits = model(input_ids=batch.input_ids).logits
    return logistic_loss(values_of(kind, logits, batch.input_ids, batch.loss_mask)).mean()


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters (tied ones once), flattened in `named_parameters` order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train_minibatch(
    model: nn.Module,
    pools: dict[str, list[TokenizedExample]],
    *,
    steps: int,
    lr: float,
    batch: int,
    rng: random.Random,
) -> None:
    """AdamW on token CE, each step a batch of one task drawn uniformly (as the trainer does)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    names = sorted(pools)
    for _ in range(steps):
        pool = pools[rng.choice(names)]
        b = collate([pool[rng.randrange(len(pool))] for _ in range(batch)], 0)
        loss = completion_loss(model(input_ids=b.input_ids).logits, b.input_ids, b.loss_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def full_batch_gradient(model: nn.Module, batches: Sequence[Batch], kind: str) -> None:
    """Fills `.grad` with ∇ of the uniform mix of the per-task mean softplus(-f)."""
    model.zero_grad(set_to_none=True)
    for b in batches:
        (objective(model, b, kind) / len(batches)).backward()


def gradient_descent(
    anchor: nn.Module, batches: Sequence[Batch], kind: str, *, lr: float, steps: int
) -> nn.Module:
    """Deterministic full-batch GD from the anchor on the matched objective."""
    model = copy.deepcopy(anchor)
    model.eval()
    for _ in range(steps):
        full_batch_gradient(model, batches, kind)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(lr * p.grad)
    return model


def all_tasks_gradient(anchor: nn.Module, batches: Sequence[Batch], kind: str) -> torch.Tensor:
    """∇L_all at the anchor, flat (`flat_params` order; zero where a parameter gets none)."""
    model = copy.deepcopy(anchor)
    model.eval()
    full_batch_gradient(model, batches, kind)
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in model.parameters()
        ]
    )


def matched_lr(anchor: nn.Module, grad: torch.Tensor, args: argparse.Namespace) -> float:
    """η such that T steps of the all-tasks gradient `grad` move ‖Δθ‖/‖θ‖ ≈ --displacement."""
    if args.ft_lr is not None:
        return float(args.ft_lr)
    theta = float(flat_params(anchor).norm())
    return args.displacement * theta / (args.ft_steps * float(grad.norm()))


def sketch_scale(est: SubsetEstimator, probe: Probe, kind: str, grad: torch.Tensor) -> float:
    """Slope of the sketched g_vᵀb_all on the exact ∇f_vᵀ∇L_all over the target rows.

    b_all = mean_t b_t is the estimator's all-tasks loss gradient; ∇L_all the exact one.
    With E[PᵀP] = I the slope is 1 in expectation (one projection draw scatters around
    it), which is what makes λ = 1/(ηT) the matched λ; a slope s acts like λ/s.
    """
    b = np.mean([est.statistics(t).loss_gradient() for t in est.tasks], axis=0)
    sketched = est.statistics(None).grads() @ b
    exact = (probe.jacobian[kind].double() @ grad.double()).numpy()
    return float(sketched @ exact / (exact @ exact))


# ------------------------------------------------------------ measurement


@dataclass
class Probe:
    """The target at the anchor: a batch, exact per-sample value gradients J and values f₀."""

    batch: Batch
    theta: torch.Tensor
    jacobian: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Outcome:
    """One fine-tuned model on the target: per value kind softplus(-f), its first-order
    prediction from the true Δθ; the mean CE; and ‖Δθ‖/‖θ‖."""

    loss: dict[str, float]
    ceiling: dict[str, float]
    ce: float
    ratio: float


def make_probe(model: nn.Module, target: list[TokenizedExample], kinds: Sequence[str]) -> Probe:
    batch = collate(target, 0)
    names = [n for n, _ in model.named_parameters()]
    jacobian, values = {}, {}
    for kind in kinds:
        rows, vals = [], []
        for start in range(0, len(target), 32):
            part = collate(target[start : start + 32], 0)
            grads, v = per_sample_gradients(model, names, part, value_kind=kind)
            rows.append(torch.cat([grads[n].reshape(len(v), -1) for n in names], 1))
            vals.append(v.detach())
        jacobian[kind], values[kind] = torch.cat(rows), torch.cat(vals)
    return Probe(batch=batch, theta=flat_params(model), jacobian=jacobian, values=values)


@torch.no_grad()
def measure(model: nn.Module, probe: Probe) -> Outcome:
    model.eval()
    logits = model(input_ids=probe.batch.input_ids).logits
    delta = flat_params(model) - probe.theta
    loss, ceiling = {}, {}
    for kind, jac in probe.jacobian.items():
        f = values_of(kind, logits, probe.batch.input_ids, probe.batch.loss_mask)
        loss[kind] = float(logistic_loss(f).mean())
        ceiling[kind] = float(logistic_loss(probe.values[kind] + jac @ delta).mean())
    ce = float(ce_per_example(logits, probe.batch).mean())
    return Outcome(loss, ceiling, ce, float(delta.norm() / probe.theta.norm()))


def sketch(
    model: nn.Module, data: Data, projector: str, kind: str, args: argparse.Namespace, seed: int
) -> SubsetEstimator:
    """Sketch the target and every task at the anchor; the estimator over them."""
    proj = build_projector(model, kind=projector, dim=args.dim, seed=seed)
    estimator = SubsetEstimator(args.dim)
    grads, values = sketch_examples(model, proj, data.target, batch_size=32, value_kind=kind)
    estimator.add_target_rows(stored(grads), values.double().numpy())
    for name in data.names:
        grads, values = sketch_examples(
            model, proj, data.tasks[name], batch_size=32, value_kind=kind
        )
        estimator.add_task_rows(name, stored(grads), values.double().numpy())
    return estimator


def stored(grads: torch.Tensor) -> np.ndarray:
    """Sketch gradients as the store keeps them: rounded to the trainer's storage dtype
    ([sketching].dtype; values are kept in float64)."""
    dtype = torch.float16 if SketchingConfig().dtype == "float16" else torch.float32
    return grads.to(dtype).double().numpy()


def coverage(model: nn.Module, projector: str) -> str:
    """What a projector's manifest sketches, e.g. '99,456/105,344 params (not: wte, ...)'."""
    manifest = build_projector(model, kind=projector, dim=8, seed=0).manifest
    total = sum(p.numel() for p in model.parameters())
    sizes = dict(model.named_parameters())
    left_out = sorted(manifest.excluded, key=lambda n: -sizes[n].numel() if n in sizes else 0)
    names = ", ".join(left_out[:3]) + (f" +{len(left_out) - 3} more" if len(left_out) > 3 else "")
    return f"{manifest.numel:,}/{total:,} params" + (f" (not: {names})" if left_out else "")


# ------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Score:
    """The statistics of one estimate over the scored subsets (see the module docstring)."""

    rel_err: float
    do_nothing: float
    skill: float
    spearman: float
    rel_rss: float
    spearman_ce: float
    ceiling: float
    ceiling_skill: float
    noise_floor: float
    lam: float
    ratio: float


def rel_err(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(np.abs(estimate - truth) / truth))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def score(
    estimate: np.ndarray,
    outcomes: Sequence[Sequence[Outcome]],
    kind: str,
    anchor_loss: float,
    *,
    lam: float,
    noise_floor: float,
) -> Score:
    """Statistics of `estimate` against the replicate-mean truths of the scored subsets."""
    truth = np.array([np.mean([o.loss[kind] for o in reps]) for reps in outcomes])
    ce = np.array([np.mean([o.ce for o in reps]) for reps in outcomes])
    ceil = np.array([np.mean([o.ceiling[kind] for o in reps]) for reps in outcomes])
    ratio = float(np.mean([o.ratio for reps in outcomes for o in reps]))
    err = rel_err(estimate, truth)
    nothing = rel_err(np.full_like(truth, anchor_loss), truth)
    return Score(
        rel_err=err,
        do_nothing=nothing,
        skill=1.0 - err / nothing if nothing > 0 else float("nan"),
        spearman=spearman(estimate, truth),
        rel_rss=float(np.sum((estimate - truth) ** 2) / np.sum(truth**2)),
        spearman_ce=spearman(estimate, ce),
        ceiling=rel_err(ceil, truth),
        ceiling_skill=1.0 - rel_err(ceil, truth) / nothing if nothing > 0 else float("nan"),
        noise_floor=noise_floor,
        lam=lam,
        ratio=ratio,
    )


def replicate_noise(outcomes: Sequence[Sequence[Outcome]], kind: str) -> float:
    """mean |L₁ - L₂| / mean(L₁, L₂) between the first two replicates."""
    pairs = np.array([[reps[0].loss[kind], reps[1].loss[kind]] for reps in outcomes])
    return float(np.mean(np.abs(pairs[:, 0] - pairs[:, 1]) / pairs.mean(1)))


# --------------------------------------------------------------- one run


@dataclass(frozen=True)
class Row:
    """One line of the results: a (shape, seed, regime, value kind, projector) estimate."""

    shape: str
    seed: int
    regime: str
    kind: str
    projector: str
    score: Score
    lam_best: float = float("nan")
    err_best: float = float("nan")
    scale: float = float("nan")


@dataclass(frozen=True)
class Selection:
    """Forward selection from one estimator, truly fine-tuned."""

    shape: str
    seed: int
    regime: str
    kind: str
    projector: str
    selected: tuple[str, ...]
    selected_loss: float
    all_loss: float
    best_scored_loss: float


@dataclass
class Run:
    """Fine-tunes of one (shape, seed), cached by (regime, value kind, subset)."""

    anchor: nn.Module
    data: Data
    probe: Probe
    args: argparse.Namespace
    seed: int
    lrs: dict[str, float] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: {"matched": 0.0, "trainer": 0.0})
    cache: dict[tuple[str, str, tuple[str, ...]], list[Outcome]] = field(default_factory=dict)

    def matched(self, kind: str, members: tuple[str, ...]) -> list[Outcome]:
        """Deterministic GD on the subset (one outcome; cached)."""
        key = ("matched", kind, members)
        if key not in self.cache:
            started = time.monotonic()
            batches = [collate(self.data.tasks[t], 0) for t in members]
            model = gradient_descent(
                self.anchor, batches, kind, lr=self.lrs[kind], steps=self.args.ft_steps
            )
            self.cache[key] = [measure(model, self.probe)]
            self.seconds["matched"] += time.monotonic() - started
        return self.cache[key]

    def trainer(self, members: tuple[str, ...]) -> list[Outcome]:
        """`--replicates` AdamW/CE minibatch fine-tunes on the subset (cached)."""
        key = ("trainer", "", members)
        if key not in self.cache:
            started = time.monotonic()
            outcomes = []
            for rep in range(self.args.replicates):
                model = copy.deepcopy(self.anchor)
                rng = random.Random(f"{self.seed}:{rep}:{','.join(members)}")
                train_minibatch(
                    model,
                    {t: self.data.tasks[t] for t in members},
                    steps=self.args.trainer_steps,
                    lr=self.args.trainer_lr,
                    batch=self.args.batch,
                    rng=rng,
                )
                outcomes.append(measure(model, self.probe))
            self.cache[key] = outcomes
            self.seconds["trainer"] += time.monotonic() - started
        return self.cache[key]

    def outcomes(self, regime: str, kind: str, members: tuple[str, ...]) -> list[Outcome]:
        return self.matched(kind, members) if regime == "matched" else self.trainer(members)


def members_of(row: np.ndarray, names: Sequence[str]) -> tuple[str, ...]:
    return tuple(names[int(j)] for j in np.flatnonzero(row))


@dataclass(frozen=True)
class Subsets:
    """The calibration and scored subsets of one seed, as masks and as member tuples."""

    calibration: np.ndarray
    scored: np.ndarray
    names: tuple[str, ...]

    def members(self, mask: np.ndarray) -> list[tuple[str, ...]]:
        return [members_of(row, self.names) for row in mask]


def prepare(shape: str, seed: int, data: Data, args: argparse.Namespace) -> Run:
    """The anchor (trained), its target probe and the matched regime's η per value kind."""
    model = build_shape(shape, seed)
    train_minibatch(
        model,
        data.train,
        steps=args.anchor_steps,
        lr=args.anchor_lr,
        batch=args.batch,
        rng=random.Random(seed),
    )
    run = Run(
        anchor=model,
        data=data,
        probe=make_probe(model, data.target, args.value_kinds),
        args=args,
        seed=seed,
    )
    all_batches = [collate(data.tasks[t], 0) for t in data.names]
    for kind in args.value_kinds:
        run.gradients[kind] = all_tasks_gradient(model, all_batches, kind)
        run.lrs[kind] = matched_lr(model, run.gradients[kind], args)
    return run


def matched_noise(run: Run, kind: str, members: tuple[str, ...]) -> float:
    """|L₁ - L₂| / L₁ between two identical deterministic GD fine-tunes of one subset."""
    first = run.matched(kind, members)[0].loss[kind]
    again = gradient_descent(
        run.anchor,
        [collate(run.data.tasks[t], 0) for t in members],
        kind,
        lr=run.lrs[kind],
        steps=run.args.ft_steps,
    )
    return abs(measure(again, run.probe).loss[kind] - first) / first


def mean_loss(outcomes: Sequence[Outcome], kind: str) -> float:
    return float(np.mean([o.loss[kind] for o in outcomes]))


def evaluate(
    run: Run,
    regime: str,
    kind: str,
    estimators: dict[str, SubsetEstimator],
    subsets: Subsets,
    label: tuple[str, int],
) -> tuple[list[Row], list[Selection]]:
    """One regime and value kind: truths, each projector's statistics and its selection."""
    scored = subsets.members(subsets.scored)
    outcomes = [run.outcomes(regime, kind, m) for m in scored]
    all_loss = mean_loss(run.outcomes(regime, kind, subsets.names), kind)
    best_scored = min(mean_loss(reps, kind) for reps in outcomes)
    anchor_loss = float(logistic_loss(run.probe.values[kind]).mean())
    if regime == "matched":
        noise = matched_noise(run, kind, min(scored, key=len))
    else:
        noise = replicate_noise(outcomes, kind)
    rows, selections = [], []
    for proj, est in estimators.items():
        lam_best = err_best = float("nan")
        if regime == "matched":
            lam = 1.0 / (run.lrs[kind] * run.args.ft_steps)
            lam_best, err_best = best_lambda(est, subsets.scored, outcomes, kind, lam)
        else:
            cal = [run.trainer(m) for m in subsets.members(subsets.calibration)]
            lam = calibrate(est, subsets.calibration, cal, kind)
        estimate = est.estimate(subsets.scored, mode="fast", regularization=lam)
        s = score(estimate, outcomes, kind, anchor_loss, lam=lam, noise_floor=noise)
        scale = sketch_scale(est, run.probe, kind, run.gradients[kind])
        rows.append(Row(*label, regime, kind, proj, s, lam_best, err_best, scale))
        est.regularization = lam  # forward_selection estimates at the estimator's own λ
        picked = tuple(sorted(forward_selection(est, mode="fast")[0]))
        sel_loss = mean_loss(run.outcomes(regime, kind, picked), kind) if picked else anchor_loss
        selections.append(
            Selection(*label, regime, kind, proj, picked, sel_loss, all_loss, best_scored)
        )
    return rows, selections


def run_one(
    shape: str, seed: int, data: Data, args: argparse.Namespace, log: Callable[[str], None]
) -> tuple[list[Row], list[Selection]]:
    """Anchor, sketches, both regimes' truths and statistics for one (shape, seed)."""
    clock = {"start": time.monotonic()}
    run = prepare(shape, seed, data, args)
    clock["anchor"] = time.monotonic()
    model = run.anchor
    log(
        f"\n== {shape}, seed {seed}: {sum(p.numel() for p in model.parameters()):,} params; "
        f"anchor target CE {measure(model, run.probe).ce:.4f}; "
        + "; ".join(f"{p}: {coverage(model, p)}" for p in args.projectors)
    )
    estimators = {
        kind: {proj: sketch(model, data, proj, kind, args, seed) for proj in args.projectors}
        for kind in args.value_kinds
    }
    clock["sketch"] = time.monotonic()
    masks = draw_subsets(len(data.names), args.calibration + args.subsets, seed)
    subsets = Subsets(masks[: args.calibration], masks[args.calibration :], tuple(data.names))
    rows: list[Row] = []
    selections: list[Selection] = []
    for regime in REGIMES:
        for kind in args.value_kinds:
            r, s = evaluate(run, regime, kind, estimators[kind], subsets, (shape, seed))
            rows += r
            selections += s
    log(format_rows(rows, with_run=False))
    total, anchor = time.monotonic() - clock["start"], clock["anchor"] - clock["start"]
    sketches, matched, trainer = (
        clock["sketch"] - clock["anchor"],
        run.seconds["matched"],
        run.seconds["trainer"],
    )
    etas = ", ".join(f"{k} {v:.3g}" for k, v in run.lrs.items())
    log(
        f"({total:.0f}s: anchor+probe {anchor:.0f}s, sketches {sketches:.0f}s, matched "
        f"{matched:.0f}s, trainer {trainer:.0f}s; matched η {etas}, T={args.ft_steps}; trainer "
        f"AdamW lr {args.trainer_lr}, {args.trainer_steps} steps, batch {args.batch}, "
        f"{args.replicates} replicates)"
    )
    return rows, selections


def best_lambda(
    est: SubsetEstimator,
    subsets: np.ndarray,
    outcomes: Sequence[Sequence[Outcome]],
    kind: str,
    lam: float,
) -> tuple[float, float]:
    """In-sample best λ₀·2^k on the scored subsets and its rel_err (information only)."""
    truth = np.array([np.mean([o.loss[kind] for o in reps]) for reps in outcomes])
    errors = {
        lam * f: rel_err(est.estimate(subsets, mode="fast", regularization=lam * f), truth)
        for f in LAMBDA_FACTORS
    }
    best = min(errors, key=lambda k: errors[k])
    return best, errors[best]


def calibrate(
    est: SubsetEstimator, subsets: np.ndarray, outcomes: Sequence[Sequence[Outcome]], kind: str
) -> float:
    """λ of LAMBDA_GRID with the least mean relative error on the calibration subsets."""
    truth = np.array([np.mean([o.loss[kind] for o in reps]) for reps in outcomes])
    errors = {
        lam: rel_err(est.estimate(subsets, mode="fast", regularization=lam), truth)
        for lam in LAMBDA_GRID
    }
    return min(errors, key=lambda k: errors[k])


# --------------------------------------------------------------- reporting

HEADER = (
    "regime",
    "value",
    "proj",
    "λ",
    "λ best",
    "err@best",
    "scale",
    "|Δθ|/|θ|",
    "noise",
    "nothing",
    "ceiling",
    "c.skill",
    "rel_err",
    "skill",
    "ρ",
    "rel_rss",
    "ρ_CE",
)


def row_cells(
    regime: str, kind: str, proj: str, s: Score, lam_best: float, err_best: float, scale: float
) -> list[str]:
    return [
        regime,
        "geo" if kind.startswith("geometric") else "log_odds",
        proj,
        f"{s.lam:.3g}",
        "—" if np.isnan(lam_best) else f"{lam_best:.3g}",
        "—" if np.isnan(err_best) else f"{err_best:.3g}",
        f"{scale:.2f}",
        f"{s.ratio:.3g}",
        f"{s.noise_floor:.3g}",
        f"{s.do_nothing:.3g}",
        f"{s.ceiling:.3g}",
        f"{s.ceiling_skill:+.3f}",
        f"{s.rel_err:.3g}",
        f"{s.skill:+.3f}",
        f"{s.spearman:+.3f}",
        f"{s.rel_rss:.3g}",
        f"{s.spearman_ce:+.3f}",
    ]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def format_rows(rows: Sequence[Row], *, with_run: bool) -> str:
    head = (("shape", "seed") if with_run else ()) + HEADER
    cells = [
        ([r.shape, str(r.seed)] if with_run else [])
        + row_cells(r.regime, r.kind, r.projector, r.score, r.lam_best, r.err_best, r.scale)
        for r in rows
    ]
    return format_table(head, cells)


def mean_score(scores: Sequence[Score]) -> Score:
    return Score(
        **{f: float(np.mean([getattr(s, f) for s in scores])) for f in Score.__dataclass_fields__}
    )


def summary(rows: Sequence[Row], shapes: Sequence[str]) -> str:
    """Per shape (and over all shapes), each statistic averaged over the seeds."""
    groups: dict[tuple[str, str, str, str], list[Row]] = {}
    for r in rows:
        for shape in (r.shape, "all"):
            groups.setdefault((shape, r.regime, r.kind, r.projector), []).append(r)
    order = {s: i for i, s in enumerate([*shapes, "all"])}
    cells = []
    for key in sorted(groups, key=lambda k: (order[k[0]], k[1], k[2], k[3])):
        group = groups[key]
        lam_best = float(np.exp(np.mean([np.log(r.lam_best) for r in group])))
        err_best = float(np.mean([r.err_best for r in group]))
        scale = float(np.mean([r.scale for r in group]))
        m = mean_score([r.score for r in group])
        cells.append(
            [
                key[0],
                str(len(group)),
                *row_cells(key[1], key[2], key[3], m, lam_best, err_best, scale),
            ]
        )
    return format_table(("shape", "runs", *HEADER), cells)


def selection_table(selections: Sequence[Selection]) -> str:
    cells = [
        [
            s.shape,
            str(s.seed),
            s.regime,
            "geo" if s.kind.startswith("geometric") else "log_odds",
            s.projector,
            ",".join(s.selected) or "∅",
            f"{s.selected_loss:.4f}",
            f"{s.all_loss:.4f}",
            f"{s.best_scored_loss:.4f}",
            "yes" if s.selected_loss < s.all_loss else "no",
            "yes" if s.best_scored_loss < s.all_loss else "no",
        ]
        for s in selections
    ]
    return format_table(
        (
            "shape",
            "seed",
            "regime",
            "value",
            "proj",
            "selected",
            "L(sel)",
            "L(all)",
            "best scored",
            "sel<all",
            "any<all",
        ),
        cells,
    )


def selection_summary(selections: Sequence[Selection]) -> str:
    lines = []
    for regime in REGIMES:
        for proj in sorted({s.projector for s in selections}):
            group = [s for s in selections if s.regime == regime and s.projector == proj]
            exists = [s for s in group if s.best_scored_loss < s.all_loss]
            wins = [s for s in exists if s.selected_loss < s.all_loss]
            lines.append(
                f"selection {regime:>7} {proj:>10}: the selected subset beats all tasks in "
                f"{sum(s.selected_loss < s.all_loss for s in group)}/{len(group)} runs; "
                f"a scored subset beats all tasks in {len(exists)} of them, and there the "
                f"selected one does too in {len(wins)}/{len(exists)}"
            )
    return "\n".join(lines)


#: The matched regime counts as first-order where the true-Δθ ceiling's skill is at least this.
FIRST_ORDER_SKILL = 0.8


def first_order_check(rows: Sequence[Row], args: argparse.Namespace) -> str:
    """The ceiling's skill in the matched regime per shape and value kind (mean and min over
    seeds): whether first order applies at the chosen horizon. The ceiling does not depend
    on the projector; the rows of --projector are used."""
    lines = [
        f"first order at the matched horizon (T={args.ft_steps}, "
        + (f"η={args.ft_lr:g}" if args.ft_lr is not None else f"‖Δθ‖/‖θ‖≈{args.displacement:g}")
        + f"): ceiling skill per shape, mean (min) over seeds; first order applies where "
        f"≥ {FIRST_ORDER_SKILL}"
    ]
    failing = []
    for shape in args.shapes:
        cells = []
        for kind in args.value_kinds:
            skills = [
                r.score.ceiling_skill
                for r in rows
                if r.shape == shape
                and r.kind == kind
                and r.regime == "matched"
                and r.projector == args.projector
            ]
            if not skills:
                continue
            cells.append(f"{kind} {np.mean(skills):+.3f} ({min(skills):+.3f})")
            if min(skills) < FIRST_ORDER_SKILL:
                failing.append(f"{shape}/{kind}")
        lines.append(f"  {shape:>12}: " + ", ".join(cells))
    lines.append(
        "  first order applies in every run"
        if not failing
        else f"  first order does NOT apply in some run of: {', '.join(failing)} "
        "(the estimate cannot be expected to match there; use a smaller --displacement)"
    )
    return "\n".join(lines)


def targets(rows: Sequence[Row], args: argparse.Namespace) -> str:
    """The issue's targets for the last line's configuration, met or not."""
    m = mean_score([r.score for r in rows if is_headline(r, args)])
    met = {"skill ≥ 0.8": m.skill >= 0.8, "spearman ≥ 0.95": m.spearman >= 0.95}
    return f"targets ({args.projector}, matched, {args.value_kind}): " + ", ".join(
        f"{k}: {'met' if v else 'NOT met'}" for k, v in met.items()
    )


def is_headline(row: Row, args: argparse.Namespace) -> bool:
    """Whether a row counts in the last line."""
    return (
        row.regime == "matched" and row.projector == args.projector and row.kind == args.value_kind
    )


def last_line(rows: Sequence[Row], args: argparse.Namespace) -> str:
    m = mean_score([r.score for r in rows if is_headline(r, args)])
    return (
        f"fidelity: skill={m.skill:.3f} spearman={m.spearman:.3f} rel_err={m.rel_err:.3g} "
        f"rel_rss={m.rel_rss:.3g} do_nothing_rel_err={m.do_nothing:.3g} "
        f"noise_floor={m.noise_floor:.3g}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()  # the no-attention-mask advice (right padding)
    started = time.monotonic()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    print(
        f"shapes {', '.join(args.shapes)}; seeds {list(seeds)}; value kinds "
        f"{', '.join(args.value_kinds)}; projectors {', '.join(args.projectors)} (d={args.dim}); "
        f"{args.subsets} scored + {args.calibration} calibration subsets; {args.rows} rows "
        f"per task, {args.target_rows} target rows; anchor {args.anchor_steps} AdamW steps"
    )
    rows: list[Row] = []
    selections: list[Selection] = []
    for seed in seeds:
        data = load_data(seed, args)
        for shape in args.shapes:
            r, s = run_one(shape, seed, data, args, lambda text: print(text, flush=True))
            rows += r
            selections += s
    print("\n== per shape, mean over seeds (λ best: geometric mean; matched λ = 1/(ηT))")
    print(summary(rows, args.shapes))
    print()
    print(first_order_check(rows, args))
    print("\n== forward selection (the server's SelectTasks code), truly fine-tuned")
    print(selection_table(selections))
    print(selection_summary(selections))
    print(
        f"\nelapsed {time.monotonic() - started:.0f}s; last line: projector {args.projector}, "
        f"matched regime, value kind {args.value_kind}, mean over "
        f"{len(args.shapes)} shapes × {args.seeds} seeds"
    )
    print(targets(rows, args))
    print(last_line(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
