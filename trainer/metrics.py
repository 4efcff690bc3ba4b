"""Prometheus metrics of a training run, served by rank 0 on an optional port.

The metrics are read off the run log: `TrainerMetrics.record` takes each
event rank 0 writes (`RunLog.subscribe`), so the per-rank JSON-lines log and
the metrics always say the same thing:

- `eval` -> `gradmix_trainer_target_loss`;
- `step` -> `gradmix_trainer_steps_total` and `gradmix_trainer_steps_per_second`
  (over the last `RATE_WINDOW_SECONDS`);
- `mixture` -> `gradmix_trainer_mixture_version`, and the step and Unix time
  it took effect at;
- `anchor` then `anchor_complete` -> `gradmix_trainer_anchor_sketch_seconds`,
  the time from declaring an anchor to completing it (sketching the target
  and every task there);
- `sketch_failed` -> `gradmix_trainer_sketch_failures_total`;
- `server` (with `reachable`) -> `gradmix_trainer_server_reachable`.

Every series carries the job as `gradmix_job`, as the server's do.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from gradmix.trainer.runlog import RunLog
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

#: Steps per second are counted over this many trailing seconds.
RATE_WINDOW_SECONDS = 60.0
#: At most this many step times are kept for the rate (a bound on memory).
_MAX_STEP_TIMES = 100_000


class TrainerMetrics:
    """A run's metrics on one registry, updated from its run-log events."""

    def __init__(self, registry: CollectorRegistry, job: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self._clock = clock
        self._steps: deque[float] = deque(maxlen=_MAX_STEP_TIMES)
        self._declared: dict[str, float] = {}
        self._lock = threading.Lock()

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, ["gradmix_job"], registry=registry).labels(job)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, ["gradmix_job"], registry=registry).labels(job)

        self.target_loss = gauge("gradmix_trainer_target_loss",
                                 "Completion loss on the target at the last evaluation.")
        self.steps = counter("gradmix_trainer_steps", "Optimizer steps taken.")
        self.steps_per_second = gauge(
            "gradmix_trainer_steps_per_second",
            f"Optimizer steps per second over the last {RATE_WINDOW_SECONDS:.0f} s.")
        self.mixture_version = gauge("gradmix_trainer_mixture_version",
                                     "Mixture version in effect (0: none from the server).")
        self.mixture_applied_step = gauge("gradmix_trainer_mixture_applied_step",
                                          "Step the mixture in effect took effect at.")
        self.mixture_applied = gauge("gradmix_trainer_mixture_applied_timestamp_seconds",
                                     "Unix time the mixture in effect took effect.")
        self.anchor_sketch_seconds = gauge(
            "gradmix_trainer_anchor_sketch_seconds",
            "Seconds from declaring the last completed anchor to completing it.")
        self.sketch_failures = counter("gradmix_trainer_sketch_failures",
                                       "Sources whose sketch at an anchor failed.")
        self.server_reachable = gauge("gradmix_trainer_server_reachable",
                                      "1 while the selection server is reachable, else 0.")
        self.target_loss.set(float("nan"))
        self.server_reachable.set(1)
        self.steps_per_second.set_function(self._rate)

    def record(self, event: Mapping[str, Any]) -> None:
        """Update the metrics from one run-log event (others are ignored)."""
        kind, at = event.get("event"), float(event.get("time", self._clock()))
        if kind == "step":
            self.steps.inc()
            with self._lock:
                self._steps.append(at)
        elif kind == "eval":
            self.target_loss.set(float(event["target_loss"]))
        elif kind == "mixture":
            self.mixture_version.set(int(event["version"]))
            self.mixture_applied_step.set(int(event["step"]))
            self.mixture_applied.set(at)
        elif kind == "anchor":
            self._declared[str(event["anchor"])] = at
        elif kind == "anchor_complete":
            declared = self._declared.pop(str(event["anchor"]), None)
            if declared is not None:  # declared before a restart: duration unknown
                self.anchor_sketch_seconds.set(at - declared)
        elif kind == "sketch_failed":
            self.sketch_failures.inc()
        elif kind == "server" and "reachable" in event:
            self.server_reachable.set(1 if event["reachable"] else 0)

    def _rate(self) -> float:
        now = self._clock()
        with self._lock:
            while self._steps and self._steps[0] < now - RATE_WINDOW_SECONDS:
                self._steps.popleft()
            if not self._steps:
                return 0.0
            span = min(RATE_WINDOW_SECONDS, max(now - self._steps[0], 1e-9))
            return len(self._steps) / span


class TrainerMetricsServer:
    """Rank 0's /metrics HTTP endpoint (prometheus_client's server, in a daemon thread)."""

    def __init__(self, metrics: TrainerMetrics, port: int, host: str = "0.0.0.0") -> None:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.metrics = metrics
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def serve_metrics(job: str, port: int, log: RunLog, *, host: str = "0.0.0.0",
                  registry: CollectorRegistry | None = None) -> TrainerMetricsServer:
    """Serve rank 0's metrics for `job` on `host:port` (0: a free port), following the
    events of `log` from now on; stop with close()."""
    metrics = TrainerMetrics(registry if registry is not None else CollectorRegistry(), job)
    log.subscribe(metrics.record)
    return TrainerMetricsServer(metrics, port, host)
