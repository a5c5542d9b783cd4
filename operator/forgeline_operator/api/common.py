"""Spec parts that TrainingJob and FineTuneJob share: resources, DeepSpeed, checkpoints, data."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from ._base import ApiModel, FieldIssue, HubId, K8sName, Quantity, StorageURI, sub
from .promotion import Promotion
from .quantities import CPU_FIX, cpu_problem

JobKind = Literal["TrainingJob", "FineTuneJob"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Schedule = Literal["cosine", "linear", "constant", "wsd"]
OptimizerName = Literal["adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "adafactor"]
PAGED_OPTIMIZERS = frozenset({"paged-adamw", "paged-adamw-8bit"})
"""bitsandbytes' paged optimizers: their state lives in CUDA unified memory, paged to CPU memory
when the GPU runs short (the QLoRA paper, sec. 3)."""
DataFormat = Literal["jsonl", "parquet", "text", "saved-dataset"]


class JobRef(ApiModel):
    """Another Forgeline job in the same namespace whose output this job uses."""

    kind: JobKind
    """Kind of the job: TrainingJob or FineTuneJob."""
    name: K8sName
    """Name of the job. This job waits (phase Waiting) until that one has Succeeded."""
    allow_unpromoted: bool = False
    """Use that job's output even when its spec.promotion gate did not promote it (condition Promoted False); by default this job then fails with reason UpstreamNotPromoted."""


class ModelSource(ApiModel):
    """Where a model comes from. Set exactly one of path, hubId, fromJob."""

    path: StorageURI | None = None
    """A `save_pretrained` directory: local path, pvc://claim/dir, s3://bucket/dir or gs://."""
    hub_id: HubId | None = None
    """A Hugging Face hub id (e.g. `meta-llama/Llama-3.1-8B`); the cluster needs a hub mirror or cache."""
    revision: str | None = Field(default=None, max_length=128)
    """Hub revision (branch, tag or commit) when hubId is set."""
    from_job: JobRef | None = None
    """Use the output of another Forgeline job (pipelines: pretrain → SFT → DPO)."""

    def location(self) -> str | None:
        """The path/URI, or `hf://<hub id>`; None for fromJob (the caller resolves that job's output)."""
        if self.from_job is not None:
            return None
        return self.path or f"hf://{self.hub_id}"

    def issues(self, prefix: tuple[str, ...]) -> list[FieldIssue]:
        chosen = [
            n
            for n, v in (("path", self.path), ("hubId", self.hub_id), ("fromJob", self.from_job))
            if v is not None
        ]
        out: list[FieldIssue] = []
        if len(chosen) != 1:
            out.append(
                FieldIssue(
                    prefix,
                    f"set exactly one of path, hubId, fromJob (got {', '.join(chosen) or 'none'})",
                    "keep one source, e.g. `path: s3://bucket/models/base` or "
                    "`fromJob: {kind: TrainingJob, name: my-pretrain}`",
                )
            )
        if self.revision is not None and self.hub_id is None:
            out.append(
                FieldIssue(
                    prefix + ("revision",), "revision only applies to hubId", "remove revision or set hubId"
                )
            )
        return out


class DataSource(ApiModel):
    """One input: a file, a directory or glob of files, or a saved Hugging Face dataset."""

    uri: StorageURI
    """Path or URI: a file, a directory, or a glob (`s3://bucket/corpus/*.jsonl`)."""
    format: DataFormat = "jsonl"
    """jsonl or parquet (records), text (one document per line), or saved-dataset (a `datasets.save_to_disk` directory)."""
    weight: float = Field(default=1.0, gt=0, le=1000)
    """Relative sampling weight when mixing several sources."""


class QualityFilters(ApiModel):
    """Document filters applied before tokenisation; the trainer reports how many each removed."""

    min_chars: int = Field(default=0, ge=0)
    """Drop documents shorter than this many characters."""
    max_chars: int | None = Field(default=None, ge=1)
    """Drop documents longer than this many characters (unset: no limit)."""
    dedup: Literal["exact", "none"] = "exact"
    """exact: drop documents whose normalised text hash was already seen; none: keep duplicates."""
    max_repeated_line_ratio: float | None = Field(default=None, gt=0, le=1)
    """Drop documents where more than this fraction of lines are repeats (boilerplate); unset: off."""


