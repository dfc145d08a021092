"""The collectives of a torchrun run, as one small object the loop calls (no-ops in one process).

Every method must be called by every rank at the same point: they are
collectives under DistributedDataParallel.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryocaps.runtime import Distributed

# Stop reasons by precedence: when ranks disagree, the highest code wins.
_STOP_CODES = {None: 0, "max_minutes": 1, "SIGTERM": 2, "SIGINT": 3}


@dataclass(frozen=True)
class Ranks:
    """This process among torchrun's processes, with the collectives training needs."""

    dist: Distributed

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def active(self) -> bool:
        return self.dist.active

    def share(self, items: list) -> list:
        """This rank's share of ``items`` (every world_size-th, from its rank)."""
        return items[self.rank :: self.world_size]

    def agree_on_stop(self, reason: str | None) -> str | None:
        """Every rank must stop at the same step: stop if any rank wants to (signals first)."""
        if not self.active:
            return reason
        import torch
        import torch.distributed as tdist

        flag = torch.tensor([_STOP_CODES.get(reason, 2)])
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return {v: k for k, v in _STOP_CODES.items()}[int(flag)]

    def mean(self, value: float) -> float:
        """``value`` averaged over the ranks."""
        if not self.active:
            return value
        import torch
        import torch.distributed as tdist

        tensor = torch.tensor([value], dtype=torch.float64)
        tdist.all_reduce(tensor)
        return float(tensor) / self.world_size

    def sum_(self, *tensors) -> None:
        """Add each (CPU) tensor over the ranks, in place."""
        if not self.active:
            return
        import torch.distributed as tdist

        for tensor in tensors:
            tdist.all_reduce(tensor)

    def gather(self, value) -> list:
        """Every rank's ``value`` (a picklable object), in rank order."""
        if not self.active:
            return [value]
        import torch.distributed as tdist

        values = [None] * self.world_size
        tdist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as tdist

            tdist.barrier()
