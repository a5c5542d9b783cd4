"""The trainer's failures, typed: what the operator shows as `status.lastFailure.reason`.

Trainer code raises `DataError`, `ModelUnavailable` or `ConfigError` (each a ValueError or
FileNotFoundError too, so callers that expect those still work). `reason_for` names any exception
— also torch's out-of-memory, the hub's "couldn't connect" and a Ray Train worker's own exception
inside `WorkerGroupError` — and the launcher writes it into its `error` progress record, which the
operator's classification takes as given.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


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

    def __init__(self, check: str, rank: int | None, detail: str, where: str | None = None) -> None:
        """`rank`: the Ray Train worker; None with `where` naming another place (a worker pod
        before the worker group exists); None alone: the driver."""
        where = where or ("the driver" if rank is None else f"worker {rank}")
        super().__init__(f"preflight check '{check}' failed on {where}: {detail}")
        self.check, self.rank, self.detail, self.where = check, rank, detail, where

    def __reduce__(self) -> tuple[type, tuple[str, int | None, str, str]]:  # crosses Ray's process boundary
        return (type(self), (self.check, self.rank, self.detail, self.where))


class StorageError(TrainerError, OSError):
    """Checkpoint or output storage that cannot be written (unwritable, full, unreachable)."""

    reason = "StorageError"


_HUB_UNREACHABLE = (
    "couldn't connect to 'https://huggingface.co'",
    "is not a local folder and is not a valid model identifier",
    "Repository Not Found",
)


def root_cause(exc: BaseException) -> BaseException:
    """The exception inside Ray Train's wrappers: a ControllerError's own failure (where the
    launcher's `stop_retrying` callback raised a worker's error), else `exc`."""
    inner = getattr(exc, "controller_failure", None)  # ray.train.ControllerError
    return root_cause(inner) if isinstance(inner, BaseException) else exc


def reason_for(exc: BaseException) -> str | None:
    """The typed reason of an exception, or None where only the log can tell (the operator then
    classifies the log)."""
    exc = root_cause(exc)
    inner = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError: the workers' own
    if isinstance(inner, dict) and inner:
        reasons = [reason_for(e) for e in inner.values()]
        return next((r for r in reasons if r is not None), None)
    if isinstance(exc, TrainerError):
        return exc.reason
    if storage_errno(exc) in WRITE_FAULTS:  # e.g. Ray Train's checkpoint upload into a full volume
        return "StorageError"
    if storage_unreachable(exc):  # an object store that does not answer (tests/test_object_storage.py)
        return "StorageError"
    if storage_not_shared(exc):  # every Ray node must see the same checkpoint storage
        return "StorageError"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "OOMKilled"
    text = str(exc)
    if isinstance(exc, OSError) and any(marker in text for marker in _HUB_UNREACHABLE):
        return "ModelUnavailable"
    return None


NOT_RETRIED = ("PreflightFailed", "StorageError", "DataError", "ConfigError", "ModelUnavailable")
"""Reasons that another attempt of the worker group cannot fix: Ray Train gives up at once."""


def not_retried(worker_exceptions: Mapping[int, BaseException]) -> BaseException | None:
    """The workers' exception that should end the Ray Train run now (no FailureConfig retry), or
    None. A preflight failure is preferred as the failing worker reported it itself (the others
    report the same check with less detail)."""
    final = [
        e
        for _, e in sorted(worker_exceptions.items())
        if reason_for(e) in NOT_RETRIED and not storage_unreachable(e)  # it may come back: retried
    ]
    own = [e for rank, e in sorted(worker_exceptions.items()) if getattr(e, "rank", None) == rank]
    return next((e for e in own if e in final), final[0] if final else None)


# errno → what it means for a location we write to
_STORAGE_ERRNOS = {
    errno.ENOSPC: ("ENOSPC", "no space left"),
    errno.EDQUOT: ("EDQUOT", "the storage quota is used up"),
    errno.EROFS: ("EROFS", "the file system is read-only"),
    errno.EACCES: ("EACCES", "permission denied"),
    errno.EPERM: ("EPERM", "operation not permitted"),
}
WRITE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
"""Storage faults that only writing meets: named StorageError wherever they are raised."""
# pyarrow and some fsspec backends raise OSError without errno: the C library's words then
_STORAGE_TEXTS = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
}


# An object store that does not answer (down, refusing connections, unknown host, timing out), in
# the words of pyarrow's S3 filesystem (Ray Train's checkpoint upload and download) and of botocore
# (s3fs: data, outputs, preflight probes); its exceptions are not OSErrors.
_UNREACHABLE_TEXTS = (
    "AWS Error NETWORK_CONNECTION",
    "Could not connect to the endpoint URL",
    "Connect timeout on endpoint URL",
    "Read timeout on endpoint URL",  # one that accepts connections and never answers
)


def storage_unreachable(exc: BaseException) -> bool:
    """An object store that cannot be reached. StorageError, but Ray Train's FailureConfig still
    retries it (the store may come back; each retry resumes from the newest checkpoint)."""
    return any(marker in str(exc) for marker in _UNREACHABLE_TEXTS)


def storage_not_shared(exc: BaseException) -> bool:
    """Ray Train found that a worker does not see the marker file its driver wrote into the
    storage path: a path that is not the same storage on every Ray node (a per-node volume, a
    directory local to the head)."""
    return isinstance(exc, RuntimeError) and "Unable to set up cluster storage" in str(exc)


def object_store_endpoint() -> str:
    """The S3 endpoint the AWS SDKs use here: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, or AWS's own."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def storage_errno(exc: BaseException) -> int | None:
    """ENOSPC, EDQUOT, EROFS, EACCES or EPERM where `exc` is one of those (by errno, or by its
    text: pyarrow's copy raises OSError with the errno only in the message), else None."""
    code = getattr(exc, "errno", None)
    if code in _STORAGE_ERRNOS:
        return code
    text = str(exc)
    return next((c for marker, c in _STORAGE_TEXTS.items() if marker in text), None)