class Evaluation(ApiModel):
    """Held-out evaluation: named sources, or a deterministic slice of the training data."""

    sources: list[DataSource] = Field(default_factory=list, max_length=64)
    """Evaluation data. Empty: hold out `holdoutFraction` of the training documents (at least `holdoutMinTokens`) instead."""
    holdout_fraction: float = Field(default=0.01, ge=0, le=0.5)
    """Fraction of training documents held out (by hash, so the split is stable) when no sources are given; 0 turns evaluation off."""
    holdout_min_tokens: int = Field(default=2000, ge=0, le=100_000_000)
    """Hold out at least this many tokens (response tokens for fine-tunes), whichever of this and holdoutFraction is larger, up to half of the data: below 2,000 tokens an eval's loss is too noisy to compare runs."""
    interval_steps: int = Field(default=0, ge=0)
    """Evaluate every N optimizer steps; 0 evaluates only at the end."""
    max_batches: int = Field(default=50, ge=1)
    """Cap on evaluation batches per evaluation, to bound its cost."""

    def enabled(self) -> bool:
        """Whether the job evaluates on held-out data (named sources, or a held-out slice)."""
        return bool(self.sources) or self.holdout_fraction > 0


class Optimization(ApiModel):
    """Optimizer and schedule. Say how long with maxSteps (or the kind's other budget field)."""

    max_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    """Number of optimizer steps."""
    global_batch_size: int | None = Field(default=None, ge=1)
    """Sequences per optimizer step over all workers; gradient accumulation makes up the difference from microBatchSize × workers. Unset: microBatchSize × workers."""
    micro_batch_size: int = Field(default=4, ge=1, le=4096)
    """Sequences per worker per forward pass (bounded by accelerator memory)."""
    learning_rate: float = Field(default=3e-4, gt=0, lt=1)
    """Peak learning rate."""
    min_learning_rate_ratio: float = Field(default=0.1, ge=0, le=1)
    """Final learning rate as a fraction of the peak (cosine, linear and wsd schedules)."""
    schedule: Schedule = "cosine"
    """Learning-rate schedule after warmup: cosine, linear, constant or wsd (warmup-stable-decay)."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warmup steps from 0 to the peak learning rate."""
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    """AdamW weight decay."""
    optimizer: OptimizerName | None = None
    """adamw (torch's fused AdamW, 32-bit state), adamw-8bit (bitsandbytes' blockwise 8-bit state), paged-adamw / paged-adamw-8bit (bitsandbytes' 32-/8-bit state in paged memory that moves to CPU memory under GPU pressure; GPUs only), or adafactor (factored second moment, no first moment). Unset: paged-adamw for qlora on GPUs (the QLoRA paper's recipe), adamw otherwise. With spec.deepspeed only adamw (DeepSpeed partitions and offloads the state itself)."""
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    """AdamW beta1."""
    adam_beta2: float = Field(default=0.95, ge=0, lt=1)
    """AdamW beta2 (0.95 is the usual choice for LLM training; 0.999 is torch's default)."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the global gradient norm to this value; 0 disables clipping."""
    precision: Precision = "auto"
    """auto: bf16 on GPUs, fp32 on CPU. fp16 needs GPUs; bf16 needs Ampere or newer."""
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    """Seed for model init, data order and dropout; a resumed run replays the same order."""


class DeepSpeed(ApiModel):
    """DeepSpeed ZeRO. Present = enabled; absent = plain distributed data parallel."""

    zero_stage: int = Field(default=2, ge=0, le=3)
    """ZeRO stage: 0 off, 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (needs zeroStage >= 1): fits bigger models, slower steps."""
    offload_params: bool = False
    """Keep parameters in CPU memory (needs zeroStage 3)."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory for about a third more compute."""
    config: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """Raw DeepSpeed config merged over the generated one (escape hatch). Batch sizes, precision and zero stage come from the spec and may not be set here."""

    def issues(self, prefix: tuple[str, ...]) -> list[FieldIssue]:
        return _deepspeed_issues(self, prefix)


_DS_DERIVED = {
    "train_batch_size": "spec.training.globalBatchSize",
    "train_micro_batch_size_per_gpu": "spec.training.microBatchSize",
    "gradient_accumulation_steps": "spec.training.globalBatchSize",
    "bf16": "spec.training.precision",
    "fp16": "spec.training.precision",
    "gradient_clipping": "spec.training.gradClip",
}


