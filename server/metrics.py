"""Prometheus metrics of the selection server and the /metrics HTTP endpoint.

Every metric is registered on an injected `CollectorRegistry` (tests build a
fresh one). The names are a contract: alerts and dashboards use them.

Per-job series carry the gradmix job as label `gradmix_job` (not `job`, which
Prometheus sets to the scrape job: a scrape keeps both without
`honor_labels`). A job's counters and histograms exist from the moment this
server first sees the job (`add_job`), so they read 0 rather than "no data";
`remove_job` drops every series of a job. Ages (of the oldest open anchor,
the oldest pending task, the last estimate) are computed when scraped.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from wsgiref.simple_server import WSGIServer

from gradmix.server.certificates import RELOAD_CHECK_SECONDS, CertificateFiles
from gradmix.server.sanity import REASONS
from gradmix.vocabulary import TARGET
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

#: The label the target's rows are counted under in `sketch_rows_committed`.
TARGET_LABEL = TARGET
#: The label naming the gradmix job on every per-job series.
JOB_LABEL = "gradmix_job"
#: Why a re-estimate was held back (`implausible_estimates`' reason label).
IMPLAUSIBLE_REASONS = REASONS

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
            "(task=\"target\" for the target).", [JOB_LABEL, "task"], registry=registry)
        self.tasks = Gauge(
            "gradmix_tasks", "Registered tasks per job by state (pending|active).",
            [JOB_LABEL, "state"], registry=registry)
        self.estimation_duration = Histogram(
            "gradmix_estimation_duration_seconds", "Duration of one re-estimate of a job.",
            [JOB_LABEL], buckets=_ESTIMATION_BUCKETS, registry=registry)
        self.estimation_failures = Counter(
            "gradmix_estimation_failures", "Re-estimates that raised.", [JOB_LABEL],
            registry=registry)
        self.subsets_estimated = Counter(
            "gradmix_subsets_estimated", "Subsets whose loss was estimated "
            "(re-estimates, EstimateSubsets, SelectTasks).", [JOB_LABEL], registry=registry)
        self.mixture_version = Gauge(
            "gradmix_mixture_version", "Latest published mixture version.", [JOB_LABEL],
            registry=registry)
        self.mixture_weight = Gauge(
            "gradmix_mixture_weight", "Weight of each task in the latest mixture.",
            [JOB_LABEL, "task"], registry=registry)
        self.mixture_last_published = Gauge(
            "gradmix_mixture_last_published_timestamp_seconds",
            "Unix time the latest mixture version was created.", [JOB_LABEL], registry=registry)
        self.regularization = Gauge(
            "gradmix_regularization", "λ the latest mixture version was estimated with: "
            "the prior λ₀ times the calibration factor.", [JOB_LABEL], registry=registry)
        self.calibration_factor = Gauge(
            "gradmix_calibration_factor", "Correction c of the prior λ₀ learnt from the target "
            "loss changes the run realised (λ = λ₀·c).", [JOB_LABEL], registry=registry)
        self.calibration_ratio = Gauge(
            "gradmix_calibration_ratio", "Realized / predicted target loss change over the "
            "last anchor interval observed.", [JOB_LABEL], registry=registry)
        self.calibration_observations = Gauge(
            "gradmix_calibration_observations", "Anchor intervals that corrected the "
            "calibration factor.", [JOB_LABEL], registry=registry)
        self.watchers = Gauge(
            "gradmix_watchers", "Open WatchMixture streams.", [JOB_LABEL], registry=registry)
        self.commit_to_publish = Histogram(
            "gradmix_commit_to_publish_seconds",
            "From the first sketch commit of a burst to the mixture version it produced.",
            [JOB_LABEL], buckets=_ESTIMATION_BUCKETS, registry=registry)
        self.rpc_requests = Counter(
            "gradmix_rpc_requests", "RPCs handled, by method and status code.",
            ["method", "code"], registry=registry)
        self.rpc_duration = Histogram(
            "gradmix_rpc_duration_seconds", "RPC handling time (streams: their lifetime).",
            ["method"], buckets=_RPC_BUCKETS, registry=registry)
        self.anchor_loss = Gauge(
            "gradmix_anchor_loss", "L̂(∅), the target loss at the anchor of the latest "
            "mixture version.", [JOB_LABEL], registry=registry)
        self.estimated_loss = Gauge(
            "gradmix_estimated_loss", "L̂ of the latest mixture version's weights: the target "
            "loss it predicts.", [JOB_LABEL], registry=registry)
        self.anchors_open = Gauge(
            "gradmix_anchors_open", "Declared anchors not yet complete.", [JOB_LABEL],
            registry=registry)
        self.oldest_open_anchor_age = Gauge(
            "gradmix_oldest_open_anchor_age_seconds", "Seconds since the oldest open anchor "
            "was declared (0: none open).", [JOB_LABEL], registry=registry)
        self.oldest_pending_task_age = Gauge(
            "gradmix_oldest_pending_task_age_seconds", "Seconds the longest-pending task has "
            "waited for a sketch: since the first of the complete anchors in a row it missed "
            "was declared, or since it registered or the current anchor was declared, "
            "whichever is later (0: none pending).", [JOB_LABEL], registry=registry)
        self.stale_tasks = Gauge(
            "gradmix_stale_pending_tasks", "Pending tasks flagged stale (pending past the "
            "server's stale_pending_anchors or stale_pending_seconds): their weight decays.",
            [JOB_LABEL], registry=registry)
        self.last_estimate_age = Gauge(
            "gradmix_last_estimate_age_seconds", "Seconds since the last re-estimate of the "
            "job finished (failed ones do not count).", [JOB_LABEL], registry=registry)
        self.implausible_estimates = Counter(
            "gradmix_implausible_estimates", "Re-estimates found implausible, by reason "
            "(loss_change: L̂ too far from L̂(∅); untrained: L̂(∅) near the untrained level; "
            "non_finite); held back unless the job had "
            "no mixture yet.", [JOB_LABEL, "reason"],
            registry=registry)
        self.estimate_held = Gauge(
            "gradmix_estimate_held", "1 while the job's latest re-estimate is held back as "
            "implausible (the previous mixture stays in force), else 0.", [JOB_LABEL],
            registry=registry)
        self.store_writable = Gauge(
            "gradmix_store_writable", "1 while the sketch store takes writes; 0 from a refused "
            "write (read-only, full, unreachable) until one works again.", registry=registry)
        self.store_writable.set(1)
        self.store_write_failures = Counter(
            "gradmix_store_write_failures", "Writes the sketch store refused.", registry=registry)
        self.mixture_pinned = Gauge(
            "gradmix_mixture_pinned", "1 while the job's mixture is pinned by an operator "
            "(PinMixture), else 0.", [JOB_LABEL], registry=registry)
        self._weight_tasks: dict[str, set[str]] = {}
        self._jobs: dict[str, _JobTimes] = {}
        self._lock = threading.Lock()

    def add_job(self, job: str) -> None:
        """Create the job's series at their zero values (once per job)."""
        with self._lock:
            if job in self._jobs:
                return
            times = self._jobs[job] = _JobTimes()
        for counter in (self.estimation_failures, self.subsets_estimated):
            counter.labels(job)
        for reason in IMPLAUSIBLE_REASONS:
            self.implausible_estimates.labels(job, reason)
        self.estimation_duration.labels(job)
        self.commit_to_publish.labels(job)
        self.estimate_held.labels(job).set(0)
        self.anchors_open.labels(job).set(0)
        self.stale_tasks.labels(job).set(0)
        self.set_task_counts(job, 0, 0)
        self.oldest_open_anchor_age.labels(job).set_function(times.oldest_anchor_age)
        self.oldest_pending_task_age.labels(job).set_function(times.oldest_pending_age)
        self.last_estimate_age.labels(job).set_function(times.last_estimate_age)

    def remove_job(self, job: str) -> None:
        """Drop every series of `job` (it is no longer served)."""
        with self._lock:
            self._jobs.pop(job, None)
            self._weight_tasks.pop(job, None)
        for metric in self._per_job():
            for labels in _label_sets(metric, job):
                metric.remove(*labels)

    def _per_job(self) -> list[Counter | Gauge | Histogram]:
        return [m for m in vars(self).values() if isinstance(m, Counter | Gauge | Histogram)
                and JOB_LABEL in m._labelnames]

    def set_estimate(self, job: str, *, finished_at: float, open_anchors: Mapping[str, float],
                     pending_since: Mapping[str, float], implausible: str,
                     held: bool, stale: int = 0) -> None:
        """Record a finished re-estimate.

        Args:
            finished_at: Unix time it finished.
            open_anchors: declared time of each open anchor.
            pending_since: each pending task's time it started waiting.
            implausible: why its estimate was implausible ("" = it was not).
            held: whether it was held back (the previous mixture stays).
            stale: how many pending tasks are stale.
        """
        times = self._jobs.get(job)
        if times is not None:
            times.last_estimate = finished_at
            times.open_anchors = min(open_anchors.values(), default=None)
            times.pending = min(pending_since.values(), default=None)
        self.anchors_open.labels(job).set(len(open_anchors))
        self.estimate_held.labels(job).set(1 if held else 0)
        self.stale_tasks.labels(job).set(stale)
        if implausible:
            self.implausible_estimates.labels(job, implausible).inc()

    def set_mixture(self, job: str, version: int, created_at: float,
                    weights: Mapping[str, float], *, anchor_loss: float,
                    estimated_loss: float) -> None:
        """Record a published version: its number, time, per-task weights and losses."""
        self.mixture_version.labels(job).set(version)
        self.mixture_last_published.labels(job).set(created_at)
        self.anchor_loss.labels(job).set(anchor_loss)
        self.estimated_loss.labels(job).set(estimated_loss)
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

    def set_task_counts(self, job: str, pending: int, active: int) -> None:
        self.tasks.labels(job, "pending").set(pending)
        self.tasks.labels(job, "active").set(active)


