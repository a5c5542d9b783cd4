"""Forgeline's API (forgeline.dev/v1alpha1) as pydantic models: the single source of the CRDs.

Parse a custom resource once, at the edge, with `parse_job` (whole manifest) or `parse_spec`
(a spec from kopf); everything downstream works on these typed objects.
"""

from ._base import API_GROUP, API_VERSION, GROUP_VERSION
from .errors import FieldError, InvalidJobError, parse_job, parse_spec
from .finetune_job import FineTuneJobSpec
from .resources import JOB_KINDS, MAX_JOB_NAME_LENGTH, FineTuneJob, Job, TrainingJob
from .status import PHASES, TERMINAL_PHASES, Condition, JobStatus, Progress, is_terminal
from .training_job import TrainingJobSpec

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "GROUP_VERSION",
    "JOB_KINDS",
    "MAX_JOB_NAME_LENGTH",
    "PHASES",
    "TERMINAL_PHASES",
    "Condition",
    "FieldError",
    "FineTuneJob",
    "FineTuneJobSpec",
    "InvalidJobError",
    "Job",
    "JobStatus",
    "Progress",
    "TrainingJob",
    "TrainingJobSpec",
    "is_terminal",
    "parse_job",
    "parse_spec",
]
