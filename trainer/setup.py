"""Building what the loop trains: tokenizer, model, DeepSpeed engine, task data, and
the client of the selection server.

Nothing is ever downloaded: the model comes from a transformers config dict
or a local directory, the tokenizer is the built-in character tokenizer or a
local directory.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from gradmix.client import SelectionClient
from gradmix.client.client import DEFAULT_TIMEOUT
from gradmix.trainer.config import ModelConfig, TokenizerConfig, TrainConfig
from gradmix.trainer.data import CharTokenizer, HFTokenizer, Location, TaskPool, Tokenizer
from gradmix.trainer.errors import ConfigError
from gradmix.trainer.lora import apply_lora
from torch import nn


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The configured tokenizer."""
    if cfg.kind == "path":
        return HFTokenizer(cfg.path)
    return CharTokenizer(cfg.alphabet) if cfg.alphabet else CharTokenizer()


def build_model(cfg: ModelConfig, tokenizer: Tokenizer) -> nn.Module:
    """A causal LM from a config dict (vocab size defaulting to the tokenizer's) or a
    local directory.

    Raises:
        ConfigError: unknown model type, unreadable directory, or a vocabulary
            smaller than the tokenizer's.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if cfg.path:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.path, local_files_only=True, attn_implementation=cfg.attn_implementation
            )
        else:
            fields = dict(cfg.config)
            model_type = fields.pop("model_type")
            fields.setdefault("vocab_size", tokenizer.vocab_size)
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                fields.setdefault(
                    key, tokenizer.eos_id if key != "pad_token_id" else tokenizer.pad_id
                )
            hf_config = AutoConfig.for_model(model_type, **fields)
            model = AutoModelForCausalLM.from_config(
                hf_config, attn_implementation=cfg.attn_implementation
            )
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"[model]: cannot build the model: {exc}") from exc
    embeddings: Any = model.get_input_embeddings()
    vocab = int(embeddings.weight.shape[0])
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"[model] vocab size {vocab} < tokenizer's {tokenizer.vocab_size}")
    return apply_lora(model, cfg.lora) if cfg.lora else model


def deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config with batch sizes filled in from [training]."""
    ds = copy.deepcopy(config.deepspeed)
    ds.setdefault("train_micro_batch_size_per_gpu", config.training.batch_size)
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.setdefault("steps_per_print", 10**9)  # the progress bar reports
    if "optimizer" not in ds:
        ds.setdefault("zero_allow_untested_optimizer", True)  # our torch AdamW
    return ds


def build_engine(config: TrainConfig, model: nn.Module) -> Any:
    """`deepspeed.initialize` with the job's config (AdamW unless it names an optimizer)."""
    import deepspeed

    ds = deepspeed_config(config)
    optimizer = None
    if "optimizer" not in ds:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.training.lr, weight_decay=config.training.weight_decay
        )
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), optimizer=optimizer, config=ds
    )
    return engine


def build_pool(config: TrainConfig, tokenizer: Tokenizer) -> TaskPool:
    """Task data for the configured target and tasks (more are added as they appear)."""
    paths: dict[str | None, Location] = {None: config.data.target}
    paths.update(config.data.tasks)
    return TaskPool(
        tokenizer, max_length=config.data.max_length, seed=config.training.seed, paths=paths
    )


def build_client(config: TrainConfig, env: Mapping[str, str] | None = None,
                 timeout: float | None = None) -> SelectionClient:
    """The client of the job's server: TLS and the bearer token as configured.

    The token comes from `token_file`, else the GRADMIX_TOKEN environment variable.

    Raises:
        ConfigError: a certificate or token file cannot be read.
    """
    env = os.environ if env is None else env

    def read(name: str) -> bytes | None:
        path = getattr(config, name)
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {name} {path}: {exc}") from exc

    token_bytes = read("token_file")
    token = token_bytes.decode().strip() if token_bytes else env.get("GRADMIX_TOKEN") or None
    return SelectionClient(
        config.server,
        timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
        tls=config.tls,
        root_certificates=read("ca_cert"),
        certificate_chain=read("client_cert"),
        private_key=read("client_key"),
        token=token,
    )
