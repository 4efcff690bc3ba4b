"""MixtureDataset through a real torch DataLoader with worker processes."""

from __future__ import annotations

import itertools

from gradmix.client.sampler import MixtureSampler
from gradmix.client.torch_data import MixtureDataset
from torch.utils.data import DataLoader, get_worker_info

TASKS = [f"t{i}" for i in range(8)]
WEIGHTS = dict.fromkeys(TASKS, 1.0)
STEPS = 600


def _tag_worker(task: str) -> tuple[int, str]:
    info = get_worker_info()
    return (-1 if info is None else info.id), task


def _by_worker(rank: int) -> dict[int, list[str]]:
    dataset = MixtureDataset(
        21, mixture=WEIGHTS, tasks=TASKS, transform=_tag_worker, steps=STEPS,
        rank=rank, world_size=2,
    )
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    out: dict[int, list[str]] = {0: [], 1: []}
    for worker, task in loader:
        out[int(worker)].append(task)
    return out


def test_dataloader_workers_and_ranks_get_distinct_reproducible_streams() -> None:
    streams = {}
    for rank in range(2):
        for worker, draws in _by_worker(rank).items():
            streams[rank, worker] = draws
    assert sorted(streams) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for (rank, worker), draws in streams.items():
        # Each worker's stream is exactly the sampler keyed by (seed, rank, worker).
        direct = MixtureSampler(21, rank=rank, world_size=2, worker=worker, num_workers=2)
        direct.update(WEIGHTS, at_step=0)
        assert draws == [direct.sample() for _ in range(STEPS)]
    for (ka, a), (kb, b) in itertools.combinations(streams.items(), 2):
        agree = sum(x == y for x, y in zip(a, b, strict=True)) / STEPS
        assert agree < 0.25, (ka, kb, agree)  # independent: 1/8 expected


def test_dataloader_switches_at_scheduled_step_in_every_worker() -> None:
    dataset = MixtureDataset(
        3, mixture={"t0": 1.0}, schedule=[(10, {"t1": 1.0})], transform=_tag_worker, steps=30
    )
    by_worker: dict[int, list[str]] = {0: [], 1: []}
    for worker, task in DataLoader(dataset, batch_size=None, num_workers=2):
        by_worker[int(worker)].append(task)
    for draws in by_worker.values():
        assert draws == ["t0"] * 10 + ["t1"] * 20
