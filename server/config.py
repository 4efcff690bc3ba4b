"""Configuration of the selection server, loaded from one place.

Precedence, lowest first: the defaults below < a TOML file (`--config`) <
`GRADMIX_*` environment variables (`GRADMIX_STORE`, `GRADMIX_PORT`, ... one
per field, upper-cased) < command-line flags (`--store`, `--port`, ... one per
field, dashes for underscores; bool fields are switches, `--insecure`).
In the TOML file, `[tls]` and `[auth]` tables hold the `tls_*` and `auth_*`
fields without their prefix (`[tls] cert = ...`).

The policy fields are the server's defaults for jobs whose `PolicySettings`
leave a field at zero; `None` means "the estimator's own default"
(`gradmix.server.policies.PolicyConfig`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import os
import textwrap
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradmix.server.errors import InvalidArgumentError
from gradmix.server.limits import Limits
from gradmix.server.staleness import StalePolicy
from gradmix.vocabulary import DEFAULT_POLICY, Policy, choices
from gradmix.vocabulary.policy_settings import DEFAULTABLE_FIELDS, PolicyConfig, PolicySettingsError

ENV_PREFIX = "GRADMIX_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LIMITS = Limits()
POLICY_NAMES = choices(Policy)


class ServerConfigError(InvalidArgumentError):
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
    max_pending_calls: int = 20_000
    """Most new calls gRPC holds while the server's event loop has not taken them up yet
    (a burst: every watcher reconnecting after a restart). Past it gRPC cancels new calls
    (CANCELLED) before the server sees them, so none is counted: keep it at least
    `max_watchers` (checked). gRPC's own default, 1000 to 3000 with calls dropped at
    random in between, cancelled watch streams from bursts of 1500 (README, "Scale")."""
    log_level: str = "INFO"
    """Python logging level name."""
    policy: str = DEFAULT_POLICY
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

    max_estimated_loss_ratio: float = 100.0
    """Largest factor between the loss a re-estimate predicts and the anchor's own loss
    (either way): beyond it the estimate is held back as implausible and the previous
    mixture stays in force (0: no bound). 100 lies between the drops good anchors of the
    demo predict and those of an anchor on an untrained model (README, "Sanity check",
    has both, measured)."""
    untrained_loss_fraction: float = 0.9
    """An anchor whose target loss is at least this fraction of the untrained level its
    trainer declared (log of the vocabulary size) is taken on an untrained model: its
    estimate is held back (0: no check; anchors declared without the level are not checked)."""
    stale_pending_anchors: int = 2
    """A task still pending at more complete anchors in a row than this is stale: its
    prior weight halves per further anchor (0: no anchor bound)."""
    stale_pending_seconds: float = 21600.0
    """A task pending this long is stale: its prior weight halves per such period
    waited (0: no time bound). Default 6 h; the GradmixTaskStuckPending alert fires at 2 h."""

    # [limits] (gradmix.server.limits.Limits; a `[limits]` TOML table is accepted too)
    max_value_abs: float = _LIMITS.max_value_abs
    """Largest |f(x)| of a sketch row."""
    max_row_norm: float = _LIMITS.max_row_norm
    """Largest norm of a sketch row's projected gradient."""
    max_dim: int = _LIMITS.max_dim
    """Largest projection dim of a job."""
    max_rows_per_upload: int = _LIMITS.max_rows_per_upload
    """Most rows one UploadSketch call may carry."""
    max_tasks_per_job: int = _LIMITS.max_tasks_per_job
    """Most tasks of one job."""
    max_jobs: int = _LIMITS.max_jobs
    """Most jobs of this server."""
    max_name_length: int = _LIMITS.max_name_length
    """Longest job, task, anchor or writer name (at most 128)."""
    max_metadata_entries: int = _LIMITS.max_metadata_entries
    """Most metadata entries of a task."""
    max_metadata_bytes: int = _LIMITS.max_metadata_bytes
    """Largest total size of a task's metadata."""
    max_target_bytes: int = _LIMITS.max_target_bytes
    """Longest target description of a job."""
    max_anchor_step_ahead: int = _LIMITS.max_anchor_step_ahead
    """How far past the job's greatest declared step a new anchor's step may be."""
    max_query_cost: int = _LIMITS.max_query_cost
    """Most subsets × tasks of one fast-mode query."""
    max_exact_query_cost: int = _LIMITS.max_exact_query_cost
    """Most subsets × tasks of one exact-mode query."""
    query_workers: int = _LIMITS.query_workers
    """Threads for EstimateSubsets / SelectTasks."""
    max_queued_queries: int = _LIMITS.max_queued_queries
    """Most queries waiting for a query thread."""
    query_timeout_seconds: float = _LIMITS.query_timeout_seconds
    """Longest a query may run."""
    default_page_size: int = _LIMITS.default_page_size
    """Page size of a List call that asks for 0."""
    max_page_size: int = _LIMITS.max_page_size
    """Largest page of a List call."""
    max_watchers: int = _LIMITS.max_watchers
    """Most WatchMixture streams open at once (all jobs); more get RESOURCE_EXHAUSTED."""

    # ---- [tls] and [auth]: who may connect and call (see gradmix.server.auth)
    insecure: bool = False
    """Serve plaintext gRPC (no TLS). Must be asked for; the start-up line says so."""
    tls_cert: str = ""
    """PEM certificate chain of the gRPC (and, with tls_metrics, /metrics) port."""
    tls_key: str = ""
    """PEM private key of `tls_cert`."""
    tls_client_ca: str = ""
    """PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)."""
    tls_metrics: bool = False
    """Serve /metrics over TLS with the same certificate (and client CA, if set)."""
    auth_tokens_file: str = ""
    """Token table file (sha256, role, jobs, name per line), re-read when it changes."""
    auth_tokens: str = ""
    """More token-table lines, e.g. from GRADMIX_AUTH_TOKENS (hashes, never tokens)."""
    health_port: int | None = None
    """A plaintext port serving only grpc.health.v1, for probes that cannot speak TLS
    (Kubernetes' gRPC probes); None: health is only on the main port."""

    def __post_init__(self) -> None:
        if not self.store:
            raise ServerConfigError("store must name a path or URL")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ServerConfigError(f"{name} must be in 0..65535, got {value}")
        if self.debounce_seconds < 0:
            raise ServerConfigError(f"debounce_seconds must be >= 0, got {self.debounce_seconds}")
        if self.weight_tolerance < 0:
            raise ServerConfigError(f"weight_tolerance must be >= 0, got {self.weight_tolerance}")
        if self.estimation_workers < 1:
            raise ServerConfigError(f"estimation_workers must be >= 1, "
                                    f"got {self.estimation_workers}")
        if self.grace_seconds < 0:
            raise ServerConfigError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if self.max_message_bytes < 1024:
            raise ServerConfigError(f"max_message_bytes must be >= 1024, "
                                    f"got {self.max_message_bytes}")
        if not self.max_watchers <= self.max_pending_calls < 2**31:
            raise ServerConfigError(
                f"max_pending_calls must be in max_watchers ({self.max_watchers})..2**31-1, "
                f"got {self.max_pending_calls}: below max_watchers, a burst of watchers the "
                "server would take is cancelled by gRPC before the server sees it")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ServerConfigError(f"log_level must be one of {LOG_LEVELS}, "
                                    f"got {self.log_level!r}")
        ratio = self.max_estimated_loss_ratio
        if not (ratio == 0 or 1 < ratio < float("inf")):
            raise ServerConfigError(f"max_estimated_loss_ratio must be 0 (no bound) or finite and "
                              f"> 1, got {ratio}")
        if not 0 <= self.untrained_loss_fraction <= 1:
            raise ServerConfigError(f"untrained_loss_fraction must be in [0, 1], got "
                              f"{self.untrained_loss_fraction}")
        if self.stale_pending_anchors < 0:
            raise ServerConfigError(f"stale_pending_anchors must be >= 0, got "
                              f"{self.stale_pending_anchors}")
        if not 0 <= self.stale_pending_seconds < float("inf"):
            raise ServerConfigError(f"stale_pending_seconds must be finite and >= 0, got "
                              f"{self.stale_pending_seconds}")
        if self.policy not in POLICY_NAMES:
            raise ServerConfigError(f"policy must be one of {POLICY_NAMES}, got {self.policy!r}")
        # Jobs take these defaults: refuse at start-up what every CreateJob would refuse.
        try:
            PolicyConfig(**self.policy_defaults())
        except PolicySettingsError as exc:
            raise ServerConfigError(f"default policy settings: {exc}") from exc
        try:
            self.limits()
        except InvalidArgumentError as exc:
            raise ServerConfigError(f"limits: {exc}") from exc
        self._check_access()

    def limits(self) -> Limits:
        """The `[limits]` block as the `Limits` the server checks requests against."""
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)})

    def stale_policy(self) -> StalePolicy:
        """When a pending task counts as stale (`gradmix.server.staleness`)."""
        return StalePolicy(anchors=self.stale_pending_anchors,
                           seconds=self.stale_pending_seconds)

    def _check_access(self) -> None:
        """TLS unless `insecure`; with TLS, tokens too. (The files are read at start-up.)"""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ServerConfigError("tls_cert and tls_key go together")
        if self.insecure and self.tls_cert:
            raise ServerConfigError("insecure and tls_cert exclude each other")
        if not self.insecure and not self.tls_cert:
            raise ServerConfigError("no TLS certificate: set tls_cert and tls_key "
                              "(or --insecure to serve plaintext)")
        if (self.tls_client_ca or self.tls_metrics) and not self.tls_cert:
            raise ServerConfigError("tls_client_ca and tls_metrics need tls_cert")
        if self.tls_cert and not (self.auth_tokens_file or self.auth_tokens):
            raise ServerConfigError("TLS without tokens: set auth_tokens_file or auth_tokens")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ServerConfigError(f"health_port must be in 0..65535, got {self.health_port}")

    def policy_defaults(self) -> dict[str, Any]:
        """The policy settings this server fills in, without the unset (None) ones."""
        values = {name: getattr(self, name) for name in DEFAULTABLE_FIELDS}
        return {k: v for k, v in values.items() if v is not None}


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
        if kind is bool and isinstance(value, bool):
            return value
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
    raise ServerConfigError(f"{origin}: {name} must be {kind.__name__}, got {value!r}")


