"""The processes of one `torchrun ... -m mocoserve embed` run, agreeing on what to do.

The process group is for agreement only (a barrier, an error broadcast, the summaries):
no vector travels through it; each process writes its own shards. Without torchrun it is
a group of one, and torch is never imported (the serving path needs none).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Group:
    """rank, world size and local rank, with the few collectives embed needs."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _dist: Any = None

    @classmethod
    def from_env(cls) -> Group:
        """torchrun's group (gloo: CPU agreement, whatever the devices), else a group of one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=6))
        return cls(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist
        )

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self._dist is not None:
            self._dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """rank 0's value, on every rank."""
        if self._dist is None:
            return value
        box = [value]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value, in rank order, on every rank."""
        if self._dist is None:
            return [value]
        out: list[Any] = [None] * self.world
        self._dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self._dist is not None and self._dist.is_initialized():
            self._dist.destroy_process_group()
