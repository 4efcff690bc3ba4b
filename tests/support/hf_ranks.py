"""A `transformers.Trainer` run with `GradmixCallback`, interrupted and resumed.

As a module: `train_and_resume` runs a tiny GPT-2 (built from a config) for
`steps` optimizer steps with a checkpoint at `steps // 2`, then a second
Trainer resumes from that checkpoint to the end; it returns, per run, the
batches the model trained on (recorded by a forward hook) and the callback's
mixture history. As a script (under torchrun, gloo on CPU) each rank writes
that as JSON and leaves the group after a barrier.

    torchrun --nproc_per_node 2 tests/support/hf_ranks.py <server> <store> <data> <out>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from api_ranks import tiny_gpt2, tokenizer
from gradmix.trainer.config import SketchingConfig
from gradmix.trainer.hf import GradmixCallback
from gradmix.trainer.mixture_stream import MixtureStream, completion_example, pad_collator

SKETCHING = SketchingConfig(dim=32, examples_per_task=4, batch_size=4, interval=0)


def _rows(path: Path) -> list[dict[str, list[int]]]:
    tok = tokenizer()
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [completion_example(r["prompt"], r["completion"], tok, 16) for r in records]


def _run(
    server: str, store: str, data: Path, out: Path, steps: int, resume: bool, files: bool
) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    tasks = {t: data / f"{t}.jsonl" for t in ("add", "mul")}
    stream = MixtureStream({t: _rows(p) for t, p in tasks.items()}, seed=0)
    callback = GradmixCallback(
        stream,
        job="hf",
        server=server,
        store=store,
        tokenizer=tokenizer(),
        target=data / "target.jsonl",
        tasks=tasks if files else None,  # None: sketch the stream's own rows
        sketching=SKETCHING,
        max_length=16,
    )
    model = tiny_gpt2()
    trained: list[list[list[int]]] = []
    model.register_forward_pre_hook(  # training forwards only (sketching runs in eval mode)
        lambda m, _a, kw: trained.append(kw["input_ids"].tolist()) if m.training else None,
        with_kwargs=True,
    )
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        save_steps=steps // 2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=stream,
        data_collator=pad_collator(tokenizer().pad_id, width=16),
        callbacks=[callback],
    )
    trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{steps // 2}") if resume else None)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    anchor = callback.sketcher.state.to_dict() if callback.sketcher else {}
    return {"trained": trained, "history": callback.history, "losses": losses, "anchor": anchor}


def train_and_resume(
    server: str, store: str, data: Path, out: Path, steps: int = 6, files: bool = True
) -> dict[str, dict[str, Any]]:
    """The uninterrupted run and the run resumed from its mid-run checkpoint (tasks
    sketched from their JSONL `files`, or from the stream's rows)."""
    full = _run(server, store, data, out, steps, resume=False, files=files)
    resumed = _run(server, store, data, out, steps, resume=True, files=files)
    return {"full": full, "resumed": resumed}


def main(server: str, store: str, data: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        result = train_and_resume(server, store, Path(data), Path(out) / "run", files=False)
        Path(out, f"rank-{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
