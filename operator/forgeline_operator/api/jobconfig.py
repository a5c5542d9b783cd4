"""The job config: the typed contract between the operator (or `forgeline run`) and the trainer.

The operator turns a TrainingJob/FineTuneJob into a `JobConfig` — the spec plus everything it
resolved (model paths from `fromJob`, the output and checkpoint locations, the Ray run name) —
and hands it to `python -m forgeline_trainer --config <file or JSON>`. The trainer imports this
module and pydantic only; it never sees kopf or raw custom-resource dicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from ._base import ApiModel, StorageURI
from .common import Mlflow, ModelSource
from .finetune_job import FineTuneJobSpec
from .resources import Job, TrainingJob
from .training_job import TrainingJobSpec

PROGRESS_PREFIX = "FORGELINE_PROGRESS "
"""Every progress record is one line `FORGELINE_PROGRESS {json}` in the Ray job's log."""


class ResolvedPaths(ApiModel):
    """Locations the operator resolved; relative paths resolve against workDir."""

    output: StorageURI
    """Where the trained model, tokenizer, metrics.json and loss curve go."""
    checkpoints: StorageURI
    """Ray Train storage for checkpoints (survives the Ray cluster)."""
    base_model: str | None = None
    """Model to start from (FineTuneJob base model, TrainingJob initFrom): a path/URI, or `hf://<hub id>`."""
    reward_model: str | None = None
    """Reward model for ppo/grpo: a path/URI, or `hf://<hub id>`."""
    adapters: list[str] = Field(default_factory=list)
    """The adapters a merge mixes, in spec.merge.adapters order: paths/URIs, or `hf://<hub id>`."""
    work_dir: str | None = None
    """Directory that relative paths in the spec are relative to (local runs)."""


class RunSettings(ApiModel):
    """How this attempt runs on Ray."""

    run_name: str = Field(min_length=1, max_length=200)
    """Ray Train run name: stable across retries, so a resubmitted job resumes its checkpoints."""
    attempt: int = Field(default=0, ge=0)
    """0 for the first submission, then one more per resubmission."""
    progress_interval_seconds: float = Field(default=5.0, gt=0)
    """Seconds between progress records."""
    max_worker_failures: int = Field(default=2, ge=-1)
    """Ray Train FailureConfig.max_failures: lost workers restarted within one Ray job. The operator
    sets 0: it resubmits the job itself, so status says what failed and preemptions are counted
    apart from spec.backoffLimit; `forgeline run` keeps 2."""
    fail_at_step: int | None = Field(default=None, ge=1)
    """Fault injection for tests: rank 0 raises after this step on attempt 0."""
    hang_at_step: int | None = Field(default=None, ge=1)
    """Fault injection for tests: every worker stops making progress after this step on attempt 0."""
    trainer_image: str | None = Field(default=None, max_length=512)
    """The image the Ray pods run (the lineage record names it); None: not run from an image."""
    mlflow_tracking_uri: str | None = Field(default=None, max_length=512)
    """The MLflow server this attempt logs to (spec.mlflow's, else the default); None: no MLflow."""


class _Config(ApiModel):
    api_version: Literal["forgeline.dev/v1alpha1"] = Field(
        default="forgeline.dev/v1alpha1", alias="apiVersion"
    )
    name: str
    namespace: str = "default"
    paths: ResolvedPaths
    run: RunSettings


class TrainingJobConfig(_Config):
    kind: Literal["TrainingJob"] = "TrainingJob"
    spec: TrainingJobSpec


class FineTuneJobConfig(_Config):
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    spec: FineTuneJobSpec


