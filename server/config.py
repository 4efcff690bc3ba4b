"""Configuration of the selection server, loaded from one place.

Precedence, lowest first: the defaults below < a TOML file (`--config`) <
`GRADMIX_*` environment variables (`GRADMIX_STORE`, `GRADMIX_PORT`, ... one
per field, upper-cased) < command-line flags (`--store`, `--port`, ... one per
field, dashes for underscores).

The policy fields are the server's defaults for jobs whose `PolicySettings`
leave a field at zero; `None` means "the estimator's own default"
(`gradmix.server.policies.PolicyConfig`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradmix.server.errors import InvalidArgumentError
from gradmix.server.policies import PolicyConfig

ENV_PREFIX = "GRADMIX_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
POLICY_NAMES = ("ensemble", "surrogate", "simplex", "uniform", "gradient_similarity")


class ConfigError(InvalidArgumentError):
    """A configuration value is missing, of the wrong type, or out of range."""


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything `gradmix-server` can be told."""

    store: str = "./gradmix-store"
    """Sketch store root: a local path (created if missing) or an fsspec URL."""
    host: str = "127.0.0.1"
    """Interface the gRPC server and /metrics bind to (0.0.0.0 in a pod)."""
    port: int = 50551
    """gRPC port; 0 picks a free one (printed at start-up)."""
    metrics_port: int = 9551
    """Prometheus /metrics port; 0 picks a free one (printed at start-up)."""
    debounce_seconds: float = 0.05
    """Delay between the first commit of a burst and the re-estimate it triggers."""
    weight_tolerance: float = 1e-6
    """A re-estimate publishes a new version only if some weight moved more than this."""
    estimation_workers: int = 1
    """Threads that run re-estimates (jobs are estimated in parallel up to this)."""
    grace_seconds: float = 5.0
    """On SIGTERM: how long open streams and calls get before the server stops."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message accepted (an UploadSketch chunk must fit)."""
    log_level: str = "INFO"
    """Python logging level name."""
    policy: str = "ensemble"
    """Default policy of a job that does not name one."""
    regularization: float | None = None
    """Default λ of the subset regression."""
    temperature: float | None = None
    """Default τ in w ∝ exp(-score/τ)."""
    floor: float | None = None
    """Default ε, the minimum weight of an active task."""
    subset_count: int | None = None
    """Default number of subsets drawn by the ensemble/surrogate policies."""
    subset_fraction: float | None = None
    """Default q: a subset has ceil(q·n) tasks."""
    prior_weight: float | None = None
    """Default weight of a pending task, relative to the mean task weight."""
    smoothing: float | None = None
    """Default β: share of the previous anchor's mixture kept in a new anchor's."""

    def __post_init__(self) -> None:
        if not self.store:
            raise ConfigError("store must name a path or URL")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ConfigError(f"{name} must be in 0..65535, got {value}")
        if self.debounce_seconds < 0:
            raise ConfigError(f"debounce_seconds must be >= 0, got {self.debounce_seconds}")
        if self.weight_tolerance < 0:
            raise ConfigError(f"weight_tolerance must be >= 0, got {self.weight_tolerance}")
        if self.estimation_workers < 1:
            raise ConfigError(f"estimation_workers must be >= 1, got {self.estimation_workers}")
        if self.grace_seconds < 0:
            raise ConfigError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.policy not in POLICY_NAMES:
            raise ConfigError(f"policy must be one of {POLICY_NAMES}, got {self.policy!r}")
        # Jobs take these defaults: refuse at start-up what every CreateJob would refuse.
        try:
            PolicyConfig(**self.policy_defaults())
        except InvalidArgumentError as exc:
            raise ConfigError(f"default policy settings: {exc}") from exc

    def policy_defaults(self) -> dict[str, Any]:
        """The policy settings this server fills in, without the unset (None) ones."""
        names = ("regularization", "temperature", "floor", "subset_count",
                 "subset_fraction", "prior_weight", "smoothing")
        values = {name: getattr(self, name) for name in names}
        return {"policy": self.policy} | {k: v for k, v in values.items() if v is not None}


def _field_types() -> dict[str, type]:
    """Each config field's scalar type (Optional unwrapped)."""
    hints = typing.get_type_hints(ServerConfig)
    types_: dict[str, type] = {}
    for field in dataclasses.fields(ServerConfig):
        hint = hints[field.name]
        if isinstance(hint, types.UnionType):
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        types_[field.name] = hint
    return types_


def _coerce(name: str, value: Any, kind: type, origin: str) -> Any:
    """Convert `value` (a TOML value or a string) to the field's type."""
    try:
        if kind is bool and isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        if kind is float and isinstance(value, int | float | str) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int | str) and not isinstance(value, bool):
            return int(value)
        if kind is str and isinstance(value, str):
            return value
    except ValueError:
        pass
    raise ConfigError(f"{origin}: {name} must be {kind.__name__}, got {value!r}")


def _from_toml(path: str, kinds: Mapping[str, type]) -> dict[str, Any]:
    """Read a TOML file; keys are field names (a `[policy]` table is accepted too)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    flat = dict(data)
    policy = flat.pop("policy", None)
    if isinstance(policy, dict):
        table = dict(policy)
        if "name" in table:
            table["policy"] = table.pop("name")
        flat.update(table)
    elif policy is not None:
        flat["policy"] = policy
    unknown = sorted(set(flat) - set(kinds))
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {unknown}; known: {sorted(kinds)}")
    return {k: _coerce(k, v, kinds[k], path) for k, v in flat.items()}


def _from_env(env: Mapping[str, str], kinds: Mapping[str, type]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, kind in kinds.items():
        key = ENV_PREFIX + name.upper()
        if key in env and env[key] != "":
            values[name] = _coerce(name, env[key], kind, key)
    return values


def _parser(kinds: Mapping[str, type]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradmix-server",
        description="gradmix selection server (gRPC API v1, Prometheus metrics).")
    parser.add_argument("--config", help="TOML file of settings (field names as keys)")
    for name in kinds:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                            metavar=name.upper())
    return parser


def load_config(argv: Sequence[str] | None = None,
                env: Mapping[str, str] | None = None) -> ServerConfig:
    """Build the server config: defaults < TOML (`--config`) < GRADMIX_* env < flags.

    Args:
        argv: command-line arguments without the program name (None: none).
        env: the environment (None: `os.environ`).

    Raises:
        ConfigError: a value of the wrong type, an unknown TOML key, or a value
            the config refuses.
    """
    kinds = _field_types()
    env = os.environ if env is None else env
    args = _parser(kinds).parse_args(list(argv) if argv is not None else [])
    config_file = args.config or env.get(ENV_PREFIX + "CONFIG") or None
    values: dict[str, Any] = {}
    if config_file:
        values.update(_from_toml(config_file, kinds))
    values.update(_from_env(env, kinds))
    for name, kind in kinds.items():
        raw = getattr(args, name)
        if raw is not None:
            values[name] = _coerce(name, raw, kind, "--" + name.replace("_", "-"))
    return ServerConfig(**values)
