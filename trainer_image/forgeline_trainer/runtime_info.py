"""Facts about the running Ray Train worker: its rank, the world size, its local rank, GPU or not.

Its own module so that `preflight` (which reads them) and `runtime` (which runs preflight at a
worker's start) do not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeInfo:
    rank: int
    world: int
    local_rank: int
    on_gpu: bool

    @classmethod
    def current(cls) -> RuntimeInfo:
        import ray.train
        import torch

        ctx = ray.train.get_context()
        return cls(
            rank=ctx.get_world_rank(),
            world=ctx.get_world_size(),
            local_rank=ctx.get_local_rank(),
            on_gpu=torch.cuda.is_available(),
        )
