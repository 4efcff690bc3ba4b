"""Shared pieces of the public-API tests, and their torchrun worker.

As a module: a tiny GPT-2 built from a config (nothing downloaded), its
character tokenizer, and arithmetic JSONL tasks. As a script (under torchrun,
gloo on CPU): every rank builds the same model, runs one anchor through
`gradmix.trainer.api.Sketcher`, writes its anchor state as JSON, and leaves
the group after a barrier.

    torchrun --nproc_per_node 2 tests/support/api_ranks.py <server> <store> <data> <out>
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from gradmix.trainer.config import SketchingConfig
from gradmix.trainer.data import CharTokenizer

ALPHABET = "0123456789+*= "
TASKS = {
    "target": lambda a, b: (f"{a}+{b}=", str(a + b)),
    "add": lambda a, b: (f"{b}+{a}=", str(a + b)),
    "mul": lambda a, b: (f"{a}*{b}=", str(a * b)),
}
SKETCHING = SketchingConfig(dim=32, examples_per_task=6, batch_size=3, interval=0)


def tokenizer() -> CharTokenizer:
    """The character tokenizer of the arithmetic tasks."""
    return CharTokenizer(ALPHABET)


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """A 2-layer GPT-2 over the character vocabulary, built from a config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=tok.vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    return GPT2LMHeadModel(config).float()


def write_data(root: Path, rows: int = 24) -> dict[str, Path]:
    """Arithmetic JSONL files of {"prompt", "completion"}: the target and two tasks."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, make in TASKS.items():
        pairs = [make(rng.randint(0, 99), rng.randint(0, 99)) for _ in range(rows)]
        lines = [json.dumps({"prompt": p, "completion": c}) for p, c in pairs]
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("\n".join(lines) + "\n")
    return paths


def main(server: str, store: str, data: str, out: str) -> None:
    import torch.distributed as dist
    from gradmix.trainer.api import Sketcher

    dist.init_process_group("gloo")
    try:
        paths = {n: Path(data) / f"{n}.jsonl" for n in TASKS}  # written by the test
        sketcher = Sketcher(
            job="ranks",
            server=server,
            store=store,
            model=tiny_gpt2(),
            tokenizer=tokenizer(),
            target=paths["target"],
            tasks={"add": paths["add"], "mul": paths["mul"]},
            output_dir=out,
            sketching=SKETCHING,
            steps=10,
            learning_rate=1e-3,
            max_length=16,
        )
        sketcher.setup_job()
        state = sketcher.sketch_point(0)
        result = {"rank": sketcher.dist.rank, "world": sketcher.dist.world_size, **state.to_dict()}
        Path(out, f"rank-{dist.get_rank()}.json").write_text(json.dumps(result))
        sketcher.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