def _from_toml(path: str, kinds: Mapping[str, type]) -> dict[str, Any]:
    """Read a TOML file; keys are field names (`[policy]` and `[limits]` tables too)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ServerConfigError(f"cannot read config file {path}: {exc}") from exc
    flat = dict(data)
    policy = flat.pop("policy", None)
    if isinstance(policy, dict):
        table = dict(policy)
        if "name" in table:
            table["policy"] = table.pop("name")
        flat.update(table)
    elif policy is not None:
        flat["policy"] = policy
    limits = flat.pop("limits", None)
    if isinstance(limits, dict):
        flat.update(limits)
    for table_name in ("tls", "auth"):  # [tls] cert = ... is tls_cert, [auth] tokens_file ...
        table = flat.pop(table_name, None)
        if table is not None and not isinstance(table, dict):
            raise ServerConfigError(f"{path}: [{table_name}] must be a table")
        flat.update({f"{table_name}_{k}": v for k, v in (table or {}).items()})
    if "tls_insecure" in flat:  # [tls] insecure = true
        flat["insecure"] = flat.pop("tls_insecure")
    unknown = sorted(set(flat) - set(kinds))
    if unknown:
        raise ServerConfigError(f"{path}: unknown setting(s) {unknown}; known: {sorted(kinds)}")
    return {k: _coerce(k, v, kinds[k], path) for k, v in flat.items()}


def _from_env(env: Mapping[str, str], kinds: Mapping[str, type]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, kind in kinds.items():
        key = ENV_PREFIX + name.upper()
        if key in env and env[key] != "":
            values[name] = _coerce(name, env[key], kind, key)
    return values


def field_docs() -> dict[str, str]:
    """Each setting's description: the docstring under its field in `ServerConfig`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(ServerConfig)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for field, doc in itertools.pairwise(body):
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)):
            docs[field.target.id] = " ".join(str(doc.value.value).split())
    return docs


