"""Every choice the operator makes, as pure functions of plain values — no Kubernetes, Ray or kopf.

The reconciler asks these and carries out the answer; `tests/test_decisions.py` pins each rule
without a cluster, and the end-to-end tests only prove the wiring (the way dask-kubernetes keeps
`retire_workers_lifo` apart from its handlers).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from ..api import TERMINAL_PHASES
from .failures import NOT_RETRIED, Failure

ACTIVE_PHASES = frozenset({"Provisioning", "Running"})
"""Phases that hold a slot of the running-jobs cap."""
TIMED_PHASES = frozenset({"Pending", "Waiting", "Provisioning", "Running"})
"""Phases that need a periodic reconcile. Terminal and Suspended jobs have no timer, so a thousand
finished or parked jobs cost nothing but their watch events."""
FAULT_INJECTION_ANNOTATION = "forgeline.dev/fail-at-step"
HANG_ANNOTATION = "forgeline.dev/hang-at-step"

# -- which step of the state machine ---------------------------------------------------------------

Action = Literal["suspend", "resume", "admit", "provision", "track"]
_ACTIONS: dict[str, Action] = {
    "Pending": "admit",
    "Waiting": "admit",
    "Provisioning": "provision",
    "Running": "track",
}


def next_action(phase: str | None, suspend: bool) -> Action | None:
    """What one reconcile of a job in `phase` does (None: nothing, e.g. a terminal job)."""
    phase = phase or "Pending"
    if phase in TERMINAL_PHASES:
        return None
    if phase == "Suspended":
        return None if suspend else "resume"
    if suspend:
        return "suspend"
    return _ACTIONS.get(phase)


def needs_reconcile(phase: str | None, suspend: bool) -> bool:
    """Whether the reconcile timer runs for a job (the timer's `when` filter)."""
    return phase in TIMED_PHASES or (phase == "Suspended" and not suspend)


# -- dependencies (fromJob) ---------------------------------------------------------------------


@dataclass(frozen=True)
class DependenciesMet:
    pass


@dataclass(frozen=True)
class WaitForJob:
    kind: str
    name: str
    phase: str | None  # None: the job does not exist (yet)

    @property
    def message(self) -> str:
        state = "does not exist yet" if self.phase is None else f"is {self.phase}"
        return f"waiting for {self.kind}/{self.name} to succeed ({state})"


@dataclass(frozen=True)
class UpstreamFailed:
    kind: str
    name: str
    reason: str | None

    @property
    def message(self) -> str:
        return f"{self.kind}/{self.name} failed ({self.reason}); this job uses its output"


@dataclass(frozen=True)
class UpstreamNotPromoted:
    kind: str
    name: str
    why: str
    """The upstream's Promoted condition: `Reason: message`."""
    field: str
    """Where this job names it (the allowUnpromoted to set)."""

    @property
    def message(self) -> str:
        return (
            f"{self.kind}/{self.name} succeeded but its output was not promoted ({self.why}); this job "
            f"trains from it: set {self.field}.allowUnpromoted: true to use it anyway"
        )


@dataclass(frozen=True)
class Upstream:
    """A job this one uses, as the job index last saw it."""

    kind: str
    name: str
    phase: str | None  # None: the job does not exist (yet)
    reason: str | None = None
    promoted: str | None = None  # its Promoted condition: True, False, or None (no gate)
    promotion: str = ""
    field: str = "spec.baseModel.fromJob"
    allow_unpromoted: bool = False


def dependencies(
    upstream: Sequence[Upstream],
) -> DependenciesMet | WaitForJob | UpstreamFailed | UpstreamNotPromoted:
    """The jobs this one uses, in order. The first that has not succeeded decides: failed → this
    job fails too; else it waits. One that succeeded with its output not promoted fails this job,
    unless this job's reference allows that."""
    for up in upstream:
        if up.phase == "Succeeded":
            if up.promoted == "False" and not up.allow_unpromoted:
                return UpstreamNotPromoted(up.kind, up.name, up.promotion, up.field)
            continue
        if up.phase == "Failed":
            return UpstreamFailed(up.kind, up.name, up.reason)
        return WaitForJob(up.kind, up.name, up.phase)
    return DependenciesMet()


# -- the running-jobs cap -----------------------------------------------------------------------


@dataclass(frozen=True)
class Admitted:
    pass


@dataclass(frozen=True)
class Queued:
    position: int
    """1-based place in the queue of Pending jobs, after the free slots."""
    active: int
    cap: int

    @property
    def message(self) -> str:
        """Stable while the queue moves, so a thousand queued jobs do not each rewrite their
        status at every admission: the exact place among the first 10, then only the power-of-two
        band (over 10, 20, 40, ... ahead), and not the running count, which flickers."""
        return f"waiting for one of {self.cap} slots; {self.place}"

    @property
    def place(self) -> str:
        if self.position <= 10:
            return f"position {self.position} in the queue"
        band = 10
        while band * 2 < self.position:
            band *= 2
        return f"over {band} jobs ahead in the queue"


def admission(
    jobs: Mapping[Hashable, tuple[str, str]], admitted: Set[Hashable], me: Hashable, cap: int
) -> Admitted | Queued:
    """May job `me` start? `jobs`: every job's (phase, creationTimestamp); `admitted`: jobs let in
    that do not show an active phase yet. First come, first served among Pending jobs; `cap` 0
    means no cap. Waiting jobs (dependencies unmet) are not in the queue, so a pipeline applied at
    once cannot block its own first stage."""
    if not cap:
        return Admitted()
    active = {k for k, (phase, _) in jobs.items() if phase in ACTIVE_PHASES} | set(admitted)
    if me in active:
        return Admitted()
    queue = sorted((created, str(k), k) for k, (phase, created) in jobs.items() if phase == "Pending")
    queue_keys = [k for _, _, k in queue if k not in active]
    position = queue_keys.index(me) if me in queue_keys else len(queue_keys)
    free = cap - len(active)
    if position < free:
        return Admitted()
    return Queued(position=position + 1 - max(free, 0), active=len(active), cap=cap)


# -- failures and retries -----------------------------------------------------------------------


@dataclass(frozen=True)
class Resubmit:
    counted: bool
    """Whether this resubmission counts against spec.backoffLimit (preemptions do not)."""


@dataclass(frozen=True)
class GiveUp:
    reason: str
    """The job's Failed reason: the failure's own."""
    why: str
    """Why no retry: retrying cannot fix it, or the backoff limit is used up."""


def after_failure(restarts: int, backoff_limit: int, failure: Failure) -> Resubmit | GiveUp:
    """An attempt failed with `failure` after `restarts` counted resubmissions. Retry only what
    retrying can fix: OOM, data, model and config errors fail at once (the message says what to
    change); a preemption is resubmitted without counting against spec.backoffLimit."""
    if not failure.retryable:
        return GiveUp(failure.reason, NOT_RETRIED)
    if not failure.counts_against_backoff:
        return Resubmit(counted=False)
    if restarts < backoff_limit:
        return Resubmit(counted=True)
    return GiveUp(failure.reason, f"spec.backoffLimit ({backoff_limit}) resubmissions used")


def ray_unreachable_for(unreachable_since: str | None, at: datetime) -> float:
    """Seconds the job's Ray Jobs API has not answered (status.ray.unreachableSince; 0 if it has)."""
    return (at - parse_time(unreachable_since)).total_seconds() if unreachable_since else 0.0


def cluster_lost(unreachable_since: str | None, at: datetime, bound: float) -> bool:
    """A Ray head that has not answered for `bound` seconds (FORGELINE_CLUSTER_LOST_SECONDS) is
    lost: its jobs and drivers with it. Shorter outages (a head restarting, a network blip) are
    waited out."""
    return unreachable_since is not None and ray_unreachable_for(unreachable_since, at) >= bound


def head_replaced(submitted_on: str | None, head_now: str | None) -> str | None:
    """Why the current Ray job is gone when KubeRay's head pod is no longer the one it was
    submitted to (a deleted or failed head is recreated under a new name: a new GCS, which knows
    no earlier job without GCS fault tolerance), else None. Said at once, not after the
    unreachable bound (tests/test_kube_faults.py measures both)."""
    if not submitted_on or not head_now or submitted_on == head_now:
        return None
    return (
        f"the Ray head pod {submitted_on} was replaced by {head_now} (KubeRay recreates a deleted "
        "or failed head; the new head's Ray knows none of the old one's jobs)"
    )


def stall(
    watchdog: Any, submitted_at: str | None, progress: Mapping[str, Any] | None, at: datetime
) -> str | None:
    """Why the current attempt counts as stalled (a message naming the field), or None.

    Before its first step the attempt has spec.watchdog.startupDeadlineSeconds from its
    submission; after it, no step may take longer than stallSeconds — and never less than 10×
    the observed seconds per step. `progress` is status.progress (stepAdvancedAt,
    secondsPerStep); a step seen before this submission belongs to an earlier attempt."""
    if not watchdog.enabled or not submitted_at:
        return None
    submitted = parse_time(submitted_at)
    advanced = (progress or {}).get("stepAdvancedAt")
    if advanced is None or parse_time(advanced) < submitted:
        waited = (at - submitted).total_seconds()
        if waited <= watchdog.startup_deadline_seconds:
            return None
        return (
            f"no optimizer step {waited:.0f}s after submission, over "
            f"spec.watchdog.startupDeadlineSeconds ({watchdog.startup_deadline_seconds}s)"
        )
    idle = (at - parse_time(advanced)).total_seconds()
    per_step = float((progress or {}).get("secondsPerStep") or 0.0)
    limit = max(float(watchdog.stall_seconds), 10 * per_step)
    if idle <= limit:
        return None
    return (
        f"no optimizer step for {idle:.0f}s, over {limit:.0f}s (spec.watchdog.stallSeconds "
        f"{watchdog.stall_seconds}s, at least 10× the {per_step:.2f}s per step seen)"
    )


def cluster_overdue(waited_seconds: float, timeout_seconds: float, recreatable: bool) -> bool:
    """A Ray cluster still not ready after the timeout is deleted and created again — only where
    the operator created it (KubeRay), never an existing cluster named by address."""
    return recreatable and waited_seconds > timeout_seconds


# -- time ---------------------------------------------------------------------------------------


def startup_timings(
    created: str, admitted: str | None, submitted: str | None, first_step: datetime
) -> dict[str, Any]:
    """status.timings once the first optimizer step is seen: the time from `kubectl apply` to it,
    split into waiting for a slot (creation → admission), getting a Ray cluster and submitting
    (admission → first submission) and the trainer's own start-up (submission → first step)."""
    start = parse_time(created)
    admitted_at = parse_time(admitted) if admitted else start
    # startTime is written to the second: never before the (millisecond) admission
    submitted_at = max(parse_time(submitted), admitted_at) if submitted else admitted_at
    return {
        "firstStepAt": first_step.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "timeToFirstStepSeconds": round(max((first_step - start).total_seconds(), 0.0), 2),
        "queuedSeconds": round(max((admitted_at - start).total_seconds(), 0.0), 2),
        "provisioningSeconds": round(max((submitted_at - admitted_at).total_seconds(), 0.0), 2),
        "startupSeconds": round(max((first_step - submitted_at).total_seconds(), 0.0), 2),
    }


def parse_time(timestamp: str) -> datetime:
    """A Kubernetes timestamp (`2026-01-02T03:04:05Z`) as an aware datetime."""
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def seconds_provisioning(status: Mapping[str, Any], at: datetime) -> float:
    """How long the current Ray cluster has been requested and not ready: since
    status.ray.clusterRequestedAt (set when the cluster is requested, recreated, lost, or admitted
    by Kueue) — not since the job was created, so time queued for a slot never counts."""
    requested = (status.get("ray") or {}).get("clusterRequestedAt")
    if requested:
        return (at - parse_time(requested)).total_seconds()
    return seconds_since_cluster_ready_changed(status, at)  # status written before the field existed


def seconds_since_cluster_ready_changed(status: Mapping[str, Any], at: datetime) -> float:
    """Seconds since the ClusterReady condition last flipped (0 when there is none): how long a
    Provisioning job has been without a ready cluster."""
    for cond in status.get("conditions") or []:
        if cond.get("type") == "ClusterReady" and cond.get("lastTransitionTime"):
            return (at - parse_time(cond["lastTransitionTime"])).total_seconds()
    return 0.0


def ttl_expired(completion_time: str | None, ttl_seconds: int, at: datetime) -> bool:
    """spec.ttlSecondsAfterFinished has passed since the job finished."""
    return bool(completion_time) and (at - parse_time(completion_time)).total_seconds() >= ttl_seconds


def budget_exceeded(
    budget: Any, workers: int, gpus_per_worker: int, start_time: str | None, at: datetime | None = None
) -> str | None:
    """Why a job is over its spec.budget (a message naming the field), or None. Wall-clock time
    since status.startTime, so retries count; GPU-hours are what the job holds allocated."""
    if budget is None or not start_time:
        return None
    at = at or datetime.now(UTC)
    elapsed = (at - parse_time(start_time)).total_seconds()
    deadline = budget.active_deadline_seconds
    if deadline is not None and elapsed > deadline:
        return f"ran {elapsed:.0f}s since it started, over spec.budget.activeDeadlineSeconds ({deadline}s)"
    gpu_hours = workers * gpus_per_worker * elapsed / 3600
    if budget.max_gpu_hours is not None and gpu_hours > budget.max_gpu_hours:
        return (
            f"used {gpu_hours:.2f} GPU-hours ({workers} workers × {gpus_per_worker} GPUs × "
            f"{elapsed / 3600:.2f} h), over spec.budget.maxGpuHours ({budget.max_gpu_hours:g})"
        )
    return None


# -- test hooks ---------------------------------------------------------------------------------


def injected_failure_step(
    annotations: Mapping[str, str], allowed: bool, annotation: str = FAULT_INJECTION_ANNOTATION
) -> int | None:
    """The step at which tests make the trainer fail (annotation `forgeline.dev/fail-at-step`) or
    hang (`forgeline.dev/hang-at-step`), honoured only by an operator started with
    FORGELINE_ALLOW_FAULT_INJECTION=true."""
    value = annotations.get(annotation)
    if not allowed or not value or not value.isdigit():
        return None
    return int(value)