def _deepspeed_issues(ds: DeepSpeed, prefix: tuple[str, ...]) -> list[FieldIssue]:
    out: list[FieldIssue] = []
    if ds.offload_optimizer and ds.zero_stage == 0:
        out.append(
            FieldIssue(
                prefix + ("offloadOptimizer",),
                "optimizer offload needs ZeRO stage 1, 2 or 3",
                "set deepspeed.zeroStage: 2 (or 3), or offloadOptimizer: false",
            )
        )
    if ds.offload_params and ds.zero_stage != 3:
        out.append(
            FieldIssue(
                prefix + ("offloadParams",),
                f"parameter offload needs ZeRO stage 3 (zeroStage is {ds.zero_stage})",
                "set deepspeed.zeroStage: 3, or offloadParams: false",
            )
        )
    for key, owner in _DS_DERIVED.items():
        if key in ds.config:
            out.append(
                FieldIssue(
                    prefix + ("config", key),
                    f"'{key}' is derived from {owner}",
                    f"remove it from deepspeed.config and set {owner}",
                )
            )
    zero = ds.config.get("zero_optimization")
    if isinstance(zero, dict) and "stage" in zero and zero["stage"] != ds.zero_stage:
        out.append(
            FieldIssue(
                prefix + ("config", "zero_optimization", "stage"),
                "conflicts with deepspeed.zeroStage",
                "remove zero_optimization.stage and set deepspeed.zeroStage",
            )
        )
    return out


class HeadResources(ApiModel):
    """Resources of the Ray head pod (it schedules work and serves the dashboard; no training)."""

    cpu: Quantity = "2"
    """CPU request and limit of the head."""
    memory: Quantity = "8Gi"
    """Memory request and limit of the head."""


