"""Torchrun worker of the ZeRO-3 sketch test (gloo on CPU, 2 ranks).

Every rank builds the same tiny GPT-2 twice and wraps one copy in a DeepSpeed
ZeRO stage 1 engine, the other in a stage 3 engine with every parameter
partitioned (persistence threshold 0). Each rank sketches its share
ids[rank::2] of 5 examples (3 and 2: the second rank runs a filler batch to
keep the gathers in step) through the public API on both engines, then both
engines take the same optimizer step and are sketched again. It writes what
it saw to <out>/rank-<r>.json and leaves the group after a barrier.

    torchrun --nproc_per_node 2 tests/support/zero3_ranks.py <out>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch


def _engine(stage: int) -> Any:
    import deepspeed
    from api_ranks import tiny_gpt2

    model = tiny_gpt2()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), optimizer=optimizer, config=config
    )
    return engine


def main(out: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from api_ranks import SKETCHING, tokenizer
    from gradmix.trainer import api
    from gradmix.trainer.data import collate
    from gradmix.trainer.errors import SketchError
    from gradmix.trainer.projectors import build_projector
    from gradmix.trainer.sharded import lockstep_batches, sharded
    from gradmix.trainer.values import completion_loss

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        tok = tokenizer()
        examples = [api.tokenize(f"{i}+{i * 7}=", str(8 * i), tok, 16) for i in range(5)]
        mine = examples[rank::world]
        batches = lockstep_batches(len(examples), world, 2)
        whole, parted = _engine(1), _engine(3)
        placeholders = sum(p.numel() == 0 for p in parted.module.parameters())
        projector = api.projector_for(parted.module, SKETCHING)
        reference = api.projector_for(whole.module, SKETCHING)

        def both() -> dict[str, float]:
            g1, v1 = api.sketch(whole.module, reference, mine, batch_size=2, pad_id=tok.pad_id)
            g3, v3 = api.sketch(
                parted.module, projector, mine, batch_size=2, pad_id=tok.pad_id,
                min_batches=batches,
            )
            return {
                "grad_diff": float((g3 - g1).abs().max()),
                "grad_scale": float(g1.abs().max()),
                "value_diff": float((v3 - v1).abs().max()),
                "rows": int(g3.shape[0]),
            }

        before = both()
        batch = collate(examples[rank * 2 : rank * 2 + 2], tok.pad_id)
        losses = []
        for engine in (whole, parted):
            logits = engine(input_ids=batch.input_ids).logits
            loss = completion_loss(logits, batch.input_ids, batch.loss_mask)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        after = both()
        dense = build_projector(whole.module, kind="dense", dim=8, seed=0)
        try:
            api.sketch(parted.module, dense, mine[:1], pad_id=tok.pad_id)
            refused = ""
        except SketchError as error:
            refused = str(error)
        result = {
            "rank": rank,
            "sharded": [sharded(whole.module), sharded(parted.module)],
            "placeholders": placeholders,
            "parameters": len(list(parted.module.parameters())),
            "same_manifest": projector.manifest.hash() == reference.manifest.hash(),
            "before": before,
            "after": after,
            "losses": losses,
            "dense_refused": refused,
        }
        Path(out, f"rank-{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
