"""The process group the trainer runs in: torchrun's N ranks or one plain process.

CPU runs use gloo (set DS_ACCELERATOR=cpu), CUDA runs nccl; the code is the
same. Object collectives (`broadcast`, `all_gather`) carry the small Python
values the ranks agree on: mixtures, sketch plans, status flags.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: talks to the server's watch, declares anchors, shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def all_mean(self, value: float) -> float:
        """Mean of a float over the ranks."""
        t = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.to(self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed() -> Dist:
    """Join the process group (creating a one-rank group for a plain process)."""
    import deepspeed

    if "RANK" not in os.environ:  # a plain `gradmix-train`: a group of one
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


#: Variables by which a user sets the CPU thread count themselves.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cap_cpu_threads(group: Dist, env: dict[str, str] | None = None) -> int | None:
    """On CPU, give each local rank its share of the cores (at least one thread), unless
    the user set a thread count: N ranks on C cores each using C threads oversubscribe
    the machine. Returns the thread count set (None: left alone)."""
    env = dict(os.environ) if env is None else env
    if group.device.type != "cpu" or any(env.get(v) for v in THREAD_VARIABLES):
        return None
    local_ranks = int(env.get("LOCAL_WORLD_SIZE") or env.get("WORLD_SIZE") or 1)
    threads = max(1, len(os.sched_getaffinity(0)) // max(local_ranks, 1))
    torch.set_num_threads(threads)
    return threads


def shutdown() -> None:
    """Barrier, then leave the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
