"""The running worker (`Worker`: its config, `RuntimeInfo`, precision) and small run-wide policies."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from forgeline_operator.api.jobconfig import FineTuneJobConfig, TrainingJobConfig, load_job_config

from . import preflight
from .runtime_info import RuntimeInfo

C = TypeVar("C", TrainingJobConfig, FineTuneJobConfig)


def train_device() -> Any:
    """The torch device of this worker (Ray Train's choice: its GPU, or the CPU)."""
    import ray.train.torch

    return ray.train.torch.get_device()


@dataclass(frozen=True)
class Worker(Generic[C]):
    """One Ray Train worker's run of a recipe: its job config, where it runs, its precision."""

    cfg: C
    rt: RuntimeInfo
    bf16: bool
    """Train in bf16 (autocast, or DeepSpeed's bf16)."""
    precision: str
    """The precision's name for records and metrics.json (bf16, fp32, ...)."""

    @classmethod
    def start(cls, loop_config: dict[str, Any], kind: type[C]) -> Worker[C]:
        """First thing in a `train_loop`: parse the job config, read rank and world, seed torch, run
        the preflight checks (preflight.py)."""
        import torch

        cfg = load_job_config(loop_config["config"])
        if not isinstance(cfg, kind):
            raise TypeError(f"{kind.__name__} expected, got {type(cfg).__name__}")
        rt = RuntimeInfo.current()
        torch.manual_seed(cfg.spec.training.seed)
        bf16, precision = resolve_precision(cfg.spec.training.precision, rt.on_gpu)
        preflight.run(cfg, rt)  # GPU, storage, data, collective: fail now, not an hour in
        return cls(cfg, rt, bf16, precision)


def resolve_precision(precision: str, on_gpu: bool) -> tuple[bool, str]:
    """(train in bf16?, name). auto = bf16 on GPUs, fp32 on CPU; fp16 is refused by the spec on CPU."""
    if precision == "auto":
        return (True, "bf16") if on_gpu else (False, "fp32")
    return precision == "bf16", precision


class InjectedFailure(RuntimeError):
    """Raised on purpose by tests (RunSettings.failAtStep) to exercise retries and resume."""


def fault_injection(cfg: Any, step: int) -> None:
    """Fail right after `failAtStep` (or hang after `hangAtStep`) on the first attempt. Put it on a
    checkpoint step: a retried worker (or a resubmitted job) resumes past it and succeeds."""
    if cfg.run.hang_at_step is not None and step == cfg.run.hang_at_step and cfg.run.attempt == 0:
        while True:  # a hung collective, as the watchdog sees it: alive, no further steps
            time.sleep(60)
    at = cfg.run.fail_at_step
    if at is not None and step == at and cfg.run.attempt == 0:
        import ray.train

        if ray.train.get_context().get_world_rank() == 0:
            raise InjectedFailure(f"injected failure after step {step} (runSettings.failAtStep)")
