"""The two custom resources as whole objects (apiVersion, kind, metadata, spec, status)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from ._base import GROUP_VERSION, ApiModel
from .common import JobRef, ModelSource
from .finetune_job import FineTuneJobSpec
from .status import JobStatus
from .training_job import TrainingJobSpec

# KubeRay rejects RayCluster names over 47 characters (it derives service and pod names from
# them). The operator names the cluster `<job>-<short name>`, so a job name may use what is left.
KUBERAY_MAX_CLUSTER_NAME = 47
MAX_JOB_NAME_LENGTH = KUBERAY_MAX_CLUSTER_NAME - len("-ftj")
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOB_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # DNS-1035 label: Services are named after it


class ObjectMeta(ApiModel):
    """The metadata fields Forgeline reads; everything else Kubernetes sets is kept as is."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=MAX_JOB_NAME_LENGTH, pattern=JOB_NAME_PATTERN)
    """Job name: lowercase letters, digits and '-', starting with a letter, at most 43 characters."""
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    generation: int | None = None


class _Job(ApiModel):
    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    SHORT_NAME: ClassVar[str]

    api_version: Literal["forgeline.dev/v1alpha1"] = Field(default=GROUP_VERSION, alias="apiVersion")
    metadata: ObjectMeta
    status: JobStatus | None = None

    def ray_cluster_name(self) -> str:
        return f"{self.metadata.name}-{self.SHORT_NAME}"

    def model_source(self) -> ModelSource | None:
        """Where the weights to start from come from (None: a fresh model)."""
        raise NotImplementedError

    def reward_model_source(self) -> ModelSource | None:
        """The reward model (RL methods only)."""
        return None

    def adapter_sources(self) -> list[ModelSource]:
        """The adapters a merge mixes, in spec order (method merge only)."""
        return []

    def kueue_queue(self) -> str | None:
        """The Kueue LocalQueue the job's label names: its RayCluster is created suspended, for
        Kueue to admit."""
        return self.metadata.labels.get(KUEUE_QUEUE_LABEL) or None

    MODEL_FIELD: ClassVar[str] = "spec.model.initFrom"

    def upstream_refs(self) -> list[JobRef]:
        """The jobs whose outputs this one uses (`fromJob`): it waits until they have succeeded."""
        refs = [ref for ref, _ in self.upstream_fields()]
        return [r for i, r in enumerate(refs) if r not in refs[:i]]

    def upstream_fields(self) -> list[tuple[JobRef, str]]:
        """Each `fromJob` reference with the field that holds it (e.g. spec.baseModel.fromJob)."""
        sources = [
            (self.model_source(), self.MODEL_FIELD),
            (self.reward_model_source(), "spec.rl.rewardModel"),
            *((s, f"spec.merge.adapters[{i}]") for i, s in enumerate(self.adapter_sources())),
        ]
        return [
            (s.from_job, f"{field}.fromJob")
            for s, field in sources
            if s is not None and s.from_job is not None
        ]


class TrainingJob(_Job):
    """Pretraining or continued pretraining of a language model on a Ray cluster."""

    KIND: ClassVar[str] = "TrainingJob"
    PLURAL: ClassVar[str] = "trainingjobs"
    SHORT_NAME: ClassVar[str] = "tj"
    kind: Literal["TrainingJob"] = "TrainingJob"
    spec: TrainingJobSpec

    def model_source(self) -> ModelSource | None:
        """`spec.model.initFrom` (continued pretraining), or None for a model built from scratch."""
        return self.spec.model.init_from


class FineTuneJob(_Job):
    """Fine-tuning (full, LoRA, QLoRA, prompt tuning) or RLHF (reward model, DPO, PPO, GRPO)."""

    KIND: ClassVar[str] = "FineTuneJob"
    PLURAL: ClassVar[str] = "finetunejobs"
    SHORT_NAME: ClassVar[str] = "ftj"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    spec: FineTuneJobSpec
    MODEL_FIELD: ClassVar[str] = "spec.baseModel"

    def model_source(self) -> ModelSource | None:
        """`spec.baseModel`."""
        return self.spec.base_model

    def reward_model_source(self) -> ModelSource | None:
        """`spec.rl.rewardModel` for ppo/grpo."""
        return self.spec.rl.reward_model if self.spec.rl is not None else None

    def adapter_sources(self) -> list[ModelSource]:
        """`spec.merge.adapters` for merge."""
        return list(self.spec.merge.adapters) if self.spec.merge is not None else []


Job = TrainingJob | FineTuneJob
JOB_KINDS: dict[str, type[TrainingJob] | type[FineTuneJob]] = {
    "TrainingJob": TrainingJob,
    "FineTuneJob": FineTuneJob,
}


def job_class(kind: Any) -> type[TrainingJob] | type[FineTuneJob] | None:
    return JOB_KINDS.get(kind) if isinstance(kind, str) else None