class Resources(ApiModel):
    """Where and on what the Ray workers run."""

    workers: int = Field(default=1, ge=1, le=1024)
    """Number of Ray Train workers (pods); each runs one training process per GPU."""
    gpus_per_worker: int = Field(default=0, ge=0, le=16)
    """GPUs per worker; 0 trains on CPU (tests and laptops)."""
    gpu_resource: str = Field(default="nvidia.com/gpu", pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$")
    """Extended resource name of the GPU (nvidia.com/gpu, amd.com/gpu)."""
    cpu: Quantity = "4"
    """CPU per worker (also sets OMP_NUM_THREADS)."""
    memory: Quantity = "16Gi"
    """Memory per worker."""
    shared_memory: Quantity = "8Gi"
    """Size of the in-memory /dev/shm volume (NCCL and data loaders need more than the default 64Mi)."""
    node_pool: str | None = Field(default=None, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Node pool preset from the operator's configuration (Helm value `nodePools`, e.g. `h100`); its nodeSelector and tolerations are merged with the ones below. The operator fails the job if it has no such pool."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the workers must match, e.g. `nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3`."""
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list,
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    )
    """Pod tolerations (Kubernetes format). GPU pools are usually tainted nvidia.com/gpu:NoSchedule; that toleration is added for you when gpusPerWorker > 0."""
    affinity: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """Pod affinity (Kubernetes format), e.g. to keep workers in one zone."""
    image: str | None = Field(default=None, max_length=512)
    """Trainer image; unset: the operator's default trainer image."""
    service_account_name: K8sName | None = None
    """ServiceAccount of the Ray pods: the way to give them a cloud IAM role (IRSA, Workload Identity) instead of keys."""
    run_as_user: int = Field(default=1000, ge=1, le=2**31 - 1)
    """Non-root UID the Ray containers run as (the trainer image's `ray` user is 1000): pods meet Pod Security "restricted"."""
    fs_group: int = Field(default=100, ge=1, le=2**31 - 1)
    """Group that owns mounted volumes (PVCs) so the containers can write checkpoints to them."""
    head: HeadResources = sub(HeadResources)
    """Ray head pod resources."""

    def issues(self, prefix: tuple[str, ...]) -> list[FieldIssue]:
        out: list[FieldIssue] = []
        for path, quantity in ((("cpu",), self.cpu), (("head", "cpu"), self.head.cpu)):
            problem = cpu_problem(quantity)
            if problem:
                out.append(FieldIssue(prefix + path, problem, CPU_FIX))
        for i, tol in enumerate(self.tolerations):
            op = tol.get("operator", "Equal")
            if op not in ("Equal", "Exists"):
                out.append(
                    FieldIssue(
                        prefix + ("tolerations", i, "operator"),
                        f"unknown toleration operator '{op}'",
                        "use Equal or Exists",
                    )
                )
            if tol.get("effect") not in (None, "", "NoSchedule", "PreferNoSchedule", "NoExecute"):
                out.append(
                    FieldIssue(
                        prefix + ("tolerations", i, "effect"),
                        f"unknown taint effect '{tol.get('effect')}'",
                        "use NoSchedule, PreferNoSchedule or NoExecute",
                    )
                )
        return out


class Checkpointing(ApiModel):
    """Periodic checkpoints (model, optimizer, scheduler, data position) and resume."""

    storage: StorageURI | None = None
    """Where checkpoints go; unset: `<output uri>/checkpoints`. Must outlive the Ray cluster (PVC or object store)."""
    interval_steps: int = Field(default=500, ge=1)
    """Save every N optimizer steps (and at the end)."""
    keep: int = Field(default=3, ge=1, le=1000)
    """Keep the newest N checkpoints; older ones are deleted after a newer one is complete."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the newest checkpoint in storage if one exists (retries, suspend); never: always start fresh."""
    resume_from: StorageURI | None = None
    """Start from this specific checkpoint directory instead of the newest one."""

    def issues(self, prefix: tuple[str, ...]) -> list[FieldIssue]:
        if self.resume == "never" and self.resume_from is not None:
            return [
                FieldIssue(
                    prefix + ("resumeFrom",),
                    "resume is never but resumeFrom is set",
                    "remove resumeFrom or set resume: auto",
                )
            ]
        return []


class Output(ApiModel):
    """Where the trained model goes."""

    uri: StorageURI
    """Directory for the model, tokenizer, metrics.json and loss curve."""


class Budget(ApiModel):
    """Hard limits, checked at every reconcile. A job over one has its Ray job stopped and its cluster deleted, and fails with reason BudgetExceeded; its periodic checkpoints stay in storage (a new job with the same spec and a larger budget resumes from them)."""

    max_gpu_hours: float | None = Field(default=None, gt=0)
    """Most GPU-hours the job may use: workers × gpusPerWorker × wall-clock hours since it first started."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Most wall-clock seconds since the job first started (status.startTime), counted over retries."""


class RayTarget(ApiModel):
    """Which Ray cluster runs the job."""

    address: str | None = Field(default=None, max_length=512, pattern=r"^(https?|ray)://[^\s]+$")
    """Use an existing Ray cluster (its dashboard address, e.g. `http://ray-head.ml:8265`) instead of creating one with KubeRay."""
    version: str = Field(default="2.60.0", pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$")
    """Ray version of the created cluster; must match the trainer image's Ray."""


class Watchdog(ApiModel):
    """Catches a job that stopped training while its processes live on (a hung collective, a deadlocked data loader): the Ray job is stopped and resubmitted from the newest checkpoint, reason Stalled, counted against backoffLimit."""

    enabled: bool = True
    """false turns the watchdog off for this job."""
    stall_seconds: int = Field(default=1800, ge=10, le=7 * 24 * 3600)
    """Longest time without a new optimizer step once training has started. Never applied shorter than 10× the job's observed seconds per step, so a slow model is not stopped."""
    startup_deadline_seconds: int = Field(default=3600, ge=10, le=7 * 24 * 3600)
    """Longest time from a submission to its first optimizer step (data preparation, model download, worker start-up)."""


class Preemption(ApiModel):
    """Graceful preemption (a node drain, a spot reclaim): on SIGTERM every training worker finishes its current optimizer step, writes a checkpoint at that step and stops with reason Preempted (retried, never counted against backoffLimit); the next attempt resumes at exactly that step."""

    grace_period_seconds: int = Field(default=120, ge=10, le=3600)
    """Seconds from SIGTERM to the checkpoint being written (one step plus one save must fit). The Ray pods get terminationGracePeriodSeconds = this + 15, so Kubernetes waits that long before SIGKILL; when the step or the save takes longer the trainer says so in an event."""


EnvVarName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=253)]


class SecretEnv(ApiModel):
    """Environment variables for the Ray head and workers from a Kubernetes Secret in the job's namespace. The operator never reads the Secret: the pods get it by reference."""

    secret_name: K8sName
    """The Secret, e.g. one holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or HF_TOKEN."""
    keys: list[EnvVarName] = Field(default_factory=list, max_length=64)
    """Only these keys, each as a variable of the same name; empty: every key of the Secret."""
    optional: bool = False
    """true: the pods start even if the Secret (or a key) is missing."""


