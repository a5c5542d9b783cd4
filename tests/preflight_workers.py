"""A worker process for tests/test_trainer_units.py's two-process preflight test (kept apart so a
spawned child imports only this, not the test module's model libraries)."""

from __future__ import annotations

from typing import Any

from forgeline_trainer.runtime_info import RuntimeInfo


def collective_worker(rank: int, store: str, results: Any) -> None:
    """One of two real gloo processes: a passing all-reduce, one that carries rank 1's failed
    'data' check to both, and one rank 1 never joins (rank 0 must give up after the timeout)."""
    import os
    import time

    import torch.distributed as dist

    from forgeline_trainer import errors, preflight

    os.environ[preflight.TIMEOUT_ENV] = "1"
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    rt = RuntimeInfo(rank=rank, world=2, local_rank=rank, on_gpu=False)
    out: list[Any] = [preflight.check_collective(rt, None)]
    out.append(preflight.check_collective(rt, preflight.CHECKS.index("data") if rank == 1 else None))
    t0 = time.perf_counter()
    if rank == 0:
        try:
            preflight.check_collective(rt, None)
        except errors.PreflightFailed as exc:
            out.append((exc.check, exc.rank, exc.detail[:60], round(time.perf_counter() - t0, 1)))
    else:
        time.sleep(2)
    results.put((rank, out))
