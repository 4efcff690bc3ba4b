"""The trainer's job configuration: one TOML file, frozen dataclasses.

Precedence, lowest first: the defaults below < the TOML file <
`GRADMIX_SERVER` / `GRADMIX_STORE` environment variables < `gradmix-train`
flags. Relative paths in the file are resolved against the file's directory.

    job = "arith"
    output_dir = "runs/arith"          # checkpoints and per-rank JSON-lines logs
    server = "127.0.0.1:50551"
    # store = "/data/gradmix-store"     # omitted: the server's store (it says where)
    on_server_error = "stop"           # or "continue": see TrainConfig.on_server_error
    # upload = true                    # rows over gRPC: no store access needed
    # tls = true, ca_cert = "ca.pem", token_file = "token"   (token: or env GRADMIX_TOKEN)

    [model]                            # a transformers causal LM, never downloaded:
    config = { model_type = "gpt2", n_embd = 64, n_layer = 2, n_head = 2 }
    # path = "/models/local-checkpoint"  (a local directory instead of `config`)

    [tokenizer]
    kind = "char"                      # built-in character tokenizer, or "path"
    # path = "/models/local-tokenizer"

    [data]
    target = "data/target.jsonl"
    tasks = { add = "data/add.jsonl", mul = "data/mul.jsonl" }
    task_dir = "data"                  # <task_dir>/<task>.jsonl for tasks registered later

    [deepspeed]                        # passed to deepspeed.initialize (ZeRO stage 0–2)
    zero_optimization = { stage = 1 }

    [training]
    steps = 200
    lr = 1e-3
    batch_size = 8                     # per rank and step

    [sketching]
    dim = 256
    projector = "structured"
    value_kind = "geometric_log_odds"  # the default; or "log_odds": see SketchingConfig
    reanchor_every = 100               # re-anchor rule: see SketchingConfig
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradmix.trainer.errors import ConfigError
from gradmix.vocabulary import (
    DEFAULT_DTYPE,
    DEFAULT_EXAMPLES_PER_TASK,
    DEFAULT_PROJECTOR,
    DEFAULT_VALUE_KIND,
    Policy,
    Projector,
    SketchDtype,
    ValueKind,
    choices,
)

PROJECTORS = choices(Projector)
DTYPES = choices(SketchDtype)
POLICIES = choices(Policy)
VALUE_KINDS = choices(ValueKind)
ON_SERVER_ERROR = ("stop", "continue")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """The causal LM to train."""

    config: dict[str, Any] = field(default_factory=dict)
    """A transformers config as a dict (must name `model_type`); the model is built from it."""
    path: str = ""
    """A local model directory (instead of `config`)."""
    attn_implementation: str = "eager"
    """Attention kernel; "eager" is the one torch.func can vmap per example."""
    lora: dict[str, Any] = field(default_factory=dict)
    """peft `LoraConfig` fields, e.g. `{ r = 8, target_modules = ["c_attn"] }` (empty:
    full fine-tuning). With adapters only they train and are sketched (`gradmix.trainer.lora`)."""

    def __post_init__(self) -> None:
        _require(bool(self.config) != bool(self.path), "[model]: give exactly one of config, path")
        _require(
            not self.config or "model_type" in self.config,
            "[model].config must name a model_type (e.g. 'gpt2')",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenizerConfig:
    """How text becomes token ids."""

    kind: str = "char"
    """"char": the built-in character tokenizer; "path": a local transformers tokenizer."""
    path: str = ""
    """The tokenizer directory when kind = "path"."""
    alphabet: str = ""
    """Characters of the char tokenizer (default: Python's string.printable)."""

    def __post_init__(self) -> None:
        _require(self.kind in ("char", "path"), f"[tokenizer].kind: {self.kind!r} not char|path")
        _require(self.kind != "path" or bool(self.path), "[tokenizer]: kind 'path' needs path")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """Where the target's and the tasks' examples are: JSONL of prompt/completion or chat
    records, or (with `datasets`) .json / .parquet files or `save_to_disk` directories;
    local paths or fsspec URLs (`gradmix.trainer.data`)."""

    target: str
    """The target's JSONL file (the examples whose loss should go down)."""
    tasks: dict[str, str] = field(default_factory=dict)
    """Task name → JSONL file, registered with the server at start."""
    task_dir: str = ""
    """Where a task registered later finds its file, `<task_dir>/<task>.jsonl`, unless
    its registration metadata names a `path`."""
    max_length: int = 128
    """Longest example in tokens (longer ones are cut)."""

    def __post_init__(self) -> None:
        _require(bool(self.target), "[data].target is required")
        _require(self.max_length >= 2, "[data].max_length must be >= 2")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingConfig:
    """The optimisation loop."""

    steps: int = 100
    """Optimizer steps to run (in total, counting resumed steps)."""
    lr: float = 1e-3
    """AdamW learning rate (unless the deepspeed config names its own optimizer)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 8
    """Examples per rank and step, all from the task drawn for that step."""
    seed: int = 0
    """Seeds model init, task draws and batch draws."""
    checkpoint_every: int = 0
    """Save a DeepSpeed checkpoint every this many steps (0: only at the end)."""
    eval_every: int = 10
    """Steps between target-loss evaluations (rank 0; 0: none). Each is shown on the
    progress bar and written to rank 0's run log as an `eval` event with `step` (the
    optimizer steps done: 0 before training, then every `eval_every` and the last)
    and `target_loss`."""
    eval_examples: int = 32
    """Target examples in that evaluation (the first ones of the target's file)."""
    wait_for_mixture: float = 10.0
    """Seconds rank 0 waits at start for the server's first mixture (else uniform)."""
    reproducible: bool = False
    """Apply mixtures at deterministic steps: each estimated mixture takes effect at the
    sketch point that completed its anchor (rank 0 waits there up to
    `mixture_timeout` seconds for the server's estimate at that anchor), and versions
    published in between wait for the next such point. Two runs with the same config
    and seed then draw the same tasks at the same steps, given the same tasks (tasks
    registered while a run trains arrive when they arrive). A timeout is a warning
    and the run goes on under the mixture in force. Off: each version takes effect at
    the first step after it arrives."""
    mixture_timeout: float = 120.0
    """Seconds a reproducible run waits at a completed anchor for its mixture."""

    def __post_init__(self) -> None:
        _require(self.steps >= 0, "[training].steps must be >= 0")
        _require(self.lr > 0, "[training].lr must be > 0")
        _require(self.batch_size >= 1, "[training].batch_size must be >= 1")
        _require(self.seed >= 0, "[training].seed must be >= 0")
        _require(self.checkpoint_every >= 0, "[training].checkpoint_every must be >= 0")
        _require(self.eval_every >= 0, "[training].eval_every must be >= 0")
        _require(self.wait_for_mixture >= 0, "[training].wait_for_mixture must be >= 0")
        _require(self.mixture_timeout >= 0, "[training].mixture_timeout must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class SketchingConfig:
    """How and when sketches are taken (DESIGN.md §4).

    Re-anchor rule: at each sketch point (every `interval` steps, starting at
    `first_anchor`), a new anchor is declared if none exists yet, or if
    `reanchor_every` > 0 and that many steps passed since the current anchor,
    or if `drift_bound` > 0 and the relative distance of the sketched
    parameters from their anchor values, ‖θ − θ_anchor‖₂ / ‖θ_anchor‖₂,
    exceeds it (θ_anchor is kept on rank 0 in memory; a resumed run measures
    drift from its resume point until its next anchor). A new anchor
    re-sketches the target and every task; otherwise
    the sketch point only sketches tasks registered since (at the current
    anchor).
    """

    dim: int = 256
    """Projection dimension d."""
    seed: int = 0
    """Projection seed."""
    projector: str = DEFAULT_PROJECTOR
    """"dense" (blocked Rademacher over all selected parameters, the reference) or
    "structured" (Kronecker factors per linear layer, embedding and tied output
    layer; norms projected densely: every parameter, at a fraction of the cost)."""
    value_kind: str = DEFAULT_VALUE_KIND
    """The sketched value f(x) (DESIGN.md §4; `gradmix.trainer.values`):
    "geometric_log_odds", logit(p̄) with p̄ the completion tokens' geometric-mean
    probability, for which softplus(−f) is the example's mean token
    cross-entropy, the loss the trainer trains on; or "log_odds", the mean over
    completion tokens of logit(p_t), the method paper's value, which counts a
    confidently predicted token as much as any other and so makes tasks that
    share the target's prompts but answer wrongly look like it. Recorded in the
    job's sketch spec: a job's sketches never mix kinds. The README's benchmark
    section has the measurements behind the default."""
    factor_dim: int = 0
    """Structured projector's Kronecker factor size k (0: 4⌈√d⌉, at least 64)."""
    parameters: tuple[str, ...] = ("*",)
    """fnmatch patterns over parameter names (default: all trainable)."""
    examples_per_task: int = DEFAULT_EXAMPLES_PER_TASK
    """Examples sketched per task (and for the target) at an anchor (seeded draw)."""
    batch_size: int = 8
    """Examples per sketching batch."""
    dtype: str = DEFAULT_DTYPE
    """Storage dtype of the sketches in the store."""
    first_anchor: int = 0
    """Step of the first anchor."""
    interval: int = 10
    """Steps between sketch points (0: sketch once, at `first_anchor`)."""
    reanchor_every: int = 0
    """Re-anchor after this many steps (0: never by age)."""
    drift_bound: float = 0.0
    """Re-anchor when relative parameter drift exceeds this (0: never by drift)."""

    def __post_init__(self) -> None:
        _require(self.dim > 0, "[sketching].dim must be > 0")
        _require(self.seed >= 0, "[sketching].seed must be >= 0")
        _require(self.projector in PROJECTORS, f"[sketching].projector not in {PROJECTORS}")
        _require(self.value_kind in VALUE_KINDS, f"[sketching].value_kind not in {VALUE_KINDS}")
        _require(self.factor_dim >= 0, "[sketching].factor_dim must be >= 0")
        _require(bool(self.parameters), "[sketching].parameters must name at least one pattern")
        _require(self.examples_per_task >= 1, "[sketching].examples_per_task must be >= 1")
        _require(self.batch_size >= 1, "[sketching].batch_size must be >= 1")
        _require(self.dtype in DTYPES, f"[sketching].dtype not in {DTYPES}")
        for name in ("first_anchor", "interval", "reanchor_every"):
            _require(getattr(self, name) >= 0, f"[sketching].{name} must be >= 0")
        _require(self.drift_bound >= 0, "[sketching].drift_bound must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """A whole `gradmix-train` job."""

    job: str
    """The job's name on the server and in the store."""
    output_dir: str
    """Checkpoints (`checkpoints/`) and per-rank logs (`logs/rank-<r>.jsonl`)."""
    server: str = "127.0.0.1:50551"
    """host:port of the selection server."""
    store: str = ""
    """The sketch store the trainer writes its rows into: a local path or fsspec URL.
    Empty (the default): the server's own store, as the server reports it. When
    given, it must be the server's store (checked at start)."""
    metrics_port: int = 0
    """Rank 0 serves Prometheus metrics (`gradmix.trainer.metrics`) on this port; 0: none."""
    upload: bool = False
    """Send sketch rows over gRPC (UploadSketch) instead of writing `store`: the
    trainer then needs no store access or credentials."""
    tls: bool = False
    """Connect to the server with TLS."""
    ca_cert: str = ""
    """PEM CA to trust under tls (empty: the system roots)."""
    client_cert: str = ""
    """PEM client certificate, for a server that asks for one (mutual TLS)."""
    client_key: str = ""
    """PEM key of client_cert."""
    token_file: str = ""
    """File holding the bearer token (else env GRADMIX_TOKEN, else none)."""
    model: ModelConfig
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed config; batch sizes are filled in from [training] when absent."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sketching: SketchingConfig = field(default_factory=SketchingConfig)
    policy: dict[str, Any] = field(default_factory=dict)
    """PolicySettings fields sent when the job is created (empty: server defaults)."""
    on_server_error: str = "stop"
    """What a refusal by the server does once the job is set up (INVALID_ARGUMENT,
    PERMISSION_DENIED, NOT_FOUND, FAILED_PRECONDITION, ...: answers a retry cannot
    change). "stop" (the default) ends the run with the server's message;
    "continue" logs it as an error and trains on under the mixture in force, which
    then is no longer being estimated. An unreachable server never stops a run."""

    def __post_init__(self) -> None:
        from gradmix.store import validate_name

        for what, name in [("job", self.job), *(("task", t) for t in self.data.tasks)]:
            try:
                validate_name(name)
            except ValueError as exc:
                raise ConfigError(f"bad {what} name {name!r}: {exc}") from exc
        _require(bool(self.output_dir), "output_dir is required")
        _require(0 <= self.metrics_port <= 65535, "metrics_port must be in 0..65535")
        for name in ("ca_cert", "client_cert", "client_key"):
            _require(self.tls or not getattr(self, name), f"{name} needs tls = true")
        _require(bool(self.client_cert) == bool(self.client_key),
                 "client_cert and client_key go together")
        stage = int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))
        _require(stage in (0, 1, 2, 3), f"ZeRO stage {stage} unsupported (0–3)")
        if stage == 3:  # parameters sharded
            from gradmix.trainer.sharded import sketching_problem

            problem = sketching_problem(self.sketching)
            _require(not problem, problem)
        unknown = set(self.policy) - {f.name for f in dataclasses.fields(_policy_fields())}
        _require(not unknown, f"[policy]: unknown keys {sorted(unknown)}")
        try:
            _policy_fields()(**self.policy)
        except (ValueError, TypeError) as exc:  # InvalidArgument is a ValueError
            raise ConfigError(f"[policy]: {' '.join(str(exc).split())}") from exc
        _require(
            self.on_server_error in ON_SERVER_ERROR,
            f"on_server_error: {self.on_server_error!r} not in {ON_SERVER_ERROR}",
        )


def _policy_fields() -> Any:
    from gradmix.client import PolicySettings

    return PolicySettings


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "tokenizer": TokenizerConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "sketching": SketchingConfig,
}
_PATH_FIELDS = {
    ("data", "target"),
    ("data", "task_dir"),
    ("model", "path"),
    ("tokenizer", "path"),
    ("top", "output_dir"),
    ("top", "ca_cert"),
    ("top", "client_cert"),
    ("top", "client_key"),
    ("top", "token_file"),
}


