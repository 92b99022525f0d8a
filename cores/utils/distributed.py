"""torch.distributed for per-block jobs: each rank takes a disjoint share of the blocks.

Launched with ``torchrun`` (one node or many) the ranks share the dump dir and the param
dir; without it everything runs as rank 0 of 1. gloo on CPU, nccl on GPUs. Local jobs
started without a process group (``quantize.py --jobs``) share the blocks the same way.
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
    """One rank's place among ``world`` jobs.

    Attributes:
        rank: This job's index, ``0 <= rank < world``.
        world: How many jobs share the blocks.
        local_rank: The GPU index on this node that a CUDA job uses.
        grouped: The jobs form a torch.distributed process group (``torchrun``) and :meth:`barrier` waits on
            it; False: independent processes whose parent waits for them (``quantize.py --jobs``).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    grouped: bool = True

    def share(self, items: Sequence[int]) -> list[int]:
        """This rank's items: every ``world``-th one, starting at ``rank``."""
        return list(items[self.rank::self.world])

    def device(self, requested: str) -> str:
        """On CUDA each local rank gets its own GPU; other devices are used as given."""
        return f"cuda:{self.local_rank}" if self.world > 1 and requested.startswith("cuda") else requested

    def barrier(self) -> None:
        """Wait for every rank of the process group (nothing to wait on in one process or ungrouped jobs)."""
        if self.world > 1 and self.grouped:
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
