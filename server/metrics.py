"""Prometheus metrics of the selection server and the /metrics HTTP endpoint.

Every metric is registered on an injected `CollectorRegistry` (tests build a
fresh one). The names are a contract: alerts and dashboards use them.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from gradmix.vocabulary import TARGET
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

#: The label the target's rows are counted under in `sketch_rows_committed`.
TARGET_LABEL = TARGET

_RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0)
_ESTIMATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                       30.0, 60.0)


class ServerMetrics:
    """The server's metrics, on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.sketch_rows_committed = Counter(
            "gradmix_sketch_rows_committed", "Sketch rows committed, per job and task "
            "(task=\"target\" for the target).", ["job", "task"], registry=registry)
        self.tasks = Gauge(
            "gradmix_tasks", "Registered tasks per job by state (pending|active).",
            ["job", "state"], registry=registry)
        self.estimation_duration = Histogram(
            "gradmix_estimation_duration_seconds", "Duration of one re-estimate of a job.",
            ["job"], buckets=_ESTIMATION_BUCKETS, registry=registry)
        self.estimation_failures = Counter(
            "gradmix_estimation_failures", "Re-estimates that raised.", ["job"],
            registry=registry)
        self.subsets_estimated = Counter(
            "gradmix_subsets_estimated", "Subsets whose loss was estimated "
            "(re-estimates, EstimateSubsets, SelectTasks).", ["job"], registry=registry)
        self.mixture_version = Gauge(
            "gradmix_mixture_version", "Latest published mixture version.", ["job"],
            registry=registry)
        self.mixture_weight = Gauge(
            "gradmix_mixture_weight", "Weight of each task in the latest mixture.",
            ["job", "task"], registry=registry)
        self.mixture_last_published = Gauge(
            "gradmix_mixture_last_published_timestamp_seconds",
            "Unix time the latest mixture version was created.", ["job"], registry=registry)
        self.regularization = Gauge(
            "gradmix_regularization", "λ the latest mixture version was estimated with: "
            "the prior λ₀ times the calibration factor.", ["job"], registry=registry)
        self.calibration_factor = Gauge(
            "gradmix_calibration_factor", "Correction c of the prior λ₀ learnt from the target "
            "loss changes the run realised (λ = λ₀·c).", ["job"], registry=registry)
        self.calibration_ratio = Gauge(
            "gradmix_calibration_ratio", "Realized / predicted target loss change over the "
            "last anchor interval observed.", ["job"], registry=registry)
        self.calibration_observations = Gauge(
            "gradmix_calibration_observations", "Anchor intervals that corrected the "
            "calibration factor.", ["job"], registry=registry)
        self.watchers = Gauge(
            "gradmix_watchers", "Open WatchMixture streams.", ["job"], registry=registry)
        self.commit_to_publish = Histogram(
            "gradmix_commit_to_publish_seconds",
            "From the first sketch commit of a burst to the mixture version it produced.",
            ["job"], buckets=_ESTIMATION_BUCKETS, registry=registry)
        self.rpc_requests = Counter(
            "gradmix_rpc_requests", "RPCs handled, by method and status code.",
            ["method", "code"], registry=registry)
        self.rpc_duration = Histogram(
            "gradmix_rpc_duration_seconds", "RPC handling time (streams: their lifetime).",
            ["method"], buckets=_RPC_BUCKETS, registry=registry)
        self.mixture_pinned = Gauge(
            "gradmix_mixture_pinned", "1 while the job's mixture is pinned by an operator "
            "(PinMixture), else 0.", ["job"], registry=registry)
        self._weight_tasks: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def set_mixture(self, job: str, version: int, created_at: float,
                    weights: Mapping[str, float]) -> None:
        """Record a published version: its number, time and per-task weights."""
        self.mixture_version.labels(job).set(version)
        self.mixture_last_published.labels(job).set(created_at)
        with self._lock:
            gone = self._weight_tasks.get(job, set()) - set(weights)
            self._weight_tasks[job] = set(weights)
        for task in gone:
            self.mixture_weight.remove(job, task)
        for task, weight in weights.items():
            self.mixture_weight.labels(job, task).set(weight)

    def set_calibration(self, job: str, *, regularization: float, factor: float,
                        observations: int, ratio: float | None) -> None:
        """Record a published version's λ and calibration (`ratio` None: none observed
        at its anchor, the last observed value stays)."""
        self.regularization.labels(job).set(regularization)
        self.calibration_factor.labels(job).set(factor)
        self.calibration_observations.labels(job).set(observations)
        if ratio is not None:
            self.calibration_ratio.labels(job).set(ratio)

    def remove_job(self, job: str) -> None:
        """Drop every series of `job` (it was deleted or archived)."""
        with self._lock:
            self._weight_tasks.pop(job, None)
        for metric in vars(self).values():
            if isinstance(metric, Counter | Gauge | Histogram) and "job" in metric._labelnames:
                for labels in _job_series(metric, job):
                    metric.remove(*labels)

    def set_task_counts(self, job: str, pending: int, active: int) -> None:
        self.tasks.labels(job, "pending").set(pending)
        self.tasks.labels(job, "active").set(active)


def _job_series(metric: Counter | Gauge | Histogram, job: str) -> set[tuple[str, ...]]:
    """The label values of `metric`'s children that belong to `job`."""
    names = metric._labelnames
    found = set()
    for family in metric.collect():
        for sample in family.samples:
            if sample.labels.get("job") == job:
                found.add(tuple(sample.labels[name] for name in names))
    return found


class MetricsEndpoint:
    """The /metrics HTTP server (prometheus_client's, in a daemon thread)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        server, thread = start_http_server(port, addr=host, registry=registry)
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
