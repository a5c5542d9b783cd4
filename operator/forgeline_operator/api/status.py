"""Status of both job kinds: a visible state machine (phase, conditions, progress)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from ._base import ApiModel

Phase = Literal["Pending", "Waiting", "Provisioning", "Running", "Succeeded", "Failed", "Suspended"]
PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
FailureReason = Literal[
    "OOMKilled",
    "NCCLTimeout",
    "WorkerLost",
    "NodeLost",
    "Preempted",
    "ClusterLost",
    "DataError",
    "ModelUnavailable",
    "ConfigError",
    "UserCodeError",
    "Stalled",
    "PreflightFailed",
    "StorageError",
    "Unknown",
]
FAILURE_REASONS: tuple[str, ...] = FailureReason.__args__  # type: ignore[attr-defined]


def is_terminal(phase: str | None) -> bool:
    """True once a job can no longer change phase on its own (Succeeded or Failed)."""
    return phase in TERMINAL_PHASES


class Condition(ApiModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(max_length=316)
    """Condition type: Waiting, ClusterReady, Running, Complete, Failed, Suspended (the phase), Fits (the estimated memory per GPU against the node pool's GPUs, set before provisioning), BudgetAtRisk (the projection at the current pace exceeds spec.budget), Promoted (spec.promotion's verdict, once the job has succeeded)."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    reason: str = Field(default="", max_length=1024)
    """One CamelCase word saying why."""
    message: str = Field(default="", max_length=32768)
    """Human-readable details."""
    last_transition_time: datetime | None = None
    """When status last changed."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The .metadata.generation this condition was set for."""


class ProgressDisplay(ApiModel):
    """Progress as a person reads it: the strings behind `kubectl get`'s columns."""

    loss: str | None = Field(default=None, max_length=32)
    """Training loss to 3 significant digits, e.g. 1.75."""
    tokens_per_second: str | None = Field(default=None, max_length=32)
    """Throughput with a k/M suffix, e.g. 46.2k."""
    mfu: str | None = Field(default=None, max_length=32)
    """MFU in percent, e.g. 30%."""
    eval: str | None = Field(default=None, max_length=64)
    """The held-out headline metric before → after training, e.g. `ppl 812→143`, `acc 12%→61%`,
    `pref acc 48%→83%`, `reward 0.12→0.80` (the baseline alone until the first eval after it)."""


class Progress(ApiModel):
    """Live training progress, refreshed from the trainer's progress records."""

    step: int = Field(default=0, ge=0)
    """Optimizer steps done."""
    total_steps: int | None = Field(default=None, ge=0)
    """Optimizer steps planned."""
    percent: int | None = Field(default=None, ge=0, le=100)
    """step / totalSteps in percent."""
    summary: str | None = None
    """step/totalSteps, for `kubectl get`."""
    epoch: float | None = None
    """Fractional epoch (fine-tunes)."""
    loss: float | None = None
    """Latest training loss."""
    learning_rate: float | None = None
    """Current learning rate."""
    grad_norm: float | None = None
    """Latest global gradient norm (before clipping)."""
    tokens_per_second: float | None = None
    """Training throughput over all workers."""
    samples_per_second: float | None = None
    """Sequences (or pairs) per second over all workers."""
    mfu: float | None = None
    """Model FLOPs utilisation, 0–1 (on CPU: against a measured matmul peak)."""
    eta_seconds: float | None = None
    """Estimated seconds to finish."""
    trainable_fraction: float | None = None
    """Fraction of parameters that train (fine-tunes)."""
    eval_metrics: dict[str, float] = Field(default_factory=dict)
    """Latest evaluation metrics, e.g. eval_loss, perplexity, accuracy, reward_margin, with the
    eval's size (eval_tokens) and 95% interval half-widths (eval_loss_ci95, accuracy_ci95)."""
    eval_baseline: dict[str, float] = Field(default_factory=dict)
    """The held-out evaluation before training (step 0; a resumed attempt keeps the first
    attempt's): the same metrics as evalMetrics, so the two show what the job achieved."""
    eval_warning: str | None = Field(default=None, max_length=512)
    """Set when the latest eval is too small to trust (fewer than 2,000 held-out tokens), saying
    what to change."""
    updated_at: datetime | None = None
    """When this progress record was produced."""
    seconds_per_step: float | None = None
    """Recent seconds per optimizer step (the watchdog never allows less than 10× this)."""
    step_advanced_at: datetime | None = None
    """When the operator last saw the step count grow (the watchdog measures stalls from it)."""
    display: ProgressDisplay | None = None
    """loss, tokensPerSecond and mfu formatted for people (the printer columns show these)."""