def load_config(
    path: str | Path, *, env: Mapping[str, str] | None = None, **overrides: Any
) -> TrainConfig:
    """Read a job TOML file into a validated `TrainConfig`.

    Args:
        path: the TOML file.
        env: environment (default os.environ); GRADMIX_SERVER, GRADMIX_STORE and
            GRADMIX_TOKEN_FILE override.
        overrides: top-level fields set by flags (server, store, output_dir, upload), None
            ignored.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown keys, wrong types or bad values
            (the message names the key).
    """
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    base = path.resolve().parent
    env = os.environ if env is None else env
    for key in ("server", "store", "token_file"):
        if env.get(f"GRADMIX_{key.upper()}"):
            doc[key] = env[f"GRADMIX_{key.upper()}"]
    doc.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return _build(doc, base)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _build(doc: dict[str, Any], base: Path) -> TrainConfig:
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        raw = doc.pop(name, None)
        if raw is None:
            continue
        _require(isinstance(raw, dict), f"[{name}] must be a table")
        sections[name] = cls(**_checked(name, cls, _resolve(name, raw, base)))
    if "data" in sections:
        tasks = {t: str(_abs(p, base)) for t, p in sections["data"].tasks.items()}
        sections["data"] = dataclasses.replace(sections["data"], tasks=tasks)
    top = _checked("top", TrainConfig, _resolve("top", doc, base))
    _require("model" in sections, "[model] is required")
    _require("data" in sections, "[data] is required")
    return TrainConfig(**top, **sections)


