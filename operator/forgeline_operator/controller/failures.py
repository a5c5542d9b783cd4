"""Why an attempt failed, read from what the trainer and Ray left behind — a pure function.

`classify(error_record, ray_message, log_tail)` names the failure with one typed reason, picks the
few log lines that decide it (redacted), and says whether retrying can help. The reconciler puts
the result in `status.reason`, `status.lastFailure`, an Event and `forgeline_job_failures_total`;
`decisions.after_failure` uses `retryable` and `counts_against_backoff`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from ..api.inputs import one_line
from ..api.status import FAILURE_REASONS, FailureReason

# reason → (retryable, what to change). Retry only what retrying can fix.
_NATURE: dict[str, tuple[bool, str]] = {
    "OOMKilled": (
        False,
        "lower training.microBatchSize or data.sequenceLength, turn on activation checkpointing, "
        "use a higher deepspeed.zeroStage or QLoRA, or give the workers more memory",
    ),
    "Preempted": (
        True,
        "nothing to change: the job resumes from its newest checkpoint (preemptions do not count "
        "against spec.backoffLimit)",
    ),
    "NCCLTimeout": (
        True,
        "check the network between the GPU nodes (NCCL_DEBUG=INFO in the worker logs); "
        "a worker that stalls in data loading also times out its peers",
    ),
    "NodeLost": (
        True,
        "nothing to change if the node was replaced; if it repeats, look at the node's events "
        "(kubectl describe node) for hardware or kubelet problems",
    ),
    "WorkerLost": (
        True,
        "nothing to change if it was a one-off; if it repeats, read the worker's log for the crash before it",
    ),
    "ClusterLost": (True, "nothing to change if the Ray head came back; if it repeats, look at the head pod"),
    "ModelUnavailable": (
        False,
        "point baseModel (or rl.rewardModel) at a reachable save_pretrained directory (path, pvc://, "
        "s3://), or give the cluster a hub mirror or cache for hubId",
    ),
    "DataError": (False, "fix the data the message names (path, format, filters) and apply the job again"),
    "ConfigError": (
        False,
        "fix the spec field the message names (forgeline validate shows every error) and apply again",
    ),
    "UserCodeError": (True, "the trainer raised: read the traceback in the Ray job's log and fix the cause"),
    "Stalled": (
        True,
        "nothing to change if it was a one-off hang; if it repeats, look for a stuck collective or data "
        "loader in the worker logs, or raise spec.watchdog.stallSeconds for a model with very slow steps",
    ),
    "PreflightFailed": (
        False,
        "fix what the named check on the named worker found (GPU, collective, storage permissions, "
        "data access) and apply the job again",
    ),
    "StorageError": (
        False,
        "make the checkpoint/output location the message names writable and give it free space "
        "(or point spec.checkpointing / spec.output elsewhere), then apply again: the job resumes "
        "from its newest complete checkpoint",
    ),
    "Unknown": (True, "read the Ray job's log"),
}

# Patterns in the log, first match wins: the specific causes come before the generic symptoms
# they also print (an OOM kill also kills the worker; a preempted node also loses its actors).
_PATTERNS: tuple[tuple[FailureReason, re.Pattern[str]], ...] = tuple(
    (reason, re.compile(pattern, re.IGNORECASE))
    for reason, pattern in (
        (
            "OOMKilled",
            # not "OOM killer": Ray's note on any raylet that died ("SIGKILL by the user or system
            # OOM killer") says the node is gone, not why (test_kube_faults: a raylet SIGKILLed)
            r"CUDA out of memory|torch\.(cuda\.)?OutOfMemoryError|OutOfMemoryError|oom[-_ ]kill(?!er)|"
            r"exit code 137|exited with code 137|memory monitor.*kill|Killed process \d+",
        ),
        (
            "Preempted",
            # not a bare SIGTERM: Ray logs "SIGTERM handler is not set ..." in healthy runs, and stops
            # workers with SIGTERM after any failure; the trainer declares a real preemption itself
            r"\bpreempted\b|spot (instance )?(interruption|reclaim)|node is draining|"
            r"instance is being terminated",
        ),
        (
            "NCCLTimeout",
            r"NCCL.*(timeout|timed out)|Watchdog caught collective operation timeout|"
            r"collective operation timeout|ProcessGroupNCCL.*timed out|gloo.*timed out",
        ),
        (
            "NodeLost",
            r"NodeDiedError|node .* (has )?died|node .* (is )?dead|raylet .* died|Raylet is terminated",
        ),
        (
            "WorkerLost",
            r"ActorDiedError|RayActorError|WorkerCrashedError|The actor died|actor .* died unexpectedly|"
            r"worker (process )?(died|crashed)",
        ),
        (
            "ModelUnavailable",
            r"couldn't connect to 'https?://huggingface\.co'|is not a local folder and is not a valid "
            r"model identifier|Repository Not Found|does not appear to have a file named|"
            r"(base|reward) ?model.*(not found|does not exist|missing)|"
            r"No such file or directory.*(model|config\.json)",
        ),
        ("StorageError", r"Unable to set up cluster storage"),  # Ray Train: not shared by every node
        (
            "DataError",
            r"spec\.(data|dataset|evaluation)[.:]|every (document|example|record) was filtered out|"
            r"make no full block|DataError|cannot read .*(jsonl|parquet)",
        ),
        ("ConfigError", r"invalid job config|forgeline-trainer: .*spec\.|ConfigError"),
    )
)
_SYMPTOMS = ("WorkerLost",)
"""Reasons whose log lines also appear as a consequence of other failures."""
_WRAPPER = re.compile(r"WorkerGroupError|ControllerError|TrainingFailedError|RayTaskError")
"""Ray Train's exceptions around the workers' own: never the root cause."""
_RAY_PREFIX = re.compile(r"^\((?:[^()]*\s)?pid=\d+[^)]*\)\s*|^\[Rank \d+[^\]]*\]:\s*")
"""`(RayTrainWorker pid=81, ip=10.0.0.3)` and `[Rank 0 worker]:` in front of forwarded lines."""
_RAY_DEDUP = re.compile(r"\s*\[repeated \d+x across cluster\].*$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# An exception line: `ValueError: ...`, `forgeline_trainer.runtime.InjectedFailure: ...`.
_EXCEPTION_LINE = re.compile(r"^(?:[a-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Failure|Interrupt)?: \S")
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\)", re.M)
_REDACT = (
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-]+"), r"\1[redacted]"),
    (
        re.compile(r"(?i)((?:token|secret|password|passwd|api[_-]?key|access[_-]?key)[\w-]*\s*[=:]\s*)\S+"),
        r"\1[redacted]",
    ),
    (re.compile(r"(?i)(://[^/\s:@]+:)[^@\s]+@"), r"\1[redacted]@"),
    (re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"), "[redacted]"),
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"), "[redacted]"),
)
MAX_DECISIVE_LINES = 5
MAX_LINE = 300
MAX_FIX = 1000
OWN_FIX = " — fix: "
"""How the trainer's errors name their own fix (`PreflightFailed`, `DataError`, ...)."""
NOT_RETRIED = "retrying cannot fix it"
"""decisions.GiveUp's `why` for a failure retrying cannot fix (not repeated in status.message)."""


