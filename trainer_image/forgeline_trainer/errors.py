"""The trainer's failures, typed: what the operator shows as `status.lastFailure.reason`.

Trainer code raises `DataError`, `ModelUnavailable` or `ConfigError` (each a ValueError or
FileNotFoundError too, so callers that expect those still work). `reason_for` names any exception
— also torch's out-of-memory, the hub's "couldn't connect" and a Ray Train worker's own exception
inside `WorkerGroupError` — and the launcher writes it into its `error` progress record, which the
operator's classification takes as given.
"""

from __future__ import annotations

import os


class TrainerError(Exception):
    reason = "UserCodeError"


class DataError(TrainerError, ValueError):
    """Unreadable, missing or empty data (after filters)."""

    reason = "DataError"


class DataNotFound(DataError, FileNotFoundError):
    """A data path or glob that matches nothing."""


class ModelUnavailable(TrainerError, FileNotFoundError):
    """The base or reward model cannot be found or reached."""

    reason = "ModelUnavailable"


class ConfigError(TrainerError, ValueError):
    """A job config the trainer cannot run (the API's validation catches most of these first)."""

    reason = "ConfigError"


class Preempted(TrainerError):
    """The worker was told to stop (SIGTERM: a node drain, a spot reclaim) and saved a checkpoint
    at its current step first."""

    reason = "Preempted"


class PreflightFailed(TrainerError):
    """A check before the first step failed (GPU, collective, storage, data), on a named worker."""

    reason = "PreflightFailed"

    def __init__(self, check: str, rank: int, detail: str) -> None:
        super().__init__(f"preflight check '{check}' failed on worker {rank}: {detail}")
        self.check, self.rank, self.detail = check, rank, detail


class StorageError(TrainerError, OSError):
    """Checkpoint or output storage that cannot be written (unwritable, full, unreachable)."""

    reason = "StorageError"


_HUB_UNREACHABLE = (
    "couldn't connect to 'https://huggingface.co'",
    "is not a local folder and is not a valid model identifier",
    "Repository Not Found",
)


# An object store that does not answer (down, refusing connections, unknown host, timing out), in
# the words of pyarrow's S3 filesystem (Ray Train's checkpoint upload and download) and of botocore
# (s3fs: data, outputs, preflight probes); its exceptions are not OSErrors.
_UNREACHABLE_TEXTS = (
    "AWS Error NETWORK_CONNECTION",
    "Could not connect to the endpoint URL",
    "Connect timeout on endpoint URL",
)


def storage_unreachable(exc: BaseException) -> bool:
    """An object store that cannot be reached. StorageError, but Ray Train's FailureConfig still
    retries it (the store may come back; each retry resumes from the newest checkpoint)."""
    return any(marker in str(exc) for marker in _UNREACHABLE_TEXTS)


def object_store_endpoint() -> str:
    """The S3 endpoint the AWS SDKs use here: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, or AWS's own."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def reason_for(exc: BaseException) -> str | None:
    """The typed reason of an exception, or None where only the log can tell (the operator then
    classifies the log)."""
    inner = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError: the workers' own
    if isinstance(inner, dict) and inner:
        reasons = [reason_for(e) for e in inner.values()]
        return next((r for r in reasons if r is not None), None)
    if isinstance(exc, TrainerError):
        return exc.reason
    if storage_unreachable(exc):  # an object store that does not answer (tests/test_object_storage.py)
        return "StorageError"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "OOMKilled"
    text = str(exc)
    if isinstance(exc, OSError) and any(marker in text for marker in _HUB_UNREACHABLE):
        return "ModelUnavailable"
    return None
