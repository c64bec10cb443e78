"""torch.distributed helpers: calibration statistics and EMA ranges reduced across ranks.

Every rank must end calibration with the same scales, equal to one process calibrating on the union of the ranks'
data. The rule that gives this for every calibrator: each batch's min/max is all-reduced *before* it is used (so
histogram ranges grow and EMA ranges move identically on every rank, as they would for the concatenated batch),
and histogram counts are summed at the end. All no-ops without an initialised process group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def reduce_minmax(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise min of ``lo`` and max of ``hi`` over all ranks (one collective)."""
    if world_size() == 1:
        return lo, hi
    both = torch.cat([-lo.reshape(-1).double(), hi.reshape(-1).double()])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    n = lo.numel()
    return (-both[:n]).reshape(lo.shape).to(lo.dtype), both[n:].reshape(hi.shape).to(hi.dtype)


def reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_have(flag: bool) -> bool:
    """True only if every rank passes True: ranks stop a data loop together (else collectives would hang)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
