"""torch.distributed for per-block jobs: each rank takes a disjoint share of the blocks.

Launched with ``torchrun`` (one node or many) the ranks share the dump dir and the param
dir; without it everything runs as rank 0 of 1. gloo on CPU, nccl on GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def share(self, items: Sequence[int]) -> list[int]:
        """This rank's items: every ``world``-th one, starting at ``rank``."""
        return list(items[self.rank::self.world])

    def device(self, requested: str) -> str:
        """On CUDA each local rank gets its own GPU; other devices are used as given."""
        return f"cuda:{self.local_rank}" if self.world > 1 and requested.startswith("cuda") else requested

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


@contextmanager
def distributed() -> Iterator[Ranks]:
    """Join the process group when launched by ``torchrun``; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Ranks()
        return
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    finally:
        dist.destroy_process_group()
