"""Rank 0's Prometheus metrics, read off the run log and scraped over real HTTP.

A real `RunLog` in a temp dir writes the events the training loop writes;
`serve_metrics` follows it and serves /metrics on a loopback port, which the
test scrapes and parses as Prometheus would.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradmix.trainer.config import DataConfig, ModelConfig, TrainConfig
from gradmix.trainer.errors import ConfigError
from gradmix.trainer.metrics import TrainerMetrics, TrainerMetricsServer, serve_metrics
from gradmix.trainer.runlog import RunLog, read_log
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

JOB = "arith"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[RunLog, TrainerMetricsServer]]:
    log = RunLog(tmp_path, rank=0)
    server = serve_metrics(JOB, 0, log, host="127.0.0.1")
    yield log, server
    server.close()
    log.close()


def scrape(server: TrainerMetricsServer) -> tuple[str, dict[str, float]]:
    url = f"http://127.0.0.1:{server.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("gradmix_trainer_") and not sample.name.endswith("_created"):
                assert sample.labels == {"gradmix_job": JOB}, sample
                values[sample.name] = sample.value
    return text, values


def test_every_metric_moves_with_its_run_log_event(
        served: tuple[RunLog, TrainerMetricsServer]) -> None:
    log, server = served
    _, before = scrape(server)
    assert math.isnan(before["gradmix_trainer_target_loss"])
    assert before["gradmix_trainer_steps_total"] == 0
    assert before["gradmix_trainer_steps_per_second"] == 0
    assert before["gradmix_trainer_mixture_version"] == 0
    assert before["gradmix_trainer_server_reachable"] == 1
    assert before["gradmix_trainer_sketch_failures_total"] == 0

    log.event("eval", step=0, target_loss=2.5, examples=16)
    log.event("mixture", "mixture version 3 took effect at step 0", version=3, step=0,
              anchor="", weights={"add": 1.0})
    log.event("anchor", "declared anchor anchor-00000000 at step 0", anchor="anchor-00000000",
              step=0, horizon=None)
    log.event("sketch_failed", anchor="anchor-00000000", source="mul", error="boom")
    log.event("anchor_complete", "anchor anchor-00000000 complete", anchor="anchor-00000000")
    for step in range(5):
        log.event("step", step=step, task="add", loss=1.0, version=3)
    log.event("server", "server unreachable (x); retrying", reachable=False, step=5, error="x")
    text, after = scrape(server)

    events = {e["event"]: e for e in read_log(log.path)}  # the log says the same
    assert after["gradmix_trainer_target_loss"] == events["eval"]["target_loss"] == 2.5
    assert after["gradmix_trainer_mixture_version"] == events["mixture"]["version"] == 3
    assert after["gradmix_trainer_mixture_applied_step"] == 0
    assert after["gradmix_trainer_mixture_applied_timestamp_seconds"] == events["mixture"]["time"]
    sketch = events["anchor_complete"]["time"] - events["anchor"]["time"]
    assert after["gradmix_trainer_anchor_sketch_seconds"] == pytest.approx(sketch)
    assert after["gradmix_trainer_sketch_failures_total"] == 1
    assert after["gradmix_trainer_steps_total"] == 5
    assert after["gradmix_trainer_steps_per_second"] > 0
    assert after["gradmix_trainer_server_reachable"] == 0
    log.event("server", "server reachable again", reachable=True, step=6, error="")
    assert scrape(server)[1]["gradmix_trainer_server_reachable"] == 1

    promtool = shutil.which("promtool")
    if promtool:  # lint the exposition as Prometheus would
        result = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                                capture_output=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr


def test_steps_per_second_counts_the_trailing_window() -> None:
    now = [1000.0]
    metrics = TrainerMetrics(CollectorRegistry(), JOB, clock=lambda: now[0])
    for i in range(30):  # 30 steps, one every 2 s: 0.5 steps/s
        metrics.record({"event": "step", "time": 1000.0 + 2 * i})
    now[0] = 1060.0
    rate = metrics.registry.get_sample_value("gradmix_trainer_steps_per_second",
                                             {"gradmix_job": JOB})
    assert rate == pytest.approx(0.5, rel=0.05)
    now[0] = 1200.0  # no step for over a minute
    assert metrics.registry.get_sample_value("gradmix_trainer_steps_per_second",
                                             {"gradmix_job": JOB}) == 0


def test_an_anchor_declared_before_a_restart_has_no_duration() -> None:
    metrics = TrainerMetrics(CollectorRegistry(), JOB)
    metrics.record({"event": "anchor_complete", "time": 5.0, "anchor": "a"})
    assert metrics.registry.get_sample_value("gradmix_trainer_anchor_sketch_seconds",
                                             {"gradmix_job": JOB}) == 0


def test_metrics_port_is_checked() -> None:
    def config(port: int) -> TrainConfig:
        return TrainConfig(job=JOB, output_dir="out", metrics_port=port,
                           model=ModelConfig(config={"model_type": "gpt2"}),
                           data=DataConfig(target="t.jsonl"))

    assert config(9552).metrics_port == 9552
    with pytest.raises(ConfigError, match="metrics_port"):
        config(70000)