def _parser(kinds: Mapping[str, type]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradmix-server",
        description="gradmix selection server (gRPC API v1, Prometheus metrics).",
        epilog="Each setting also reads from the TOML file (its name as key) and from "
               "GRADMIX_<NAME>; flags win.")
    parser.add_argument("--config", help="TOML file of settings (field names as keys)")
    docs = field_docs()
    for field in dataclasses.fields(ServerConfig):
        name, kind = field.name, kinds[field.name]
        flag = "--" + name.replace("_", "-")
        shown = "the estimator's own" if field.default is None else repr(field.default)
        text = f"{docs.get(name, '')} (default {shown}; env {ENV_PREFIX}{name.upper()})"
        text = text.replace("%", "%%")
        if kind is bool:  # a switch: --insecure, --tls-metrics
            parser.add_argument(flag, dest=name, action="store_const", const="true",
                                default=None, help=text)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=text)
    return parser


def load_config(argv: Sequence[str] | None = None,
                env: Mapping[str, str] | None = None) -> ServerConfig:
    """Build the server config: defaults < TOML (`--config`) < GRADMIX_* env < flags.

    Args:
        argv: command-line arguments without the program name (None: none).
        env: the environment (None: `os.environ`).

    Raises:
        ServerConfigError: a value of the wrong type, an unknown TOML key, or a value
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