class RayInfo(ApiModel):
    """The Ray cluster and job that run this training."""

    cluster_name: str | None = None
    """Name of the KubeRay RayCluster (unset for existing or local Ray)."""
    address: str | None = None
    """Ray dashboard / Jobs API address."""
    dashboard_url: str | None = None
    """Ray dashboard URL."""
    cluster_uid: str | None = None
    """KubeRay: the uid of the RayCluster this job has been given. While it is set, that RayCluster
    gone (or being deleted) means someone else deleted it: Forgeline unsets it when it deletes the
    cluster itself to make it again."""
    head_pod: str | None = None
    """KubeRay: the head pod the current Ray job was submitted to (KubeRay recreates a deleted or
    failed head under a new name, and without GCS fault tolerance Ray's jobs are gone with it)."""
    job_id: str | None = None
    """Submission id of the current Ray job."""
    job_status: str | None = None
    """Ray's own job status: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED."""
    submitted_at: datetime | None = None
    """When the current Ray job was submitted (the watchdog's start-up deadline counts from it)."""
    cluster_requested_at: datetime | None = None
    """When the current Ray cluster was requested, or admitted by Kueue (the cluster-ready timeout counts from it)."""
    unreachable_since: datetime | None = None
    """Since when the Ray head has not answered (unset while it does); past FORGELINE_CLUSTER_LOST_SECONDS the attempt is lost (reason ClusterLost)."""


class LastFailure(ApiModel):
    """The most recent failed attempt, classified from the trainer's error record and the Ray job's log."""

    reason: FailureReason
    """OOMKilled, NCCLTimeout, WorkerLost, NodeLost, Preempted, ClusterLost, DataError, ModelUnavailable, ConfigError, UserCodeError, Stalled, PreflightFailed, StorageError or Unknown."""
    attempt: int = Field(ge=0)
    """The attempt that failed (0: the first submission)."""
    step: int | None = Field(default=None, ge=0)
    """The last optimizer step that attempt reported."""
    time: datetime | None = None
    """When the failure was seen."""
    message: str = Field(default="", max_length=1024)
    """The decisive error, one line (secrets redacted)."""
    fix: str | None = Field(default=None, max_length=1024)
    """What to change, where a change can help."""
    log_lines: list[str] = Field(default_factory=list, max_length=5)
    """The few log lines that decided the reason (secrets redacted)."""
    retried: bool = False
    """Whether the operator resubmitted the job after it."""


class AttemptLog(ApiModel):
    """Where one attempt's Ray job log is archived (`forgeline logs NAME --attempt N` prints it)."""

    attempt: int = Field(ge=0)
    """The attempt (0: the first submission)."""
    uri: str = Field(max_length=2048)
    """The archived log: its last FORGELINE_LOG_ARCHIVE_BYTES, updated every reconcile."""


class Timings(ApiModel):
    """Where the time to the first optimizer step went (set once, at the first step)."""

    admitted_at: datetime | None = None
    """When the job got a slot (its dependencies done, under the running-jobs cap)."""
    first_step_at: datetime | None = None
    """When the trainer reported its first optimizer step."""
    time_to_first_step_seconds: float | None = Field(default=None, ge=0)
    """Creation → first step: the sum of the three below."""
    queued_seconds: float | None = Field(default=None, ge=0)
    """Creation → admission: waiting for upstream jobs or a slot."""
    provisioning_seconds: float | None = Field(default=None, ge=0)
    """Admission → first Ray job submission: the Ray cluster (and Kueue)."""
    startup_seconds: float | None = Field(default=None, ge=0)
    """First submission → first step: the trainer's start (imports, data, model, workers)."""