class _JobTimes:
    """When a job's last estimate finished and its oldest waits began (None: none)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        #: From when the server took the job on, until its first estimate finishes.
        self.last_estimate: float | None = clock()
        self.open_anchors: float | None = None
        self.pending: float | None = None

    def _age(self, since: float | None) -> float:
        return max(0.0, self._clock() - since) if since is not None else 0.0

    def oldest_anchor_age(self) -> float:
        return self._age(self.open_anchors)

    def oldest_pending_age(self) -> float:
        return self._age(self.pending)

    def last_estimate_age(self) -> float:
        return self._age(self.last_estimate)


def _label_sets(metric: Counter | Gauge | Histogram, job: str) -> set[tuple[str, ...]]:
    """The label values of `metric`'s children that belong to `job`."""
    names = metric._labelnames
    found = set()
    for family in metric.collect():
        for sample in family.samples:
            if sample.labels.get(JOB_LABEL) == job:
                found.add(tuple(sample.labels[name] for name in names))
    return found


class MetricsEndpoint:
    """The /metrics HTTP server (prometheus_client's, in a daemon thread).

    With `certfile` and `keyfile` it serves HTTPS; with `client_cafile` too,
    scrapers must present a certificate that CA signed.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int, *,
                 certfile: str | None = None, keyfile: str | None = None,
                 client_cafile: str | None = None) -> None:
        server, thread = start_http_server(
            port, addr=host, registry=registry, certfile=certfile, keyfile=keyfile,
            client_cafile=client_cafile, client_auth_required=client_cafile is not None)
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.port: int = server.server_port
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None

    def watch_certificates(self, certificates: CertificateFiles) -> None:
        """Reload `certificates` into the HTTPS context when they change: new
        connections get the new certificate (checked every `RELOAD_CHECK_SECONDS`)."""
        context = self._server.socket.context  # type: ignore[attr-defined]  # an SSLSocket

        def watch() -> None:
            seen = certificates.generation
            while not self._closed.wait(RELOAD_CHECK_SECONDS):
                certificates.refresh()
                if certificates.generation == seen:
                    continue
                seen = certificates.generation
                try:
                    context.load_cert_chain(certificates.cert, certificates.key)
                    if certificates.client_ca:
                        context.load_verify_locations(cafile=certificates.client_ca)
                except (ssl.SSLError, OSError) as exc:
                    log.error("/metrics certificate not reloaded: %s", exc)

        self._watcher = threading.Thread(target=watch, name="gradmix-metrics-certificates",
                                         daemon=True)
        self._watcher.start()

    def close(self) -> None:
        self._closed.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5.0)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
