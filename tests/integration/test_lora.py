"""LoRA / PEFT adapters through the public sketching API.

A peft model trains only its adapters, so the manifest (trainable
parameters) covers exactly the LoRA A/B factors, each a linear layer
(`lora_A.<adapter>`, `lora_B.<adapter>`) the structured projector sketches
from its input and output gradient. The hooks' sketch must equal the
projection of exact per-sample gradients over the adapters (torch.func).
`gradmix-train` builds the same adapters from `[model].lora`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from api_ranks import tiny_gpt2, tokenizer
from gradmix.store import SketchStore
from gradmix.trainer import api
from gradmix.trainer.config import ModelConfig, SketchingConfig, TokenizerConfig, load_config
from gradmix.trainer.data import collate
from gradmix.trainer.errors import ConfigError
from gradmix.trainer.runlog import log_path, read_log
from gradmix.trainer.setup import build_model, build_tokenizer
from gradmix.trainer.sketch import per_sample_gradients

peft = pytest.importorskip("peft")


def lora_model() -> torch.nn.Module:
    """The tiny GPT-2 with rank-4 LoRA adapters on attention and MLP projections.

    peft initialises lora_B to zero; it is randomised here so that lora_A's
    gradients (which flow through lora_B) are not all zero."""
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    model = peft.get_peft_model(tiny_gpt2(), config)
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def examples() -> list[api.TokenizedExample]:
    tok = tokenizer()
    return [api.tokenize(f"{i}*{i + 1}=", str(i * (i + 1)), tok, 16) for i in range(4)]


def test_the_manifest_covers_only_the_adapters() -> None:
    model = lora_model()
    projector = api.projector_for(model, SketchingConfig(dim=64))
    names = projector.manifest.names
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 2 * 2  # 2 layers x (c_attn, c_fc) x (A, B)
    assert {e.kind for e in projector.manifest.entries} == {"kronecker"}
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert projector.manifest.numel == adapters
    assert adapters < sum(p.numel() for p in model.parameters()) / 10


@pytest.mark.parametrize("factor_dim", [2, 64])
def test_structured_lora_sketch_is_the_projection_of_exact_adapter_gradients(
    factor_dim: int,
) -> None:
    model, exs = lora_model(), examples()
    projector = api.projector_for(
        model, SketchingConfig(dim=64, seed=2, projector="structured", factor_dim=factor_dim)
    )
    sketched, values = api.sketch(model, projector, exs, batch_size=4, value_kind="log_odds")
    grads, exact_values = per_sample_gradients(
        model, projector.manifest.names, collate(exs, pad_id=0), value_kind="log_odds"
    )
    assert all(float(g.abs().sum()) > 0 for g in grads.values())
    scale = float(sketched.abs().max())
    torch.testing.assert_close(sketched, projector.project(grads), rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(values, exact_values.float(), rtol=1e-5, atol=1e-5)


def test_dense_lora_sketch_runs_over_the_adapters() -> None:
    model, exs = lora_model(), examples()
    projector = api.projector_for(model, SketchingConfig(dim=32, projector="dense"))
    grads, _ = api.sketch(model, projector, exs, batch_size=2)
    assert grads.shape == (4, 32) and float(grads.norm()) > 0


def test_gradmix_train_model_lora_settings(tmp_path: Path) -> None:
    """`[model].lora` in a job TOML: the model gradmix-train builds trains only adapters."""
    (tmp_path / "t.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    (tmp_path / "job.toml").write_text(
        """
job = "lora"
output_dir = "out"
[model]
config = { model_type = "gpt2", n_embd = 32, n_layer = 2, n_head = 2, n_positions = 32 }
lora = { r = 4, lora_alpha = 8, target_modules = ["c_attn"] }
[data]
target = "t.jsonl"
"""
    )
    config = load_config(tmp_path / "job.toml")
    assert config.model.lora["r"] == 4
    model = build_model(config.model, build_tokenizer(config.tokenizer))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    projector = api.projector_for(model, config.sketching)
    assert projector.manifest.names == trainable


def test_bad_lora_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"\[model\]\.lora"):
        build_model(
            ModelConfig(config={"model_type": "gpt2", "n_layer": 1}, lora={"rank_typo": 4}),
            build_tokenizer(TokenizerConfig()),
        )


@pytest.mark.slow
def test_gradmix_train_trains_and_sketches_lora_adapters(tmp_path: Path) -> None:
    """A short `gradmix-train` run (one process, DeepSpeed ZeRO-1 on CPU) with `[model].lora`:
    the job's manifest is the adapters', their rows land in the store, training runs."""
    from client_support import start_server
    from test_trainer_run import write_config, write_data

    server, port = start_server(tmp_path / "store")
    try:
        data = write_data(tmp_path / "data")
        config = write_config(
            data, job="lora", port=port, store=tmp_path / "store", training="steps = 4"
        )
        text = config.read_text().replace(
            "[tokenizer]", '[model.lora]\nr = 2\ntarget_modules = ["c_attn"]\n[tokenizer]'
        )
        config.write_text(text)
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "gradmix.trainer.main", "--config", str(config)],
            cwd=data,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    finally:
        server.stop(0)
    store = SketchStore.open(str(tmp_path / "store"))
    events = read_log(log_path(data / "out", 0))
    manifest = json.loads(next(e for e in events if e["event"] == "job")["manifest"])
    names = [entry[0] for entry in manifest["entries"]]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    anchor = next(e for e in events if e["event"] == "anchor_complete")["anchor"]
    assert len(store.read_rows("lora", anchor, "add")[0]) == 8
    assert len([e for e in events if e["event"] == "step"]) == 4