class Cost(ApiModel):
    """What the job has cost so far and will cost at its current pace (jobs that hold GPUs)."""

    gpus: int = Field(ge=0)
    """GPUs the job holds: workers × gpusPerWorker."""
    gpu_hours: float = Field(ge=0)
    """GPU-hours used: gpus × wall-clock hours since status.startTime, retries included (the clock spec.budget.maxGpuHours is enforced on)."""
    projected_gpu_hours: float | None = Field(default=None, ge=0)
    """GPU-hours at the end, at the current pace: used + gpus × the trainer's time to finish (from its live tokens/s and the steps left). At the end: what was used."""
    price_per_gpu_hour: float | None = Field(default=None, ge=0)
    """The node pool's price (FORGELINE_NODE_POOLS pricePerGpuHour, else FORGELINE_PRICE_PER_GPU_HOUR); unset: costs in GPU-hours only."""
    cost: float | None = Field(default=None, ge=0)
    """gpuHours × pricePerGpuHour."""
    projected_cost: float | None = Field(default=None, ge=0)
    """projectedGpuHours × pricePerGpuHour."""
    currency: str | None = Field(default=None, max_length=8)
    """How the costs are written (FORGELINE_CURRENCY), e.g. $."""
    display: str | None = Field(default=None, max_length=64)
    """Spent → projected, for `kubectl get`: `$4.20→$31`, or `1.68→12.4 GPU-h` without a price."""
    updated_at: datetime | None = None
    """When this was computed (refreshed with progress, and at least every 30 s while running)."""


GoodputCategory = Literal[
    "queued",
    "provisioning",
    "startup",
    "productive",
    "redone",
    "evaluation",
    "checkpointSave",
    "checkpointRestore",
    "stalled",
    "other",
]


class GoodputClock(ApiModel):
    """The operator's open time segment: queued or provisioning since a time."""

    category: Literal["queued", "provisioning"]
    """What the time since `since` counts as."""
    since: datetime | None = None
    """When the segment began."""


class AttemptTime(ApiModel):
    """Where one attempt's time went (its Ray job, from submission to its end)."""

    attempt: int = Field(ge=0)
    """The attempt (0: the first submission)."""
    ended_by: str = Field(default="", max_length=64)
    """How it ended: Succeeded, or the failure's reason (Preempted, WorkerLost, Stalled, ...)."""
    seconds: dict[str, float] = Field(default_factory=dict)
    """Seconds by category: startup, productive, redone, evaluation, checkpointSave, checkpointRestore, stalled, other."""
    first_step: int | None = Field(default=None, ge=0)
    """Its first optimizer step."""
    last_step: int | None = Field(default=None, ge=0)
    """The last step it reported."""
    resumed_from: int = Field(default=0, ge=0)
    """The checkpoint step it resumed from (0: a fresh start)."""
    redone_steps: int = Field(default=0, ge=0)
    """Steps it computed again (done before by an earlier attempt, lost with it)."""
    seconds_per_step: float | None = Field(default=None, ge=0)
    """Its measured seconds per optimizer step."""


class RunningAttempt(AttemptTime):
    """The attempt that runs, split as the operator last saw it (bookkeeping: an operator that
    restarts, and has to close the attempt before it has read the attempt's log, closes it from this)."""

    at: datetime | None = None
    """When this split was made (what comes after it counts as other)."""


