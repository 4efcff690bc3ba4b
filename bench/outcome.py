"""Outcome: the target loss a mixture method reaches, against the baselines users would pick.

    python bench/outcome.py [--seeds 3] [--steps 400] [--suite NAME ...]

Every run trains the same tiny GPT-2 (the trainer's model builder and char
tokenizer) from scratch with AdamW (warm-up, linear decay, clipping: the demo's
schedule) on one task per step drawn from a mixture, and ends with the token
cross-entropy on 256 held-out target examples. Runs differ only in how the
mixture is chosen:

- ``gradmix``: the server's **default** policy settings, untouched. At each
  anchor (every `--anchor-every` steps from `--first-anchor`) the target and
  every task are sketched with the trainer's own sketch code and default
  sketch settings, and the mixture comes from the server's own composition
  code (`gradmix.server.compose`), as a live job would get it. Before the
  first anchor the mixture is uniform, as on a live server.
- ``gradient_similarity``: the same loop and sketches with the server's
  LESS-style cosine policy, at its **own** temperature, tuned on a separate
  seed (`--tune-seed`, never scored) over `--similarity-temperatures`.
- ``uniform`` and ``proportional`` (to each task's pool size): fixed mixtures.
- ``best single task``: every task trained alone, the best one per seed in
  hindsight (an oracle, reported, not counted).

Scored seeds are 0..`--seeds`-1; the tuning seed is separate. A win or loss
against a baseline counts only when the mean difference exceeds the seed
spread (the larger of the two methods' standard deviations over seeds).
Each suite also prints gradmix's per-seed difference from each baseline
(mean ± standard deviation: a seed gives every method the same data and
initial model), and the line before the last counts wins and losses beyond
that paired spread: ``paired: beats_uniform=<k> ...``.

Last line: ``outcome: suites=<n> beats_uniform=<k> beats_proportional=<k>
beats_similarity=<k> loses_similarity=<k>`` over the suites run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import torch
from gradmix.server.calibration import calibrated_policy
from gradmix.server.compose import compose_mixture
from gradmix.server.estimator import SubsetEstimator
from gradmix.store import Horizon, MixtureRecord
from gradmix.trainer.config import ModelConfig, SketchingConfig, TokenizerConfig
from gradmix.trainer.data import TokenizedExample, collate, tokenize
from gradmix.trainer.projectors import build_projector
from gradmix.trainer.setup import build_model, build_tokenizer
from gradmix.trainer.sketch import sketch_examples
from gradmix.trainer.values import completion_loss
from gradmix.vocabulary.policy_settings import PolicyConfig
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from suites import ALPHABET, SUITES, Suite

MAX_LENGTH = 40
EVAL_EXAMPLES = 256


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What every run of one bench invocation shares."""

    steps: int = 400
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 20
    first_anchor: int = 40
    anchor_every: int = 90
    n_embd: int = 64
    n_layer: int = 2
    sketch: SketchingConfig = field(default_factory=SketchingConfig)


@dataclass(frozen=True)
class Method:
    """How a run's mixture is chosen: a fixed vector, or a server policy at anchors."""

    name: str
    fixed: Mapping[str, float] | None = None
    policy: PolicyConfig | None = None


@dataclass
class SuiteData:
    """One suite's tokenised pools for one seed."""

    pools: dict[str, list[TokenizedExample]]
    target_sketch: list[TokenizedExample]
    target_eval: list[TokenizedExample]


def suite_data(suite: Suite, seed: int, sketch_rows: int) -> SuiteData:
    tokenizer = build_tokenizer(TokenizerConfig(kind="char", alphabet=ALPHABET))

    def tok(examples: Sequence[Any]) -> list[TokenizedExample]:
        return [tokenize(e.prompt, e.completion, tokenizer, MAX_LENGTH) for e in examples]

    pools = {t.name: tok(suite.examples(t.name, t.size, seed)) for t in suite.tasks}
    target = tok(suite.examples(None, sketch_rows + EVAL_EXAMPLES, seed))
    return SuiteData(pools, target[:sketch_rows], target[sketch_rows:])


def new_model(settings: Settings, seed: int) -> torch.nn.Module:
    tokenizer = build_tokenizer(TokenizerConfig(kind="char", alphabet=ALPHABET))
    torch.manual_seed(seed)
    config = {"model_type": "gpt2", "n_embd": settings.n_embd, "n_layer": settings.n_layer,
              "n_head": 4, "n_positions": 64, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
              "attn_pdrop": 0.0}
    return build_model(ModelConfig(config=config), tokenizer)