def storage_error(exc: BaseException, location: str, action: str, field: str) -> StorageError | None:
    """A StorageError naming the path, what happened and what to change (`field`: the spec field
    that names the location), or None where `exc` is not a storage fault."""
    if storage_unreachable(exc):
        return StorageError(
            f"{action}: the object store at {object_store_endpoint()} does not answer ({location}) — "
            f"fix: check that it is up and reachable from the Ray pods (the endpoint comes from "
            f"AWS_ENDPOINT_URL), or point {field} at another location; a resubmitted job resumes from "
            f"its newest complete checkpoint. {type(exc).__name__}: {exc}"
        )
    if storage_not_shared(exc):
        return StorageError(
            f"{action}: {location} is not the same storage on every Ray node (a worker does not see "
            "the file Ray Train's driver wrote there) — fix: use a volume that every node mounts "
            f"read-write (a ReadWriteMany claim: NFS, CephFS, …) or object storage (s3://, gs://) for "
            f"{field}"
        )
    code = storage_errno(exc)
    if code is None:
        return None
    name, meaning = _STORAGE_ERRNOS[code]
    path = getattr(exc, "filename", None) or location
    fix = (
        "free space or raise the quota there"
        if code in (errno.ENOSPC, errno.EDQUOT)
        else "make it writable by the Ray workers"
    )
    return StorageError(
        f"{action}: {meaning} at {path} ({name}) — fix: {fix}, or point {field} at another location; "
        "a resubmitted job resumes from its newest complete checkpoint"
    )


@contextmanager
def storage_writes(location: str, action: str, field: str) -> Iterator[None]:
    """Inside: a storage fault (full, over quota, read-only, no permission) becomes a StorageError
    naming `location` and `field`; anything else passes unchanged."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        err = storage_error(exc, location, action, field)
        if err is None:
            raise
        raise err from exc
