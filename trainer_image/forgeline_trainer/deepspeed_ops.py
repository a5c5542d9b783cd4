"""DeepSpeed's JIT-built ops (CPU Adam, the shared-memory collective), built one process at a time.

torch guards an extension build with a bare lock file (`FileBaton`): a build killed half-way (a
stopped job, a preempted pod, a timed-out test) leaves the file behind, and every later job on that
node waits on it for ever at `deepspeed.initialize`, with no log line. Forgeline builds the ops a
job will load before DeepSpeed does, under an `flock` that the kernel drops the moment its holder
dies; holding it, any torch lock file left in the op's build directory can only be a dead build's,
so it is removed (and said so) instead of waited on. DeepSpeed's own load inside `initialize` then
finds the op built and up to date.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def prepare(ds_config: dict[str, Any]) -> list[str]:
    """Build or load the ops `ds_config` will need on this node; the stale build locks removed."""
    from deepspeed.accelerator import get_accelerator

    names = ["ShareMemCommBuilder"]
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if offload.get("device") in ("cpu", "nvme"):
        names.append("CPUAdamBuilder")
    removed: list[str] = []
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            continue
        build_dir = _build_dir(builder.name)
        with _exclusive(build_dir):
            stale = build_dir / "lock"
            if stale.exists():
                stale.unlink()
                removed.append(str(stale))
            builder.load(verbose=False)
    return removed


def _build_dir(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


@contextmanager
def _exclusive(build_dir: Path) -> Iterator[None]:
    build_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(build_dir / "forgeline.flock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
