"""Sketch cost vs training cost on a ~10M-parameter GPT-2 (CPU by default).

Measures, in one run and on the same model and examples:
  - train: seconds per example of a training step (forward, backward, AdamW step);
  - dense: seconds per example to sketch all trainable parameters with the
    dense projector (torch.func per-sample gradients + blocked Rademacher);
  - structured: seconds per example to sketch all trainable parameters with
    the structured projector (forward hooks; Kronecker factors + CountSketch
    for the linear weights, the tied wte/lm_head weight and wpe; dense
    projections of the biases and LayerNorm parameters).
Last line: `sketch: dense_ratio=<...> structured_ratio=<...> train_ms_per_example=<...>`
(sketch time per example / train time per example, and that baseline).

With `--lora R` the model carries rank-R LoRA adapters (peft, on every
attention and MLP projection) and only they train and are sketched, the
method paper's setting: the training step is then forward, backward and an
AdamW step over the adapters, and both projectors sketch the adapters' A/B
factors (the structured one from their inputs and output gradients).

    python bench/sketch.py [--dim 256] [--batch 16] [--device cpu] [--lora 8]

With `--demo-run` it measures instead the share of a `make demo` training run's
wall time that its sketch points take, with the demo's own job (its model,
tokenizer, tasks and `[sketching]` section, written by `gradmix.demo.run.
write_job`, so the default `examples_per_task` and the demo's anchor schedule):
  - train: seconds per optimizer step (the demo's batch, AdamW, clipping);
  - sketch: seconds to sketch each source's `examples_per_task` examples with
    the job's projector, at its sketch batch size;
  (rounds of ten steps and one sketch of every source, interleaved, so that
  both see the same load; the medians over the rounds);
  - the schedule: which sources the run sketches at which sketch point (the
    re-anchor rule of `SketchingConfig`, the late tasks at the first sketch
    point after the demo registers them).
Share = sketch / (sketch + steps × train); floor_share is the same with the
sketch replaced by a bare forward and backward to the input embeddings (no
hooks, projection or weight gradient: what no projector can go below). Last
line: `sketch_share: share=<...> floor_share=<...> train_step_ms=<...> sketch_ms_per_example=<...>
train_ms_per_example=<...> ratio=<...> ...` (ratio: sketch time per example /
train time per example). What it leaves out, in both terms: evaluations,
DeepSpeed's own overhead, the store writes and server calls of a sketch point.

    python bench/sketch.py --demo-run [--threads 1] [--sketch-batch 128] [--schedule defaults]

`--schedule defaults` keeps the demo's model, tasks, steps and sketch settings
but anchors as a job that leaves the re-anchor rule at the trainer's defaults
does (one anchor at the first sketch point; later sketch points sketch only
newly registered tasks): the share at the default interval.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any, cast

import torch
from gradmix.trainer.config import SketchingConfig
from gradmix.trainer.data import TokenizedExample, collate
from gradmix.trainer.projectors import build_projector
from gradmix.trainer.sketch import sketch_examples
from gradmix.trainer.values import completion_loss, values_of
from transformers import GPT2Config, GPT2LMHeadModel


def make_model(device: str) -> GPT2LMHeadModel:
    """GPT-2 with 8 layers of width 256 and a 16k vocabulary: ~10.5M parameters."""
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=16384,
        n_positions=128,
        n_embd=256,
        n_layer=8,
        n_head=8,
        bos_token_id=1,
        eos_token_id=1,
    )
    model = GPT2LMHeadModel(cfg)
    torch.nn.Module.to(model, torch.device(device))  # transformers types `to` for dtypes only
    return model


def with_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """The model with rank-`rank` LoRA adapters on c_attn, c_proj and c_fc (peft); only the
    adapters stay trainable."""
    import peft

    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
    )
    return peft.get_peft_model(model, config)


def make_examples(n: int, length: int, vocab: int) -> list[TokenizedExample]:
    """n random examples of `length` tokens, the second half scored."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (n, length), generator=gen).tolist()
    mask = tuple([False] * (length // 2) + [True] * (length - length // 2))
    return [TokenizedExample(tuple(row), mask) for row in ids]


def time_training(
    model: torch.nn.Module, exs: list[TokenizedExample], batch: int, steps: int, device: str
) -> float:
    """Seconds per example of fwd + bwd + AdamW step (after one warm-up step)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    elapsed = 0.0
    for step in range(steps + 1):
        b = collate(exs[(step * batch) % len(exs) :][:batch], pad_id=0).to(device)
        start = time.perf_counter()
        loss = completion_loss(model(input_ids=b.input_ids).logits, b.input_ids, b.loss_mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if step:
            elapsed += time.perf_counter() - start
    return elapsed / (steps * batch)


def time_sketch(
    model: torch.nn.Module,
    kind: str,
    exs: list[TokenizedExample],
    dim: int,
    batch: int,
    device: str,
) -> float:
    """Seconds per example to sketch `exs` (after a warm-up batch that also builds caches)."""
    proj = build_projector(model, kind=kind, dim=dim, seed=0)
    print(
        f"{kind}: {proj.manifest.numel / 1e6:.2f}M parameters sketched, "
        f"{len(proj.manifest.excluded)} excluded"
    )
    sketch_examples(model, proj, exs[:batch], batch_size=batch)
    _sync(device)
    start = time.perf_counter()
    sketch_examples(model, proj, exs, batch_size=batch)
    _sync(device)
    return (time.perf_counter() - start) / len(exs)


def demo_schedule(steps: int, first_anchor: int, interval: int, reanchor_every: int,
                  initial: int, late: int, late_at: int) -> tuple[int, int]:
    """(anchors, sources sketched) of a demo run: at each sketch point a new anchor
    sketches the target and every registered task; otherwise only the tasks
    registered since (the late ones, after `late_at`) are sketched."""
    anchors = sources = 0
    anchor_step, late_done = -1, False
    for step in range(first_anchor, steps, max(interval, 1)):
        registered = initial + (late if step > late_at else 0)
        if anchor_step < 0 or (reanchor_every and step - anchor_step >= reanchor_every):
            anchor_step, anchors = step, anchors + 1
            sources += 1 + registered
            late_done = step > late_at
        elif step > late_at and not late_done:
            sources, late_done = sources + late, True
    return anchors, sources


def demo_run(threads: int, sketch_batch: int = 0, rounds: int = 3,
             schedule: str = "demo") -> None:
    """Measure the sketching share of a `make demo` run (see the module docstring);
    `schedule` "defaults": the same run at the trainer's default anchor schedule."""
    import tempfile
    from pathlib import Path

    from gradmix.demo.job import parse_args
    from gradmix.demo.run import write_job
    from gradmix.demo.tasks import (
        TARGET,
        TASKS,
        DemoTask,
        generate,
        initial_tasks,
        late_tasks,
        write_tasks,
    )
    from gradmix.trainer.data import tokenize
    from gradmix.trainer.setup import build_model, build_tokenizer

    if threads:
        torch.set_num_threads(threads)
    demo = parse_args([])
    run = demo.run
    with tempfile.TemporaryDirectory() as tmp:
        files = write_tasks(Path(tmp) / "data", count=4, target_count=4)
        config = write_job(Path(tmp) / "job.toml", job="bench", settings=run, files=files,
                           initial=initial_tasks(), server="127.0.0.1:1", store=tmp, policy={})
    sk = config.sketching
    if schedule == "defaults":  # the trainer's own re-anchor rule, the rest as the demo's
        defaults = SketchingConfig()
        sk = dataclasses.replace(sk, first_anchor=defaults.first_anchor,
                                 interval=defaults.interval,
                                 reanchor_every=defaults.reanchor_every,
                                 drift_bound=defaults.drift_bound)
    if sketch_batch:  # what another [sketching].batch_size would give (same sketches)
        sk = dataclasses.replace(sk, batch_size=sketch_batch)
    torch.manual_seed(config.training.seed)
    tokenizer = build_tokenizer(config.tokenizer)
    model = build_model(config.model, tokenizer)
    length = config.data.max_length

    def examples(task: DemoTask, count: int) -> list[TokenizedExample]:
        rows = generate(task, count, run.seed)
        return [tokenize(r.prompt, r.completion, tokenizer, length) for r in rows]

    sources = {"target": examples(TARGET, sk.examples_per_task)}
    sources.update({name: examples(TASKS[name], sk.examples_per_task) for name in TASKS})
    anchors, sketched = demo_schedule(run.steps, sk.first_anchor, sk.interval, sk.reanchor_every,
                                      len(initial_tasks()), len(late_tasks()), demo.late_at)
    print(f"schedule: {schedule} (first_anchor={sk.first_anchor}, interval={sk.interval}, "
          f"reanchor_every={sk.reanchor_every}, drift_bound={sk.drift_bound})")
    print(f"demo run: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{torch.get_num_threads()} threads; {run.steps} steps of {run.batch_size}; "
          f"{anchors} anchors, {sketched} sources x {sk.examples_per_task} examples sketched "
          f"({sk.projector}, d={sk.dim}, sketch batch {sk.batch_size})")

    batch = run.batch_size
    pool = [e for rows in sources.values() for e in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr)
    proj = build_projector(model, kind=sk.projector, dim=sk.dim, seed=sk.seed,
                           factor_dim=sk.factor_dim or None)
    kwargs: dict[str, Any] = {"batch_size": sk.batch_size, "pad_id": tokenizer.pad_id,
                              "value_kind": sk.value_kind}
    drawn = 0

    def train_step() -> float:
        nonlocal drawn
        b = collate(pool[(drawn * batch) % len(pool):][:batch], pad_id=tokenizer.pad_id)
        drawn += 1
        model.train()
        start = time.perf_counter()
        loss = completion_loss(model(input_ids=b.input_ids).logits, b.input_ids, b.loss_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def sketch_sources() -> float:
        start = time.perf_counter()
        for rows in sources.values():
            sketch_examples(model, proj, rows, **kwargs)
        return (time.perf_counter() - start) / len(sources)

    def bare_sources() -> float:
        """A sketch's floor: the forward and the backward to the input embeddings
        alone (no hooks, no projection, no weight gradient)."""
        embed = cast(torch.nn.Module, cast(Any, model).get_input_embeddings())
        start = time.perf_counter()
        model.eval()
        for rows in sources.values():
            for at in range(0, len(rows), sk.batch_size):
                b = collate(rows[at:at + sk.batch_size], pad_id=tokenizer.pad_id)
                with torch.enable_grad():
                    x = embed(b.input_ids).detach().requires_grad_()
                    logits = model(inputs_embeds=x, attention_mask=torch.ones_like(b.input_ids))
                    f = values_of(sk.value_kind, logits.logits, b.input_ids, b.loss_mask)
                    torch.autograd.grad(f.sum(), x)
        return (time.perf_counter() - start) / len(sources)

    train_step(), train_step()  # warm-up, then rounds of all three, interleaved (the load moves)
    sketch_examples(model, proj, sources["target"][: sk.batch_size], **kwargs)
    steps_per_round, train_times, sketch_times, bare_times = 10, [], [], []
    for _ in range(rounds):
        train_times.append(sum(train_step() for _ in range(steps_per_round)) / steps_per_round)
        sketch_times.append(sketch_sources())
        bare_times.append(bare_sources())
    step_s, per_source = statistics.median(train_times), statistics.median(sketch_times)
    bare = statistics.median(bare_times)
    print(f"train: {step_s * 1e3:.1f} ms/step; sketch: {per_source:.3f} s per source of "
          f"{sk.examples_per_task} examples, of which a bare forward and backward "
          f"{bare:.3f} s (medians of {rounds} interleaved rounds)")

    sketch_total, train_total = sketched * per_source, run.steps * step_s
    per_example = per_source / sk.examples_per_task
    print(f"run: {train_total:.0f} s training, {sketch_total:.0f} s sketching")
    bare_total = sketched * bare
    print(f"sketch_share: share={sketch_total / (sketch_total + train_total):.3f} "
          f"floor_share={bare_total / (bare_total + train_total):.3f} "
          f"train_step_ms={step_s * 1e3:.1f} sketch_ms_per_example={per_example * 1e3:.2f} "
          f"train_ms_per_example={step_s / batch * 1e3:.2f} "
          f"ratio={per_example / (step_s / batch):.2f} "
          f"sketched_examples={sketched * sk.examples_per_task} "
          f"trained_examples={run.steps * batch}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dense-batches", type=int, default=1)
    parser.add_argument("--structured-batches", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    parser.add_argument("--demo-run", action="store_true",
                        help="the sketching share of a `make demo` run instead")
    parser.add_argument("--sketch-batch", type=int, default=0,
                        help="--demo-run: sketch batch size (0: the demo job's)")
    parser.add_argument("--schedule", choices=("demo", "defaults"), default="demo",
                        help="--demo-run: the demo job's anchor schedule, or the trainer's "
                             "default one ([sketching] first_anchor, interval, "
                             "reanchor_every, drift_bound left unset)")
    args = parser.parse_args()
    if args.demo_run:
        demo_run(args.threads, args.sketch_batch, schedule=args.schedule)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    base = make_model(args.device)
    vocab, n_params = base.config.vocab_size, sum(p.numel() for p in base.parameters())
    model: torch.nn.Module = base
    print(
        f"model: GPT-2 {n_params / 1e6:.2f}M parameters on {args.device}, "
        f"{torch.get_num_threads()} threads; d={args.dim} batch={args.batch} T={args.length}"
    )
    if args.lora:
        model = with_lora(model, args.lora).to(args.device)
        adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"lora: rank {args.lora}, {adapters / 1e6:.3f}M adapter parameters trained")
    exs = make_examples(args.batch * max(args.steps, args.structured_batches), args.length, vocab)
    train = time_training(model, exs, args.batch, args.steps, args.device)
    print(f"train: {train * 1e3:.2f} ms/example")
    dense = time_sketch(
        model, "dense", exs[: args.batch * args.dense_batches], args.dim, args.batch, args.device
    )
    print(f"dense: {dense * 1e3:.2f} ms/example")
    structured = time_sketch(
        model,
        "structured",
        exs[: args.batch * args.structured_batches],
        args.dim,
        args.batch,
        args.device,
    )
    print(f"structured: {structured * 1e3:.2f} ms/example")
    print(f"sketch: dense_ratio={dense / train:.2f} structured_ratio={structured / train:.2f} "
          f"train_ms_per_example={train * 1e3:.2f}")


if __name__ == "__main__":
    main()
