"""Operator configuration from environment variables (`FORGELINE_*`), with documented defaults."""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, SettingsConfigDict


class NodePool(BaseModel):
    """A node pool preset (Helm value `nodePools.<name>`): where a job's workers may run."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the workers must match."""
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    """Tolerations for the pool's taints."""
    gpu_memory: str | None = Field(default=None, pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")
    """Memory of one of the pool's GPUs as a Kubernetes quantity, e.g. 80Gi: what the Fits condition
    compares a job's estimated per-GPU memory against (unset: the GPU type named by the pool or the
    job's nodeSelector, when it is a known one)."""
    price_per_gpu_hour: float | None = Field(default=None, ge=0)
    """Price of one GPU-hour on this pool (status.cost; unset: FORGELINE_PRICE_PER_GPU_HOUR)."""

    def gpu_memory_bytes(self) -> int | None:
        return None if self.gpu_memory is None else memory_bytes(self.gpu_memory)


_MEMORY_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_MEMORY_UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def memory_bytes(quantity: str) -> int:
    """Bytes in a Kubernetes memory quantity: 80Gi, 81559Mi, 80G."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([KMGT]i?)?", quantity.strip())
    if match is None:
        raise ValueError(f"not a memory quantity: {quantity!r} (write e.g. 80Gi)")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2) or ""])


class OperatorSettings(BaseSettings):
    """Every setting is an environment variable: FORGELINE_<NAME> (e.g. FORGELINE_MAX_RUNNING_JOBS)."""

    model_config = SettingsConfigDict(env_prefix="FORGELINE_", extra="ignore")

    watch_namespaces: str = ""
    """Comma-separated namespaces to watch; empty watches the whole cluster."""
    default_trainer_image: str = "ghcr.io/forgeline/trainer:0.1.0-cuda12.8"
    """Trainer image for jobs that set no spec.resources.image."""
    mlflow_tracking_uri: str | None = None
    """The MLflow tracking server every job logs to unless its spec.mlflow says otherwise (unset: none)."""
    backend: Literal["kuberay", "local", "address"] = "kuberay"
    """kuberay: a RayCluster per job; local: an embedded Ray head in the operator (tests, demo,
    laptops); address: an existing Ray cluster at FORGELINE_RAY_ADDRESS. A job's spec.ray.address
    always wins."""
    ray_address: str | None = None
    """Ray Jobs API address for backend=address, e.g. http://ray-head.ray:8265."""
    ray_token: str | None = None
    """Ray auth token for backend=address clusters that require one."""
    max_running_jobs: int = Field(default=0, ge=0)
    """Jobs provisioning or running at once; the rest wait in Pending, first come first served. 0: no cap."""
    peering: str | None = None
    """kopf peering object name: replicas with the same name elect one active operator
    (a standby takes over). Unset: standalone."""
    metrics_port: int = 8080
    """Port of the Prometheus /metrics endpoint."""
    health_port: int = 8081
    """Port of the liveness/readiness endpoint (/healthz)."""
    reconcile_interval: float = Field(default=3.0, gt=0)
    """Seconds between reconciles of an active job (progress is refreshed at this pace)."""
    local_work_dir: str | None = None
    """backend=local: directory that relative paths in specs resolve against (default: cwd)."""
    local_num_cpus: int | None = None
    """backend=local: logical CPUs of the embedded Ray head (default: the machine's)."""
    cluster_ready_timeout: float = 900.0
    """Seconds a RayCluster may take to become ready before it is recreated."""
    cluster_lost_seconds: float = Field(default=60.0, gt=0)
    """Seconds a job's Ray head may not answer before the attempt counts as lost (reason
    ClusterLost: resubmitted from the newest checkpoint, counted against spec.backoffLimit)."""
    storage_prefixes: str = ""
    """Comma-separated locations jobs may write to (output, checkpoints), e.g.
    "s3://team-a/,/mnt/pvc/team-a": a job writing elsewhere fails with ValidationFailed naming the
    field. Empty: no restriction."""
    log_archive: str | None = None
    """Where each attempt's Ray job log is archived (a path or an s3:// / gs:// prefix; the job's
    logs go under <namespace>/<kind>/<name>/). Unset: next to the job's checkpoints where the
    operator can reach them (object stores; local paths for the local and address backends)."""
    log_archive_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    """The most of each attempt's log the archive keeps (its end)."""
    node_pools: dict[str, NodePool] = Field(default_factory=dict)
    """Node pool presets as JSON, e.g. {"h100": {"nodeSelector": {...}, "tolerations": [...]}};
    jobs pick one with spec.resources.nodePool."""
    price_per_gpu_hour: float | None = Field(default=None, ge=0)
    """Price of one GPU-hour (status.cost, the Cost column, forgeline_job_cost) where the job's
    node pool sets none. Unset: costs are shown in GPU-hours only."""
    currency: str = Field(default="$", max_length=8)
    """How costs are written, e.g. $, €, or USD."""
    allow_fault_injection: bool = False
    """Honour the test-only annotation forgeline.dev/fail-at-step (makes the trainer fail at that
    step). Off in production: only the test suite turns it on."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Operator log level."""

    def work_dir(self, backend: str) -> str | None:
        """What relative paths in specs resolve against: FORGELINE_LOCAL_WORK_DIR, or the
        operator's cwd for the local backend; None where the trainer's own cwd decides."""
        return self.local_work_dir or (os.getcwd() if backend == "local" else None)

    def price_for(self, pool: str | None) -> float | None:
        """The price of a GPU-hour for a job on `pool` (its preset's, else the operator's)."""
        preset = self.node_pools.get(pool) if pool else None
        if preset is not None and preset.price_per_gpu_hour is not None:
            return preset.price_per_gpu_hour
        return self.price_per_gpu_hour

    def allowed_storage(self) -> list[str]:
        return [p.strip() for p in self.storage_prefixes.split(",") if p.strip()]

    def namespaces(self) -> list[str]:
        return [n.strip() for n in self.watch_namespaces.split(",") if n.strip()]