JobConfig = Annotated[TrainingJobConfig | FineTuneJobConfig, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[TrainingJobConfig | FineTuneJobConfig] = TypeAdapter(JobConfig)


def load_job_config(source: str) -> TrainingJobConfig | FineTuneJobConfig:
    """Parse a job config from a JSON string or a path to a JSON file."""
    text = source if source.lstrip().startswith("{") else Path(source).read_text()
    return _ADAPTER.validate_python(json.loads(text))


def dump_job_config(config: TrainingJobConfig | FineTuneJobConfig) -> str:
    return config.model_dump_json(by_alias=True, exclude_none=True)


_LIFECYCLE_FIELDS = (
    "suspend",
    "ttlSecondsAfterFinished",
    "deleteJobAfterTtl",
    "backoffLimit",
    "budget",
    "watchdog",
    "preemption",
    "credentials",
)


def spec_fingerprint(spec: TrainingJobSpec | FineTuneJobSpec) -> str:
    """A short hash of what determines the training (not suspend, TTL, retries or budget): part of
    the Ray Train run name, so a resubmission resumes its own checkpoints while a changed spec
    never resumes checkpoints of a different model or data."""
    import hashlib

    wire = {k: v for k, v in spec.to_dict().items() if k not in _LIFECYCLE_FIELDS}
    return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()[:8]


def _run_name(job: Job, prefix: str | None) -> str:
    """`<namespace>-<job>-<uid>-<spec hash>`, or `<prefix>-<uid>-<spec hash>` when a prefix is given."""
    uid = (job.metadata.uid or "")[:8]
    head = (prefix,) if prefix else (job.metadata.namespace or "default", job.metadata.name)
    return "-".join(p for p in (*head, uid, spec_fingerprint(job.spec)) if p)


def _mlflow_uri(settings: Mlflow | None, default: str | None) -> str | None:
    """The job's MLflow server: its own, else the default; none when the job turns MLflow off."""
    if settings is not None and not settings.enabled:
        return None
    return (settings.tracking_uri if settings is not None else None) or default or None


def _location(source: ModelSource | None) -> str | None:
    if source is not None and source.from_job is not None:
        ref = source.from_job
        raise ValueError(f"{ref.kind}/{ref.name}'s output must be resolved first")
    return source.location() if source is not None else None


def build_job_config(
    job: Job,
    *,
    output: str | None = None,
    checkpoints: str | None = None,
    base_model: str | None = None,
    reward_model: str | None = None,
    adapters: list[str | None] | None = None,
    work_dir: str | None = None,
    run_name: str | None = None,
    attempt: int = 0,
    fail_at_step: int | None = None,
    hang_at_step: int | None = None,
    max_worker_failures: int = 2,
    trainer_image: str | None = None,
    mlflow_default: str | None = None,
) -> TrainingJobConfig | FineTuneJobConfig:
    """The trainer's config for a job. `base_model`/`reward_model` must be given when the spec
    names them `fromJob` (the caller looked up that job's output); otherwise they come from the spec.
    `adapters` likewise, one entry per spec.merge adapter (None: from the spec)."""
    spec = job.spec
    out = output or spec.output.uri
    ckpt = checkpoints or spec.checkpointing.storage or f"{out.rstrip('/')}/checkpoints"
    if base_model is None:
        base_model = _location(job.model_source())
    if reward_model is None:
        reward_model = _location(job.reward_model_source())
    sources = job.adapter_sources()
    given = list(adapters) if adapters is not None else [None] * len(sources)
    if len(given) != len(sources):
        raise ValueError(f"{len(given)} adapter locations for {len(sources)} spec.merge.adapters")
    resolved = [loc if loc is not None else _location(src) for loc, src in zip(given, sources, strict=True)]
    namespace = job.metadata.namespace or "default"
    paths = ResolvedPaths(
        output=out,
        checkpoints=ckpt,
        base_model=base_model,
        reward_model=reward_model,
        adapters=[r for r in resolved if r is not None],
        work_dir=work_dir,
    )
    run = RunSettings(
        run_name=_run_name(job, run_name),
        attempt=attempt,
        fail_at_step=fail_at_step,
        hang_at_step=hang_at_step,
        max_worker_failures=max_worker_failures,
        trainer_image=trainer_image,
        mlflow_tracking_uri=_mlflow_uri(spec.mlflow, mlflow_default),
    )
    cls = TrainingJobConfig if isinstance(job, TrainingJob) else FineTuneJobConfig
    return cls(name=job.metadata.name, namespace=namespace, paths=paths, run=run, spec=spec)