class Mlflow(ApiModel):
    """Log the job to an MLflow tracking server: its parameters, step metrics, evals, the output's location with metrics.json, lineage.json and the model card; and register a promoted output as a new version of a registered model. Credentials by Secret reference (spec.credentials: MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD). A server that cannot be reached is warned about in an event and never fails the job."""

    enabled: bool = True
    """false: no MLflow for this job, even where the operator has a default server."""
    tracking_uri: str | None = Field(default=None, max_length=512, pattern=r"^(https?|file)://[^\s]+$")
    """The tracking server, e.g. http://mlflow.mlops:5000. Unset: the operator's default (FORGELINE_MLFLOW_TRACKING_URI; `forgeline run`: $FORGELINE_MLFLOW_TRACKING_URI)."""
    experiment: str | None = Field(default=None, max_length=256)
    """The experiment (created if missing). Unset: the job's namespace."""
    registered_model: str | None = Field(default=None, max_length=256)
    """Register the output, when spec.promotion promotes it (or there is no gate), as a new version of this registered model, tagged with the job, namespace and lineage digest. Unset: log only."""
    alias: str = Field(default="promoted", max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    """The alias moved to the newest promoted version."""


class Lifecycle(ApiModel):
    """Fields both kinds carry at the top of their spec (flattened into it)."""

    suspend: bool = False
    """true stops the Ray job and deletes the cluster, keeping checkpoints; false resumes."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Seconds to keep the Ray cluster after the job finishes (unset: delete it at once)."""
    delete_job_after_ttl: bool = False
    """Also delete this job object when the TTL runs out."""
    backoff_limit: int = Field(default=3, ge=0, le=100)
    """Resubmissions of a failed Ray job (resuming from the newest checkpoint) before the job fails."""
    budget: Budget | None = None
    """Optional GPU-hour or wall-clock limits."""
    credentials: list[SecretEnv] = Field(default_factory=list, max_length=16)
    """Credentials for object stores and model hubs, by Secret reference (see SecretEnv). With workload identity (IRSA, GKE Workload Identity) set resources.serviceAccountName instead."""
    watchdog: Watchdog = sub(Watchdog)
    """Stall and start-up deadlines: a job that stops making steps is restarted from its newest checkpoint."""
    preemption: Preemption = sub(Preemption)
    """On SIGTERM (node drain, spot reclaim) write a checkpoint at the current step before stopping."""
    ray: RayTarget = sub(RayTarget)
    """Ray cluster settings."""
    promotion: Promotion | None = None
    """What "better" means for this job's output (eval-gated promotion): the Promoted condition says whether it is, with the numbers; unset: no gate."""
    mlflow: Mlflow | None = None
    """Log to MLflow and register promoted outputs (unset: the operator's default server, if it has one)."""


def optimizer_issues(
    optimizer: str | None,
    resources: Resources,
    deepspeed: DeepSpeed | None,
    prefix: tuple[str, ...] = ("training",),
) -> list[FieldIssue]:
    """An optimizer the job's devices and engine can run: paged ones need CUDA; DeepSpeed takes AdamW."""
    if optimizer is None:
        return []
    where = prefix + ("optimizer",)
    if optimizer in PAGED_OPTIMIZERS and resources.gpus_per_worker == 0:
        return [
            FieldIssue(
                where,
                f"{optimizer} pages its state through CUDA unified memory and needs GPUs "
                "(resources.gpusPerWorker is 0)",
                "set resources.gpusPerWorker >= 1, or use adamw-8bit, adafactor or adamw on CPU",
            )
        ]
    if deepspeed is not None and optimizer != "adamw":
        why = (
            "ZeRO hands the optimizer flat partitions, so Adafactor could not factor its second moment"
            if optimizer == "adafactor"
            else "ZeRO partitions the optimizer state itself and DeepSpeed runs its own AdamW"
        )
        return [
            FieldIssue(
                where,
                f"{optimizer} does not run under spec.deepspeed ({why})",
                "use optimizer: adamw with spec.deepspeed (offloadOptimizer moves its state to CPU "
                f"memory), or remove spec.deepspeed to train with {optimizer}",
            )
        ]
    return []


def precision_issues(
    precision: str, resources: Resources, prefix: tuple[str, ...] = ("training",)
) -> list[FieldIssue]:
    if precision == "fp16" and resources.gpus_per_worker == 0:
        return [
            FieldIssue(
                prefix + ("precision",),
                "fp16 needs GPUs (resources.gpusPerWorker is 0)",
                "use precision: auto or fp32 on CPU, or set resources.gpusPerWorker >= 1",
            )
        ]
    return []


def batch_issues(
    global_batch: int | None, micro: int, res: Resources, field: str = "globalBatchSize"
) -> list[FieldIssue]:
    ranks = res.workers * max(res.gpus_per_worker, 1)
    if global_batch is None:
        return []
    if global_batch % (micro * ranks):
        return [
            FieldIssue(
                ("training", field),
                f"global batch of {global_batch} sequences is not a multiple of microBatchSize "
                f"({micro}) × training processes ({ranks})",
                f"use a multiple of {micro * ranks}, e.g. {micro * ranks * max(1, global_batch // (micro * ranks))}",
            )
        ]
    return []


def camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(w.title() for w in rest)