@dataclass
class LiveJob:
    """What the server keeps between anchors for one run: the last version."""

    last: MixtureRecord | None = None


def anchor_mixture(model: torch.nn.Module, data: SuiteData, policy: PolicyConfig,
                   settings: Settings, anchor: int, job: LiveJob, lr: float
                   ) -> dict[str, float]:
    """Sketch the target and every task at the current weights; the server's mixture.

    As on a live server: λ is calibrated from the trainer's horizon (AdamW at
    the current learning rate until the next anchor) and from the target loss
    change since the previous anchor (`gradmix.server.calibration`), and the
    mixture is smoothed towards the one in force.
    """
    sk = settings.sketch
    projector = build_projector(model, kind=sk.projector, dim=sk.dim, seed=sk.seed,
                                patterns=sk.parameters, factor_dim=sk.factor_dim or None)
    estimator = SubsetEstimator(sk.dim, regularization=policy.regularization)
    rng = np.random.default_rng(anchor)

    def rows(examples: list[TokenizedExample]) -> tuple[np.ndarray, np.ndarray]:
        chosen = rng.choice(len(examples), size=min(sk.examples_per_task, len(examples)),
                            replace=False)
        grads, values = sketch_examples(model, projector, [examples[i] for i in chosen],
                                        batch_size=32, value_kind=sk.value_kind)
        # The store keeps sketches in the job's dtype (float16 by default).
        return (grads.numpy().astype(sk.dtype).astype(np.float64),
                values.numpy().astype(np.float64))

    estimator.add_target_rows(*rows(data.target_sketch))
    for name, pool in data.pools.items():
        estimator.add_task_rows(name, *rows(pool))
    horizon = Horizon(learning_rate=lr, steps=settings.anchor_every, optimizer="adamw",
                      parameters=projector.manifest.numel)
    live, calibration = calibrated_policy(policy, horizon=horizon, estimator=estimator,
                                          previous=job.last)
    previous = job.last.weights if job.last is not None else None
    composition = compose_mixture(list(data.pools), estimator, live, previous=previous)
    job.last = MixtureRecord(
        version=(job.last.version + 1) if job.last else 1, created_at=0.0, anchor=str(anchor),
        policy=policy.policy, weights=composition.weights, scores=composition.scores,
        states=composition.states, anchor_loss=composition.anchor_loss,
        estimated_loss=composition.estimated_loss, calibration=calibration)
    return composition.weights


Trace = list[tuple[int, dict[str, float], float]]


@overload
def run(suite: Suite, data: SuiteData, method: Method, seed: int, settings: Settings,
        trace: Trace | None = None, *, stop: None = None) -> float: ...


@overload
def run(suite: Suite, data: SuiteData, method: Method, seed: int, settings: Settings,
        trace: Trace | None = None, *, stop: int) -> torch.nn.Module: ...


def run(suite: Suite, data: SuiteData, method: Method, seed: int, settings: Settings,
        trace: Trace | None = None, *, stop: int | None = None
        ) -> float | torch.nn.Module:
    """Train one model under `method`'s mixture; the final target cross-entropy.

    With `stop`, training stops before that step and the model is returned.
    """
    model = new_model(settings, seed)
    names = list(data.pools)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    decay = settings.steps - settings.warmup
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / settings.warmup, max(0.0, (settings.steps - s) / decay)))
    weights = dict(method.fixed) if method.fixed else dict.fromkeys(names, 1 / len(names))
    rng = np.random.default_rng(seed + 7919)
    job = LiveJob()
    for step in range(settings.steps):
        if step == stop:
            return model
        anchor_due = step >= settings.first_anchor and \
            (step - settings.first_anchor) % settings.anchor_every == 0
        if method.policy is not None and anchor_due:
            weights = anchor_mixture(model, data, method.policy, settings, step, job,
                                     float(schedule.get_last_lr()[0]))
            if trace is not None and job.last is not None and job.last.calibration:
                trace.append((step, weights, job.last.calibration.regularization))
        p = np.array([weights[n] for n in names])
        pool = data.pools[names[int(rng.choice(len(names), p=p / p.sum()))]]
        batch = collate([pool[int(i)] for i in rng.integers(0, len(pool), settings.batch)], 0)
        model.train()
        loss = completion_loss(model(input_ids=batch.input_ids).logits, batch.input_ids,
                               batch.loss_mask)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return evaluate(model, data.target_eval)