class Goodput(ApiModel):
    """Where the job's time and chip-hours went: productive steps and named badput (docs/goodput.md)."""

    seconds: dict[str, float] = Field(default_factory=dict)
    """Wall seconds by category: queued, provisioning, startup, productive, redone, evaluation, checkpointSave, checkpointRestore, stalled, other."""
    total_seconds: float | None = Field(default=None, ge=0)
    """All of them."""
    held_seconds: float | None = Field(default=None, ge=0)
    """All but queued: the time the job held its chips."""
    chips: float | None = Field(default=None, ge=0)
    """Chips the job holds: GPUs (workers × gpusPerWorker), or CPU cores on a CPU pool."""
    chip_unit: str | None = Field(default=None, max_length=16)
    """GPU or CPU core."""
    chip_hours: float | None = Field(default=None, ge=0)
    """heldSeconds × chips / 3600: GPU-hours (or CPU core-hours)."""
    productive_chip_hours: float | None = Field(default=None, ge=0)
    """The productive part of chipHours."""
    fraction: float | None = Field(default=None, ge=0, le=1)
    """Goodput: productive ÷ heldSeconds."""
    display: str | None = Field(default=None, max_length=64)
    """The fraction in percent, with the largest badput when it is at least 10%: `62% (startup 21%)`."""
    redone_steps: int = Field(default=0, ge=0)
    """Steps computed again after failures and preemptions, all attempts."""
    furthest_step: int = Field(default=0, ge=0)
    """The furthest step an ended attempt reached."""
    attempts: list[AttemptTime] = Field(default_factory=list, max_length=20)
    """Each ended attempt's split (the newest 20)."""
    closed: dict[str, float] = Field(default_factory=dict)
    """Seconds by category of what has ended: clock segments and ended attempts (bookkeeping)."""
    clock: GoodputClock | None = None
    """The open queued or provisioning segment (bookkeeping)."""
    running: RunningAttempt | None = None
    """The running attempt's split as last written (bookkeeping)."""
    updated_at: datetime | None = None
    """When this was computed."""


class PromotionResult(ApiModel):
    """spec.promotion's verdict on the finished job's output (also the Promoted condition)."""

    promoted: bool
    """Whether the output counts as better (downstream fromJob uses it without allowUnpromoted)."""
    reason: str = Field(max_length=64)
    """Improved, ThresholdMet, Regressed, NotSignificant, ThresholdNotMet or NoEvaluation."""
    metric: str = Field(max_length=64)
    """The metric that decided."""
    message: str = Field(default="", max_length=1024)
    """The numbers in a sentence."""
    before: float | None = None
    """The metric before training."""
    after: float | None = None
    """The metric after training."""
    improvement: float | None = None
    """After against before, positive when better."""
    interval95: float | None = Field(default=None, ge=0)
    """The 95% interval (half-width) of the difference, where the metric has one."""
    required: float | None = Field(default=None, ge=0)
    """What the improvement had to exceed: max(minImprovement, interval95)."""
    threshold: float | None = None
    """spec.promotion.threshold, where it decided."""


class LineageOrigin(ApiModel):
    """A model or data source the job read, with the digest of its content."""

    location: str | None = Field(default=None, max_length=2048)
    """Where it was read (a path or URI, or hf://<hub id>)."""
    uri: str | None = Field(default=None, max_length=2048)
    """A data source's URI."""
    sha256: str | None = Field(default=None, max_length=128)
    """sha256 over its files' names and sha256s (a saved dataset: its fingerprint); unset where it could not be read here."""


class UpstreamRecord(ApiModel):
    """A job whose output this one trained from, and the digest of that output's lineage record."""

    job: str = Field(max_length=512)
    """Kind/name."""
    digest: str = Field(max_length=128)
    """sha256 of its lineage record."""


