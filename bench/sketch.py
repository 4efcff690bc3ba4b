"""Sketch cost vs training cost on a ~10M-parameter GPT-2 (CPU by default).

Measures, in one run and on the same model and examples:
  - train: seconds per example of a training step (forward, backward, AdamW step);
  - dense: seconds per example to sketch all trainable parameters with the
    dense projector (torch.func per-sample gradients + blocked Rademacher);
  - structured: seconds per example to sketch all trainable parameters with
    the structured projector (forward hooks; Kronecker factors + CountSketch
    for the linear weights, the tied wte/lm_head weight and wpe; dense
    projections of the biases and LayerNorm parameters).
Last line: `sketch: dense_ratio=<...> structured_ratio=<...>` (sketch time per
example / train time per example).

With `--lora R` the model carries rank-R LoRA adapters (peft, on every
attention and MLP projection) and only they train and are sketched, the
method paper's setting: the training step is then forward, backward and an
AdamW step over the adapters, and both projectors sketch the adapters' A/B
factors (the structured one from their inputs and output gradients).

    python bench/sketch.py [--dim 256] [--batch 16] [--device cpu] [--lora 8]
"""

from __future__ import annotations

import argparse
import time

import torch
from gradmix.trainer.data import TokenizedExample, collate
from gradmix.trainer.projectors import build_projector
from gradmix.trainer.sketch import sketch_examples
from gradmix.trainer.values import completion_loss
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
    return GPT2LMHeadModel(cfg).to(device)


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
    args = parser.parse_args()
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
    print(f"sketch: dense_ratio={dense / train:.2f} structured_ratio={structured / train:.2f}")


if __name__ == "__main__":
    main()