def stability(suite: Suite, data: SuiteData, policy: PolicyConfig, settings: Settings,
              seed: int, draws: int = 4) -> float:
    """Largest total variation between the mixtures `policy` composes from `draws`
    redraws of the sketched rows at one anchor model (seed `seed`'s model trained
    uniformly up to the second anchor)."""
    step = settings.first_anchor + settings.anchor_every
    uniform = Method("uniform", fixed=dict.fromkeys(suite.names, 1 / len(suite.names)))
    model = run(suite, data, uniform, seed, settings, stop=step)
    mixtures = [anchor_mixture(model, data, policy, settings, 1000 + k, LiveJob(), settings.lr)
                for k in range(draws)]
    return max(0.5 * sum(abs(a[t] - b[t]) for t in a)
               for i, a in enumerate(mixtures) for b in mixtures[i + 1:])


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list[TokenizedExample]) -> float:
    model.eval()
    batch = collate(examples, 0)
    return float(completion_loss(model(input_ids=batch.input_ids).logits, batch.input_ids,
                                 batch.loss_mask))


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs for PolicyConfig (numbers parsed, the rest kept as strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        value: Any = raw
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                continue
        out[key] = value
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="scored seeds 0..N-1")
    p.add_argument("--tune-seed", type=int, default=100, help="seed for tuning (never scored)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--first-anchor", type=int, default=40)
    p.add_argument("--anchor-every", type=int, default=90)
    p.add_argument("--suite", action="append", choices=tuple(SUITES), help="repeatable")
    p.add_argument("--similarity-temperatures", type=float, nargs="+",
                   default=[0.1, 0.25, 0.5, 1.0, 2.0])
    p.add_argument("--gradmix", action="append", default=[], metavar="KEY=VALUE",
                   help="override a policy setting of the gradmix runs (default: none)")
    p.add_argument("--sketch", action="append", default=[], metavar="KEY=VALUE",
                   help="override a [sketching] setting of every run (default: none)")
    p.add_argument("--no-single", action="store_true", help="skip the best-single-task oracle")
    p.add_argument("--trace", action="store_true", help="print gradmix's mixture at each anchor")
    return p.parse_args(argv)


def paired_beyond(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean of a[i] − b[i], the standard deviation of those per-seed differences).

    Seed i gives both methods the same data and the same initial model, so the
    per-seed difference leaves out what the seed moves both by: the noise a
    comparison of the two has, where `spread_beyond` takes each side's whole
    spread."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0