class LineageSummary(ApiModel):
    """Where the output came from: the summary of `lineage.json`, written next to the model (with a Hugging Face model card, README.md). `forgeline lineage NAME` prints the chain."""

    digest: str = Field(max_length=128)
    """sha256 of the lineage record (MLflow's tag names it too)."""
    file: str = Field(default="lineage.json", max_length=256)
    """The record's file name in the output."""
    output_sha256: str | None = Field(default=None, max_length=128)
    """The output's content digest (every file but the record and the card)."""
    config_sha256: str | None = Field(default=None, max_length=128)
    """sha256 of the resolved job config (without its attempt and Ray run name)."""
    base_model: LineageOrigin | None = None
    """The model it started from."""
    data: list[LineageOrigin] = Field(default_factory=list, max_length=64)
    """Each data source, with the digest of what was read."""
    trainer_image: str | None = Field(default=None, max_length=512)
    """The image the Ray pods ran."""
    versions: dict[str, str] = Field(default_factory=dict)
    """Forgeline, Python, torch, transformers, Ray (and PEFT, TRL, DeepSpeed, datasets)."""
    seed: int | None = None
    """spec.training.seed."""
    upstream: list[UpstreamRecord] = Field(default_factory=list, max_length=64)
    """The jobs its base model came from, nearest first (a DPO model: its SFT, then the pretraining)."""


class JobStatus(ApiModel):
    """Observed state of a TrainingJob or FineTuneJob."""

    phase: Phase | None = None
    """Pending, Waiting, Provisioning, Running, Succeeded, Failed or Suspended."""
    reason: str | None = None
    """One CamelCase word for the current phase, e.g. ValidationFailed, Queued, or a failure's reason such as OOMKilled."""
    message: str | None = None
    """Human-readable details of the current phase."""
    conditions: list[Condition] = Field(default_factory=list)
    """Standard conditions."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The .metadata.generation last acted on."""
    start_time: datetime | None = None
    """When training was first submitted."""
    completion_time: datetime | None = None
    """When the job reached Succeeded or Failed."""
    restarts: int = Field(default=0, ge=0)
    """Ray job resubmissions after failures (counted against spec.backoffLimit)."""
    preemptions: int = Field(default=0, ge=0)
    """Resubmissions after preemptions (node drains, spot reclaims): not counted against spec.backoffLimit."""
    last_failure: LastFailure | None = None
    """The most recent failed attempt: its typed reason, step, message, fix and decisive log lines."""
    progress: Progress | None = None
    """Live progress."""
    ray: RayInfo | None = None
    """Ray cluster and job identifiers."""
    output_uri: str | None = None
    """Where the trained model was (or will be) written."""
    checkpoint_uri: str | None = None
    """Where checkpoints are kept."""
    timings: Timings | None = None
    """Time to the first optimizer step, split into queue wait, provisioning and the trainer's start-up."""
    logs: list[AttemptLog] = Field(default_factory=list)
    """Each attempt's archived Ray job log, kept after the Ray cluster is gone."""
    cost: Cost | None = None
    """GPU-hours and cost so far and projected to the end (jobs that hold GPUs)."""
    lineage: LineageSummary | None = None
    """Where the output came from (its lineage.json, summarised), once the job has succeeded."""
    promotion: PromotionResult | None = None
    """spec.promotion's verdict once the job has succeeded (the Promoted condition says it too)."""
    goodput: Goodput | None = None
    """Where the job's time and GPU-hours (CPU core-hours on a CPU pool) went: productive steps and badput by category."""


MIN_EVAL_TOKENS = 2000
"""Below this many held-out tokens an eval is too small to trust: status.progress.evalWarning and
the trainer's warning event say so."""


def eval_size_warning(metrics: dict[str, float]) -> str | None:
    """The warning for an eval too small to trust (None when it is large enough or unsized)."""
    tokens = metrics.get("eval_tokens")
    if tokens is None or tokens >= MIN_EVAL_TOKENS:
        return None
    ci = metrics.get("eval_loss_ci95")
    spread = f" (eval loss ±{ci:.3g} at 95%)" if ci is not None else ""
    return (
        f"eval too small to trust: {tokens:,.0f} held-out tokens, fewer than {MIN_EVAL_TOKENS:,}{spread}; "
        "raise spec.evaluation.maxBatches or holdoutFraction, or give spec.evaluation.sources"
    )
