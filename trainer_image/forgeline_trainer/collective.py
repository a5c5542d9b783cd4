"""Small cross-worker reductions the recipes share (no-ops outside torch.distributed)."""

from __future__ import annotations

from typing import Any


def _device() -> str:
    import torch

    dist = torch.distributed
    return "cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"


def mean(value: Any) -> float:
    """Mean of a scalar tensor over all workers."""
    import torch

    v = value.detach().float().clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(v)
        v /= torch.distributed.get_world_size()
    return float(v.item())


def total(value: Any) -> float:
    """Sum of a scalar tensor over all workers."""
    import torch

    v = value.detach().float().clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(v)
    return float(v.item())


def maximum(n: int) -> int:
    """Largest `n` any worker has (to keep every rank doing the same number of forwards)."""
    import torch

    t = torch.tensor([n], dtype=torch.long, device=_device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def as_float(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None
