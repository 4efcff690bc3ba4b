"""Building what the loop trains: tokenizer, model, DeepSpeed engine, task data, and
the client of the selection server.

Nothing is ever downloaded: the model comes from a transformers config dict
or a local directory, the tokenizer is the built-in character tokenizer or a
local directory.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from gradmix.client import SelectionClient
from gradmix.client.client import DEFAULT_TIMEOUT
from gradmix.client.errors import AlreadyExists, NotFound, PermissionDenied
from gradmix.client.types import Job, PolicySettings, SketchSpec
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
            model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
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


def join_job(client: SelectionClient, name: str, *, sketch: SketchSpec,
             policy: PolicySettings | None, target: str) -> str:
    """Join the job `name` if it exists with this spec, else create it: "joined" or "created".

    Joining needs a `reader` token (GetJob); only creating needs `admin`, so a
    trainer can run with a `writer` token on a job an admin created. As with
    CreateJob, zero policy fields and an empty target match any stored value.

    Raises:
        AlreadyExists: the job exists with another spec (sketches must never mix).
        ConfigError: the job does not exist and the token may not create it.
        GradmixError: any other refusal or outage (the caller tells transient ones apart).
    """
    try:
        job = client.get_job(name)
    except NotFound:
        job = None
    if job is not None:
        _check_joinable(job, sketch, policy, target)
        return "joined"
    try:
        client.create_job(name, sketch=sketch, policy=policy, target=target)
    except PermissionDenied as exc:
        raise ConfigError(
            f"job {name!r} does not exist and this token may not create it: an admin must "
            f"create it first: {create_job_command(name, sketch, policy, target)}"
        ) from exc
    return "created"


def create_job_command(name: str, sketch: SketchSpec, policy: PolicySettings | None,
                       target: str) -> str:
    """The `gradmix create-job` command line that creates `name` with this spec."""
    words = ["gradmix", "create-job", name]
    for field in dataclasses.fields(sketch):
        words += [f"--{field.name.replace('_', '-')}", str(getattr(sketch, field.name))]
    if target:
        words += ["--target", target]
    if policy is not None:
        for field in dataclasses.fields(policy):
            value = getattr(policy, field.name)
            if value not in (0, 0.0, None, ""):
                flag = "policy-seed" if field.name == "seed" else field.name.replace("_", "-")
                words += [f"--{flag}", str(value)]
    return shlex.join(words)


def _check_joinable(job: Job, sketch: SketchSpec, policy: PolicySettings | None,
                    target: str) -> None:
    """Raise AlreadyExists unless `job` has this sketch spec, these non-zero policy
    fields and this target (if given), the checks CreateJob makes."""
    differences = [f"spec.sketch.{key}: stored {stored!r}, requested {wanted!r}"
                   for key, stored, wanted in _fields(job.spec.sketch, sketch) if stored != wanted]
    if policy is not None:
        differences += [f"spec.policy.{key}: stored {stored!r}, requested {wanted!r}"
                        for key, stored, wanted in _fields(job.spec.policy, policy)
                        if wanted not in (0, 0.0, None) and stored != wanted]
    if target and target != job.spec.target:
        differences.append(f"spec.target: stored {job.spec.target!r}, requested {target!r}")
    if differences:
        raise AlreadyExists(f"job {job.name!r} already exists with a different "
                            + "; ".join(differences))


def _fields(stored: Any, wanted: Any) -> list[tuple[str, Any, Any]]:
    return [(f.name, getattr(stored, f.name), getattr(wanted, f.name))
            for f in dataclasses.fields(wanted)]
