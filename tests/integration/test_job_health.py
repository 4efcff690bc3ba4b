"""What a mixture version says about the job's health, on a live server (real gRPC on
loopback, the real client and CLI, a real store):

- pending is not forever: a task pending anchor after anchor (or for too long)
  gets a halving weight, is flagged stale in the version, the metrics and the log;
- a re-estimate the sanity check holds back publishes a version that says so
  (held, why, what it predicted), kept in the store's history;
- an anchor taken on an untrained model (its target loss near the untrained level
  the trainer declares) is held back: a real tiny GPT-2 before and after training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from client_support import Planted, create_job, wait_for
from gradmix.client import SelectionClient
from gradmix.client.errors import NotFound
from gradmix.client.types import Mixture
from gradmix.store import MixtureRecord
from server_support import Harness, start

GRADMIX = str(Path(sys.executable).parent / "gradmix")


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., tuple[Harness, SelectionClient]]]:
    """Start a server with config overrides, and a client of it (closed after the test)."""
    opened: list[tuple[Harness, SelectionClient]] = []

    def starter(**overrides: object) -> tuple[Harness, SelectionClient]:
        h = start(tmp_path / "store", **overrides)
        client = SelectionClient(f"127.0.0.1:{h.server.port}", timeout=10.0)
        opened.append((h, client))
        return h, client

    yield starter
    for h, client in opened:
        client.close()
        h.close()


def latest(client: SelectionClient, accept: Callable[[Mixture], bool], what: str) -> Mixture:
    """The latest version once it `accept`s (waits for it, and for a first version)."""

    def probe() -> Mixture | None:
        try:
            mixture = client.get_mixture("job")
        except NotFound:  # no version yet
            return None
        return mixture if accept(mixture) else None

    return wait_for(probe, what)


def sketch_anchor(client: SelectionClient, planted: Planted, anchor: str, step: int,
                  tasks: tuple[str, ...] = ("help", "harm"), untrained_loss: float = 0.0,
                  target_values: np.ndarray | None = None) -> None:
    client.declare_anchor("job", anchor, step, untrained_loss=untrained_loss)
    grads, values, ids = planted.rows("target", 64)
    if target_values is not None:
        values = target_values
    client.upload_sketch("job", anchor, None, "w0", grads, values, ids)
    for task in tasks:
        kind = "helpful" if task != "harm" else "harmful"
        client.upload_sketch("job", anchor, task, "w0", *planted.rows(kind))
    client.complete_anchor("job", anchor)


def sample(h: Harness, name: str) -> float | None:
    return h.registry.get_sample_value(name, {"gradmix_job": "job"})


def test_a_task_pending_anchor_after_anchor_decays_and_is_flagged(
        make: Callable[..., tuple[Harness, SelectionClient]],
        caplog: pytest.LogCaptureFixture) -> None:
    h, client = make(stale_pending_anchors=1)
    create_job(client)
    client.register_task("job", "ghost", {"uri": "s3://typo"})  # nobody will ever sketch it
    for task in ("help", "harm"):
        client.register_task("job", task)
    planted = Planted()
    seen = []
    with caplog.at_level(logging.INFO, logger="gradmix.server.jobstate"):
        for number in range(3):
            anchor = f"a{number}"
            sketch_anchor(client, planted, anchor, 100 * (number + 1))
            seen.append(latest(client, lambda m, a=anchor: m.anchor == a
                               and m.states["help"] == m.states["harm"] == "active",
                               f"the version at {anchor}"))
    # Active weights sum to 1, the pending task gets prior_weight / 2 = 0.5 before
    # renormalising: 1/3. Pending past 1 anchor, it halves per further anchor.
    fresh, once, twice = seen
    assert fresh.weights["ghost"] == pytest.approx(1 / 3)
    assert (fresh.stale_tasks, fresh.pending_anchors) == ((), {"ghost": 1})
    assert once.weights["ghost"] == pytest.approx(0.25 / 1.25)
    assert (once.stale_tasks, once.pending_anchors) == (("ghost",), {"ghost": 2})
    assert twice.weights["ghost"] == pytest.approx(0.125 / 1.125)
    assert twice.pending_anchors == {"ghost": 3}
    assert sum(twice.weights.values()) == pytest.approx(1.0)
    assert twice.weights["help"] > twice.weights["harm"]
    record = h.store.read_mixtures("job", twice.version - 1)[0]
    assert (record.stale, record.pending_anchors) == (("ghost",), {"ghost": 3})
    assert sample(h, "gradmix_stale_pending_tasks") == 1
    # The pending age counts from the first anchor it missed, not the current one.
    first = client.list_anchors("job")[0]
    assert sample(h, "gradmix_oldest_pending_task_age_seconds") >= (  # type: ignore[operator]
        twice.created_at - first.declared_at)
    stale_lines = [r.getMessage() for r in caplog.records if "is stale" in r.getMessage()]
    assert len(stale_lines) == 1 and "task 'ghost' is stale: pending at 2 complete anchor(s)" \
        in stale_lines[0]

    # Sketched at last, it is active and no longer stale.
    client.upload_sketch("job", "a2", "ghost", "w0", *planted.rows("helpful"))
    back = latest(client, lambda m: m.states["ghost"] == "active", "ghost active")
    assert back.stale_tasks == () and back.pending_anchors == {}
    wait_for(lambda: sample(h, "gradmix_stale_pending_tasks") == 0 or None, "the gauge at 0")


def test_a_task_pending_too_long_decays_with_no_new_input(
        make: Callable[..., tuple[Harness, SelectionClient]]) -> None:
    _, client = make(stale_pending_anchors=0, stale_pending_seconds=1.0)
    create_job(client)
    for task in ("help", "harm"):
        client.register_task("job", task)
    sketch_anchor(client, Planted(), "a0", 100)
    client.register_task("job", "ghost")
    stale = latest(client, lambda m: "ghost" in m.stale_tasks, "ghost stale by time")
    assert stale.weights["ghost"] < 1 / 3
    # No commit, no anchor: the server re-estimates when the next period ends.
    later = latest(client, lambda m: m.weights["ghost"] < stale.weights["ghost"] / 1.9,
                   "ghost halved again")
    assert later.version > stale.version and later.anchor == "a0"
    assert later.weights["help"] > later.weights["ghost"] > 0


def run_cli(h: Harness, *args: str) -> str:
    env = {**os.environ, "GRADMIX_SERVER": f"127.0.0.1:{h.server.port}"}
    done = subprocess.run([GRADMIX, *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_held_version_says_so_in_the_store_the_client_and_the_cli(
        make: Callable[..., tuple[Harness, SelectionClient]]) -> None:
    h, client = make()
    create_job(client)
    for task in ("help", "harm"):
        client.register_task("job", task)
    uniform = latest(client, lambda m: len(m.pending_tasks) == 2, "the uniform mixture")
    planted = Planted()
    # The planted target's loss is ≈ softplus(0) = 0.69; declared untrained level 0.75:
    # the anchor's model has not learnt (0.69 ≥ 0.9 × 0.75).
    sketch_anchor(client, planted, "a0", 0, untrained_loss=0.75)
    held = latest(client, lambda m: m.anchor == "a0", "the version at a0")
    assert (held.held, held.held_reason) == (True, "untrained")
    assert held.weights == uniform.weights  # the previous weights stay in force
    assert held.held_estimated_loss > 0 and held.held_estimated_loss != held.estimated_loss
    assert client.list_anchors("job")[0].untrained_loss == 0.75
    (record,) = [r for r in h.store.read_mixtures("job") if r.version == held.version]
    assert (record.held, record.held_reason) == (True, "untrained")
    assert MixtureRecord.from_dict(record.to_dict()) == record
    assert h.registry.get_sample_value("gradmix_implausible_estimates_total",
                                       {"gradmix_job": "job", "reason": "untrained"}) >= 1

    text = run_cli(h, "mixture", "job")
    assert "HELD (untrained): the estimate predicted" in text
    history = run_cli(h, "history", "job").splitlines()
    assert "FLAGS" in history[0]
    assert "held:untrained" in history[held.version]  # the header, then one line per version
    assert json.loads(run_cli(h, "mixture", "job", "--json"))["held_reason"] == "untrained"

    # The next anchor, of a model that has learnt: estimated and published.
    sketch_anchor(client, planted, "a1", 100, untrained_loss=3.0)
    fresh = latest(client, lambda m: m.anchor == "a1", "the version at a1")
    assert (fresh.held, fresh.held_reason, fresh.held_estimated_loss) == (False, "", 0.0)
    assert fresh.weights["help"] > fresh.weights["harm"]
    assert "HELD" not in run_cli(h, "mixture", "job")


def _arithmetic_model(vocab: int) -> tuple[object, object]:
    """A tiny GPT-2 and counting sequences (token t+1 follows t, mod vocab)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, bos_token_id=0, eos_token_id=0,
                                       n_embd=32, n_layer=1, n_head=2, n_positions=16,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    starts = torch.arange(64) % vocab
    ids = (starts[:, None] + torch.arange(12)[None, :]) % vocab
    return model, ids