def spread_beyond(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean(a) − mean(b), the seed spread: the larger standard deviation)."""
    sd = max(statistics.stdev(a) if len(a) > 1 else 0.0, statistics.stdev(b) if len(b) > 1 else 0.0)
    return statistics.fmean(a) - statistics.fmean(b), sd


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    console = Console(width=120)
    try:
        settings = Settings(steps=args.steps, first_anchor=args.first_anchor,
                            anchor_every=args.anchor_every,
                            sketch=SketchingConfig(**parse_overrides(args.sketch)))
        gradmix_policy = PolicyConfig(**parse_overrides(args.gradmix))
    except (TypeError, ValueError) as exc:  # unknown key, or a value the config refuses
        print(f"outcome: bad --sketch/--gradmix setting: {exc}", file=sys.stderr)
        return 2
    if not settings.warmup < settings.steps or not 0 <= settings.first_anchor < settings.steps \
            or settings.anchor_every < 1 or args.seeds < 1:
        print(f"outcome: need --steps > {settings.warmup} (the warm-up), 0 <= --first-anchor < "
              "--steps, --anchor-every >= 1 and --seeds >= 1", file=sys.stderr)
        return 2
    chosen = args.suite or list(SUITES)
    seeds = list(range(args.seeds))
    counts = dict.fromkeys(("uniform", "proportional", "similarity", "loses"), 0)
    paired = dict(counts)
    started = time.monotonic()
    console.print(f"gradmix policy: {gradmix_policy}")
    console.print(f"sketching: {settings.sketch}")
    for suite_name in chosen:
        suite = SUITES[suite_name]
        names = suite.names
        total = sum(t.size for t in suite.tasks)
        tune = suite_data(suite, args.tune_seed, settings.sketch.examples_per_task)
        tuned: dict[float, float] = {}
        for tau in args.similarity_temperatures:
            method = Method("similarity", policy=PolicyConfig(policy="gradient_similarity",
                                                              temperature=tau))
            tuned[tau] = float(run(suite, tune, method, args.tune_seed, settings))
        tau_best = min(tuned, key=lambda k: tuned[k])
        console.print(f"[{suite_name}] gradient_similarity temperature on tune seed "
                      f"{args.tune_seed}: " + ", ".join(f"{k:g}→{v:.4f}" for k, v in tuned.items())
                      + f"; chosen {tau_best:g}")
        methods = [
            Method("gradmix", policy=gradmix_policy),
            Method("gradient_similarity",
                   policy=PolicyConfig(policy="gradient_similarity", temperature=tau_best)),
            Method("uniform", fixed=dict.fromkeys(names, 1 / len(names))),
            Method("proportional", fixed={t.name: t.size / total for t in suite.tasks}),
        ]
        if not args.no_single:
            methods += [Method(f"only:{n}", fixed={m: float(m == n) for m in names})
                        for n in names]
        results: dict[str, list[float]] = {m.name: [] for m in methods}
        for seed in seeds:
            data = suite_data(suite, seed, settings.sketch.examples_per_task)
            for method in methods:
                trace: list[tuple[int, dict[str, float], float]] = []
                results[method.name].append(float(run(suite, data, method, seed, settings, trace)))
                if args.trace and trace:
                    for step, w, lam in trace:
                        console.print(f"  {suite_name} seed {seed} {method.name} step {step} "
                                      f"λ={lam:.3g}: "
                                      + " ".join(f"{k}={v:.2f}" for k, v in w.items()))
        if not args.no_single:
            singles = [n for n in results if n.startswith("only:")]
            results["best single task"] = [min(results[n][i] for n in singles)
                                           for i in range(len(seeds))]
        report(console, suite, results)
        for method in methods[:2]:  # gradmix and the tuned similarity baseline
            assert method.policy is not None
            moved = [stability(suite, suite_data(suite, seed, settings.sketch.examples_per_task),
                               method.policy, settings, seed) for seed in seeds]
            console.print(f"[{suite_name}] stability of {method.name}: redrawing the sketched "
                          f"rows at one anchor moves its mixture by total variation "
                          f"max {max(moved):.3f}, mean {statistics.fmean(moved):.3f} over the "
                          "seeds (" + ", ".join(f"{m:.3f}" for m in moved) + ")")
        ours = results["gradmix"]
        differences = []
        for key, name in (("uniform", "uniform"), ("proportional", "proportional"),
                          ("similarity", "gradient_similarity")):
            for tally, beyond in ((counts, spread_beyond), (paired, paired_beyond)):
                diff, sd = beyond(ours, results[name])
                if diff < -sd:
                    tally[key] += 1
                if key == "similarity" and diff > sd:
                    tally["loses"] += 1
            diff, sd = paired_beyond(ours, results[name])
            differences.append(f"{name} {diff:+.3f} ± {sd:.3f}")
        console.print(f"[{suite_name}] gradmix − baseline, per seed (mean ± sd): "
                      + ", ".join(differences))
        console.print(f"elapsed {time.monotonic() - started:.0f}s")
    print(f"paired: beats_uniform={paired['uniform']} "
          f"beats_proportional={paired['proportional']} "
          f"beats_similarity={paired['similarity']} loses_similarity={paired['loses']} "
          "(beyond the sd of the per-seed differences)")
    print(f"outcome: suites={len(chosen)} beats_uniform={counts['uniform']} "
          f"beats_proportional={counts['proportional']} "
          f"beats_similarity={counts['similarity']} loses_similarity={counts['loses']}")
    return 0


def report(console: Console, suite: Suite, results: Mapping[str, list[float]]) -> None:
    table = Table(title=f"{suite.name}: {suite.description}")
    table.add_column("mixture")
    table.add_column("mean target CE", justify="right")
    table.add_column("± sd", justify="right")
    table.add_column("per seed", justify="right")
    for name, values in results.items():
        sd = statistics.stdev(values) if len(values) > 1 else math.nan
        table.add_row(name, f"{statistics.fmean(values):.4f}", f"{sd:.4f}",
                      " ".join(f"{v:.4f}" for v in values))
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
