"""The operator's `Fits` condition: `fit.estimate` against the GPU memory of the job's node pool,
decided before any GPU is requested (a warning: the estimate can be wrong, so the job still runs).

    Fits=True   FitsInGpuMemory    estimate ≤ the GPU's memory
    Fits=False  ExceedsGpuMemory   estimate > memory; the message says what to change (Warning Event)
    Fits=Unknown NotEstimated      a CPU job, an unknown model size or an unknown GPU type
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..api import Job
from ..sizing import fit
from .settings import OperatorSettings

CONDITION = "Fits"


@dataclass(frozen=True)
class FitVerdict:
    status: str
    reason: str
    message: str


def gpu_memory(job: Job, settings: OperatorSettings) -> tuple[int, str] | None:
    """The memory of one of the job's GPUs: its node pool preset's gpuMemory, else a known GPU
    type named by the pool or the job's nodeSelector."""
    pool = job.spec.resources.node_pool
    preset = settings.node_pools.get(pool) if pool else None
    if preset is not None and preset.gpu_memory is not None:
        return preset.gpu_memory_bytes() or 0, f"node pool {pool}: gpuMemory {preset.gpu_memory}"
    return fit.job_gpu_memory(job)


def verdict(job: Job, settings: OperatorSettings) -> FitVerdict:
    """The Fits condition for `job` (pure but for reading a local base model's config.json); an
    estimate that cannot be made is Unknown, never an error that would hold the job up."""
    try:
        return _verdict(job, settings)
    except Exception as exc:  # noqa: BLE001 — an estimate is advice: a bug in it must not block a valid job
        return FitVerdict("Unknown", "NotEstimated", f"the memory estimate failed: {exc}"[:1000])


def _verdict(job: Job, settings: OperatorSettings) -> FitVerdict:
    if job.spec.resources.gpus_per_worker == 0:
        return FitVerdict("Unknown", "NotEstimated", "a CPU job: no GPU memory to fit in")
    found = gpu_memory(job, settings)
    work_dir = settings.work_dir(settings.backend)
    config = fit.local_model_config(job, Path(work_dir)) if work_dir else None
    memory, source = found if found else (None, "")
    e = fit.estimate(job, memory, gpu_source=source, model_config=config)
    if e.params is None:
        return FitVerdict("Unknown", "NotEstimated", f"{e.model}: no estimate without the model's size")
    need = f"{e.total / 1e9:.1f} GB per GPU estimated ({e.params / 1e9:.2f}B parameters)"
    if e.fits is None:
        fix = "set gpuMemory on the node pool preset (Helm value nodePools.<pool>.gpuMemory)"
        return FitVerdict("Unknown", "NotEstimated", f"{need}; the GPU's memory is unknown: {fix}")
    limit = f"{(e.gpu_memory or 0) / 1e9:.1f} GB ({e.gpu_source})"
    if e.fits:
        return FitVerdict("True", "FitsInGpuMemory", f"{need}, within {limit}")
    advice = "; ".join(e.advice[:3])
    return FitVerdict(
        "False",
        "ExceedsGpuMemory",
        f"{need}, over {limit}: the job may fail OOMKilled; try: {advice} "
        "(`forgeline validate --fit` explains)",
    )
