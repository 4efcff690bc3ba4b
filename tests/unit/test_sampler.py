"""MixtureSampler: frequencies, determinism, resume, stream independence, switches."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
from gradmix.client.errors import NoMixtureError, SamplerError, UnknownTaskError
from gradmix.client.sampler import MixtureSampler
from gradmix.client.types import Mixture
from scipy import stats

WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05}


def _mixture(version: int, weights: dict[str, float]) -> Mixture:
    return Mixture(
        job="j", version=version, anchor="a0", policy="ensemble", weights=weights,
        scores=dict.fromkeys(weights, 0.0), states=dict.fromkeys(weights, "active"),
        pending_tasks=(), created_at=0.0, anchor_loss=0.0, estimated_loss=0.0,
    )


def _draw(sampler: MixtureSampler, n: int) -> list[str]:
    return [sampler.sample() for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2, 12345, 2**40])
def test_frequencies_match_weights(seed: int) -> None:
    # Tolerance: a chi-square goodness-of-fit test at p > 1e-3 on 20,000 draws
    # (the draws are deterministic per seed, so this never flakes), plus a
    # per-task 5-sigma binomial bound.
    n = 20_000
    sampler = MixtureSampler(seed)
    sampler.update(WEIGHTS, at_step=0)
    counts = Counter(_draw(sampler, n))
    names = sorted(WEIGHTS)
    observed = [counts[t] for t in names]
    expected = [WEIGHTS[t] * n for t in names]
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    for t in names:
        p = WEIGHTS[t]
        assert abs(counts[t] - n * p) <= 5 * (n * p * (1 - p)) ** 0.5


def test_unnormalized_weights_are_normalized() -> None:
    sampler = MixtureSampler(3)
    sampler.update({"x": 3.0, "y": 1.0}, at_step=0)
    counts = Counter(_draw(sampler, 8000))
    assert abs(counts["x"] / 8000 - 0.75) < 5 * (0.75 * 0.25 / 8000) ** 0.5


def test_same_seed_and_schedule_give_same_draws() -> None:
    runs = []
    for _ in range(2):
        sampler = MixtureSampler(7, rank=1, world_size=2, worker=1, num_workers=3)
        sampler.update(_mixture(1, WEIGHTS), at_step=0)
        sampler.update(_mixture(2, {"a": 0.1, "b": 0.9}), at_step=500)
        runs.append(_draw(sampler, 3000))
    assert runs[0] == runs[1]
    other_seed = MixtureSampler(8, rank=1, world_size=2, worker=1, num_workers=3)
    other_seed.update(WEIGHTS, at_step=0)
    assert _draw(other_seed, 500) != runs[0][:500]


def test_resume_from_state_dict_continues_exact_sequence() -> None:
    def fresh() -> MixtureSampler:
        return MixtureSampler(11, rank=2, world_size=4, worker=1, num_workers=2, tasks="abcd")

    full = fresh()
    full.update(_mixture(1, WEIGHTS), at_step=0)
    full.update(_mixture(2, {"c": 1.0, "d": 1.0}), at_step=700)
    full.update(_mixture(3, {"a": 1.0, "d": 2.0}), at_step=2000)
    reference = _draw(full, 3000)

    first = fresh()
    first.update(_mixture(1, WEIGHTS), at_step=0)
    first.update(_mixture(2, {"c": 1.0, "d": 1.0}), at_step=700)
    first.update(_mixture(3, {"a": 1.0, "d": 2.0}), at_step=2000)
    head = _draw(first, 1500)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint

    resumed = fresh()
    resumed.load_state_dict(state)
    assert resumed.step == 1500 and resumed.version == 2
    assert head + _draw(resumed, 1500) == reference


def test_state_of_another_stream_is_refused() -> None:
    sampler = MixtureSampler(1, rank=0, world_size=2)
    sampler.update(WEIGHTS)
    other = MixtureSampler(1, rank=1, world_size=2)
    with pytest.raises(SamplerError, match="rank"):
        other.load_state_dict(sampler.state_dict())


def test_streams_of_ranks_and_workers_are_distinct_and_independent() -> None:
    # 4 ranks x 3 workers over 16 equally likely tasks: two independent
    # streams agree at a step with probability 1/16, at any relative shift.
    tasks = [f"t{i:02d}" for i in range(16)]
    n = 4000
    streams = {}
    for rank, worker in itertools.product(range(4), range(3)):
        sampler = MixtureSampler(5, rank=rank, world_size=4, worker=worker, num_workers=3)
        sampler.update(dict.fromkeys(tasks, 1.0), at_step=0)
        streams[rank, worker] = _draw(sampler, n)
    for (ka, a), (kb, b) in itertools.combinations(streams.items(), 2):
        for shift in (0, 1, 7, 100):
            agree = sum(x == y for x, y in zip(a[shift:], b, strict=False)) / (n - shift)
            # 1/16 = 0.0625; 0.1 is more than 9 standard deviations away.
            assert agree < 0.1, (ka, kb, shift, agree)


def test_switch_takes_effect_exactly_at_step() -> None:
    sampler = MixtureSampler(9)
    sampler.update(_mixture(1, {"a": 1.0}), at_step=0)
    sampler.update(_mixture(2, {"b": 1.0}), at_step=37)
    assert sampler.version == 1
    draws = _draw(sampler, 100)
    assert draws[:37] == ["a"] * 37 and draws[37:] == ["b"] * 63
    assert sampler.version == 2


def test_switch_does_not_perturb_the_stream() -> None:
    # Counter-based draws: after the switch the sequence is exactly what a
    # sampler that had the new mixture from the start draws at those steps.
    old, new = WEIGHTS, {"a": 0.2, "b": 0.2, "c": 0.6}
    only_old, only_new, switched = MixtureSampler(4), MixtureSampler(4), MixtureSampler(4)
    only_old.update(old, at_step=0)
    only_new.update(new, at_step=0)
    switched.update(old, at_step=0)
    switched.update(new, at_step=1234)
    expected = _draw(only_old, 3000)[:1234] + _draw(only_new, 3000)[1234:]
    assert _draw(switched, 3000) == expected


def test_zero_weight_task_is_never_drawn() -> None:
    sampler = MixtureSampler(2)
    sampler.update({"never": 0.0, "b": 1.0, "c": 1e-9, "d": 1.0}, at_step=0)
    counts = Counter(_draw(sampler, 20_000))
    assert counts["never"] == 0
    assert counts["b"] > 0 and counts["d"] > 0


def test_mixture_naming_unknown_task_is_an_error() -> None:
    sampler = MixtureSampler(0, tasks=["a", "b"])
    with pytest.raises(UnknownTaskError, match="zzz"):
        sampler.update({"a": 0.5, "zzz": 0.5})


def test_sample_index_follows_task_list() -> None:
    sampler = MixtureSampler(0, tasks=["b", "a", "c"])
    sampler.update({"c": 1.0})
    assert sampler.sample_index() == 2


def test_misuse_is_a_clear_error() -> None:
    sampler = MixtureSampler(0)
    with pytest.raises(NoMixtureError):
        sampler.sample()
    sampler.update({"a": 1.0}, at_step=5)
    with pytest.raises(NoMixtureError, match="step 0"):
        sampler.sample()
    with pytest.raises(SamplerError, match="step order"):
        sampler.update({"b": 1.0}, at_step=3)
    for bad in ({"a": -1.0}, {"a": float("nan")}, {"a": 0.0}, {}):
        with pytest.raises(SamplerError):
            sampler.update(bad, at_step=10)
    with pytest.raises(SamplerError, match="rank"):
        MixtureSampler(0, rank=2, world_size=2)
    with pytest.raises(SamplerError, match="seed"):
        MixtureSampler(-1)


def test_update_in_the_past_is_refused() -> None:
    sampler = MixtureSampler(0)
    sampler.update({"a": 1.0}, at_step=0)
    _draw(sampler, 10)
    with pytest.raises(SamplerError, match="already at step 10"):
        sampler.update({"b": 1.0}, at_step=9)
    sampler.update({"b": 1.0}, at_step=10)
    assert sampler.sample() == "b"


def test_older_mixture_version_is_refused() -> None:
    sampler = MixtureSampler(0)
    sampler.update(_mixture(5, {"a": 1.0}), at_step=0)
    with pytest.raises(SamplerError, match="older"):
        sampler.update(_mixture(4, {"b": 1.0}), at_step=3)