def _checked(section: str, cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """Unknown keys and wrong scalar types are ConfigErrors naming the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = "" if section == "top" else f"[{section}]."
    out = {}
    for key, value in raw.items():
        _require(key in fields, f"unknown key {where}{key}")
        default: Any = fields[key].default
        factory = fields[key].default_factory
        if default is dataclasses.MISSING and callable(factory):
            default = factory()
        if isinstance(default, tuple):
            _require(isinstance(value, list), f"{where}{key} must be a list")
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif default is not dataclasses.MISSING and not isinstance(value, type(default)):
            raise ConfigError(
                f"{where}{key} must be {type(default).__name__}, got {type(value).__name__}"
            )
        out[key] = value
    return out


def _resolve(section: str, raw: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(raw)
    for sec, key in _PATH_FIELDS:
        if sec == section and isinstance(out.get(key), str) and out[key]:
            out[key] = str(_abs(out[key], base))
    store = out.get("store")
    if section == "top" and isinstance(store, str) and store and "://" not in store:
        out["store"] = str(_abs(out["store"], base))
    return out


def _abs(p: str, base: Path) -> str:
    """A local path made absolute against `base`; an fsspec URL as is."""
    if "://" in p:
        return p
    return str(Path(p) if Path(p).is_absolute() else base / p)