@dataclass(frozen=True)
class Failure:
    reason: FailureReason
    message: str
    """One line: the decisive error, redacted."""
    fix: str
    retryable: bool
    """Whether another attempt can succeed without a change to the spec or the data."""
    counts_against_backoff: bool
    """False for preemption: a reclaimed node is not the job's fault."""
    decisive_lines: tuple[str, ...]
    """The few log lines that decided the reason (redacted, shortened)."""


def stalled(message: str) -> Failure:
    """The failure the watchdog declares when a job stops making steps."""
    retryable, fix = _NATURE["Stalled"]
    return Failure("Stalled", message, fix, retryable, True, (message,))


def cluster_deleted(cluster: str, checkpoints: str | None, pending: str | None = None) -> Failure:
    """The running job's RayCluster was deleted by someone else: the job stops (its checkpoints
    stay), since recreating it raced the old pods still draining under the same names and labels
    (tests/test_kube_faults.py: the resubmissions reached the old, draining head). `pending`: the
    deletion is not done (a finalizer holds the RayCluster; its Ray job was stopped)."""
    message = (
        f"RayCluster {cluster} was deleted before its job finished, not by Forgeline "
        "(kubectl delete raycluster, or a clean-up of the namespace)"
    )
    if pending:
        message += f"; it {pending.removeprefix(f'RayCluster {cluster} ')}, so Forgeline stopped its Ray job"
    kept = f"its checkpoints stay in {checkpoints}" if checkpoints else "its checkpoints stay in storage"
    fix = (
        f"{kept}: to go on from the newest, apply the job again (a new name) with "
        "spec.checkpointing.resumeFrom pointing at it; delete this job to remove it"
    )
    return Failure("ClusterLost", message, fix, False, True, (message,))


def cluster_lost(message: str) -> Failure:
    """The failure the operator declares when the job's Ray head is gone (unreachable past the
    bound, or its RayCluster deleted or unready)."""
    retryable, fix = _NATURE["ClusterLost"]
    return Failure("ClusterLost", message, fix, retryable, True, (redact(message),))