def _target_values(model: object, ids: object) -> np.ndarray:
    import torch
    from gradmix.trainer.values import geometric_log_odds_values

    with torch.no_grad():
        logits = model(ids).logits  # type: ignore[operator]
    mask = torch.ones_like(ids, dtype=torch.bool)  # type: ignore[arg-type]
    values = geometric_log_odds_values(logits, ids, mask)  # type: ignore[arg-type]
    return values.double().numpy()


def test_an_untrained_model_s_anchor_is_held_and_a_trained_one_s_is_not(
        make: Callable[..., tuple[Harness, SelectionClient]]) -> None:
    import torch
    from gradmix.trainer.values import untrained_loss

    vocab = 32
    model, ids = _arithmetic_model(vocab)
    level = untrained_loss(model)  # type: ignore[arg-type]
    assert level == pytest.approx(math.log(vocab))
    before = _target_values(model, ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # type: ignore[attr-defined]
    for _ in range(60):
        loss = model(ids, labels=ids).loss  # type: ignore[operator]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _target_values(model, ids)
    untrained, trained = (float(np.logaddexp(0, -v).mean()) for v in (before, after))
    assert untrained >= 0.9 * level > trained  # what the server will see as L̂(∅)

    # The ratio bound off: only the untrained check can hold an anchor here.
    _, client = make(max_estimated_loss_ratio=0.0)
    create_job(client)
    for task in ("help", "harm"):
        client.register_task("job", task)
    planted = Planted()
    sketch_anchor(client, planted, "a0", 0, untrained_loss=level, target_values=before)
    held = latest(client, lambda m: m.anchor == "a0", "the version at step 0")
    assert (held.held, held.held_reason) == (True, "untrained")
    assert held.anchor_loss == pytest.approx(untrained, rel=1e-3)
    sketch_anchor(client, planted, "a1", 60, untrained_loss=level, target_values=after)
    published = latest(client, lambda m: m.anchor == "a1", "the version at step 60")
    assert not published.held and published.anchor_loss == pytest.approx(trained, rel=1e-3)