def failed_line(failure: Failure, why: str = NOT_RETRIED) -> str:
    """A failed job's one line (status.message and its Event; `forgeline run` prints the same):
    the reason, what failed and the fix; a used-up backoff limit is said after what failed."""
    message = failure.message if why == NOT_RETRIED else f"{failure.message} ({why})"
    return one_line(failure.reason, message, failure.fix)


def redact(text: str) -> str:
    """Tokens, keys, passwords and credentials in URLs replaced by [redacted]."""
    for pattern, replacement in _REDACT:
        text = pattern.sub(replacement, text)
    return text


def classify(error_record: dict[str, Any] | None, ray_message: str, log_tail: str) -> Failure:
    """The failure of one attempt. `error_record`: the trainer's own `error` progress record, if it
    wrote one (its `reason` wins); `ray_message`: Ray's job message; `log_tail`: the end of the log."""
    record = error_record or {}
    text = "\n".join(p for p in (str(record.get("message") or ""), ray_message, log_tail) if p)
    lines = [_clean(ln) for ln in _ANSI.sub("", text).splitlines()]
    lines = [ln for ln in lines if ln]
    declared = record.get("reason")
    if declared in FAILURE_REASONS:
        pattern = dict(_PATTERNS).get(declared)
        hits = [ln for ln in lines if pattern.search(ln)] if pattern else []
        return _failure(declared, hits or lines[:1], record)
    # Root causes first: the exceptions raised (not Ray Train's wrappers around them), then
    # evidence anywhere in the log. Actors die as a consequence of any failure, so "WorkerLost"
    # only wins where nothing else explains the failure.
    causes = [ln for ln in lines if _EXCEPTION_LINE.match(ln) and not _WRAPPER.search(ln)]
    causes = [ln for ln in causes if not _matches(ln, _SYMPTOMS)]
    for candidates in (causes, lines):
        for reason, pattern in _PATTERNS:
            hits = [ln for ln in candidates if pattern.search(ln)]
            if hits and reason not in _SYMPTOMS:
                return _failure(reason, hits, record)
    if causes:
        return _failure("UserCodeError", _exception_lines(lines, causes), record)
    for reason, pattern in _PATTERNS:
        hits = [ln for ln in lines if pattern.search(ln)]
        if hits:
            return _failure(reason, hits, record)
    if _TRACEBACK.search(text):
        return _failure("UserCodeError", lines[-2:], record)
    return _failure("Unknown", lines[-3:], record)


def _clean(line: str) -> str:
    """A log line without Ray's worker prefix and its deduplication note."""
    return _RAY_DEDUP.sub("", _RAY_PREFIX.sub("", line)).strip()


def _matches(line: str, reasons: tuple[str, ...]) -> bool:
    return any(pattern.search(line) for reason, pattern in _PATTERNS if reason in reasons)


def _exception_lines(lines: list[str], causes: list[str]) -> list[str]:
    """The last root-cause exception line, with the line above it (its frame's code)."""
    at = len(lines) - 1 - lines[::-1].index(causes[-1])
    return lines[max(0, at - 1) : at + 1]


def _one_line(text: str, reason: FailureReason) -> str:
    """The line of a (possibly long, cut) message that says what failed: the first one that names
    the reason, else the first. Ray's OutOfMemoryError runs to thousands of characters of memory
    tables after its first line; its last line, cut by the trainer at 1,000 characters, read
    '- objects u' (tests/test_kube_faults.py)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pattern = dict(_PATTERNS).get(reason)
    named = [ln for ln in lines if pattern and pattern.search(ln)]
    return (named or lines or [""])[0]


def in_pods(failure: Failure, worker_memory: str) -> Failure:
    """An OOMKilled failure on KubeRay says what the workers' memory limit was, and raising it is
    named by field (the trainer's own message names the bytes used of the limit where Ray saw it)."""
    if failure.reason != "OOMKilled" or "spec.resources.memory" in failure.fix:
        return failure
    fix = failure.fix.replace(
        "give the workers more memory",
        f"give the workers more memory than spec.resources.memory={worker_memory}",
    )
    return dataclasses.replace(failure, fix=fix)


def _failure(reason: FailureReason, decisive: list[str], record: dict[str, Any]) -> Failure:
    retryable, fix = _NATURE[reason]
    shown = tuple(redact(ln)[:MAX_LINE] for ln in decisive[-MAX_DECISIVE_LINES:])
    message = _one_line(redact(str(record.get("message") or "")), reason) or (shown[-1] if shown else "")
    message = message or "no error message"
    if OWN_FIX in message:  # the trainer named the fix for this very failure: it beats the generic one
        message, own = message.split(OWN_FIX, 1)
        fix = own.strip()[:MAX_FIX] or fix
    return Failure(
        reason=reason,
        message=message[:MAX_LINE],
        fix=fix,
        retryable=retryable,
        counts_against_backoff=reason != "Preempted",
        decisive_lines=shown,
    )
