"""One reconcile of one job: ask `decisions` what to do, carry it out, write status.

    Pending → (Waiting) → Provisioning → Running → Succeeded | Failed;  any non-terminal → Suspended

`StatusWriter.transition` is the only writer of a phase change (status, the transitions metric, the
Event, the job index); `Reconciler` holds the typed job and runs the step `decisions.next_action`
names: admit (dependencies, cap) → provision (backend) → submit (Ray Jobs API) → track (progress,
retries) — plus suspend and resume.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import kopf

from ..api import Job, promotion
from ..api.common import JobRef
from ..api.jobconfig import FineTuneJobConfig, TrainingJobConfig, build_job_config
from ..api.quantities import cpu_cores
from ..rayclient.rayjobs import TERMINAL_RAY_STATES, LogCursor, RayJobs, RayUnreachable
from . import builders, costs, decisions, failures, goodput, lifecycle, logarchive, metrics
from .backends import Backend, ClusterState, KubeRayBackend
from .jobindex import JobKey
from .runtime import Runtime

_LOG_TAIL_CHARS = 64 * 1024  # the end of a failed attempt's log, for classifying it
_COST_REFRESH_SECONDS = 30.0  # status.cost moves with the clock: rewritten at most this often on its own


class StatusWriter:
    """A job's status within one handler call: read once from the body, written through kopf's
    patch, and kept up to date here so later decisions in the same call see what was written."""

    def __init__(self, rt: Runtime, body: kopf.Body, patch: kopf.Patch, kind: str) -> None:
        self.rt, self.body, self.patch, self.kind = rt, body, patch, kind
        self.status: dict[str, Any] = dict(body.get("status") or {})
        meta = body["metadata"]
        self.key = JobKey(meta["namespace"], kind, meta["name"])
        self.generation: int | None = meta.get("generation")
        self.created: str = meta.get("creationTimestamp", "")
        self.chips: tuple[float, str] | None = None
        """The job's chips and their unit (goodput's chip-hours), once its spec has parsed."""

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")

    def write(self, fields: dict[str, Any]) -> None:
        """Patch status fields that are not a phase change (progress, restarts)."""
        for key, value in fields.items():
            self.patch.status[key] = value
        self.status.update(fields)
        if isinstance(fields.get("goodput"), dict) and "seconds" in fields["goodput"]:
            metrics.relay_goodput(self.key.namespace, self.key.name, self.kind, fields["goodput"])

    def goodput(
        self, g: dict[str, Any] | None = None, running: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """status.goodput as it stands now (`g`: bookkeeping just changed), with the split of the
        attempt that runs; the bookkeeping alone before the spec has parsed."""
        g = dict(self.status.get("goodput") or {}) if g is None else g
        if self.chips is None:
            return g
        return goodput.summary(g, datetime.now(UTC), *self.chips, running=running)

    def transition(self, phase: str, reason: str, message: str, **fields: Any) -> None:
        """Move to `phase` (or update reason/message within it): status with conditions and
        timestamps, the transitions metric and an Event on a phase change, and the job index.

        No Event for a new job's acceptance (New → Pending): the status shows it, and an Event
        per job would double the apiserver writes of a burst of a thousand jobs."""
        if not lifecycle.changed(self.status, phase, reason, message) and not fields:
            return
        before = self.phase
        clock = goodput.on_transition(
            self.status.get("goodput"), phase, reason, datetime.now(UTC), self.created or None
        )
        if "goodput" not in fields and (
            clock is not None or (phase != before and lifecycle.is_terminal(phase))
        ):
            g = self.goodput(clock)
            if g:
                fields = {**fields, "goodput": g}
        self.write(lifecycle.status_patch(self.status, phase, reason, message, self.generation, **fields))
        if before != phase:
            metrics.TRANSITIONS.labels(self.kind, phase).inc()
            if before is not None or phase != "Pending":
                kopf.event(
                    self.body,
                    type="Warning" if phase == "Failed" else "Normal",
                    reason=reason,
                    message=f"{before or 'New'} → {phase}: {message}"[:1000],
                )
        self.rt.index.record(self.key, self.status, self.created)

    def condition(self, ctype: str, status: str, reason: str, message: str, warn_when: str = "False") -> None:
        """Set a condition outside the phase table (Fits, BudgetAtRisk), with a Warning Event when
        it flips to `warn_when`."""
        previous = list(self.status.get("conditions") or [])
        conditions = lifecycle.set_condition(previous, ctype, status, reason, message, self.generation)
        if conditions is None:
            return
        was = next((c.get("status") for c in previous if c.get("type") == ctype), None)
        self.write({"conditions": conditions})
        if status == warn_when and was != status:
            kopf.event(self.body, type="Warning", reason=reason, message=message[:1000])


class Reconciler:
    """One reconcile step for one typed job."""

    def __init__(self, rt: Runtime, job: Job, writer: StatusWriter, logger: kopf.Logger) -> None:
        self.rt, self.job, self.out, self.logger = rt, job, writer, logger
        self.backend: Backend = rt.backend_for(job)
        res = job.spec.resources
        writer.chips = goodput.chips_of(res.workers, res.gpus_per_worker, cpu_cores(res.cpu))

    @property
    def status(self) -> dict[str, Any]:
        return self.out.status

    def step(self) -> None:
        action = decisions.next_action(self.out.phase, self.job.spec.suspend)
        if action == "suspend":
            self.suspend()
        elif action == "resume":
            self.out.transition("Pending", "Resumed", "resumed: will continue from the newest checkpoint")
        elif action == "admit":
            self.admit()
        elif action == "provision":
            self.provision()
        elif action == "track":
            self.track()

    # -- Pending / Waiting ---------------------------------------------------------------------

    def admit(self) -> None:
        upstream = []
        for ref, field in self.job.upstream_fields():
            entry = self.rt.index.get(JobKey(self.out.key.namespace, ref.kind, ref.name))
            upstream.append(
                decisions.Upstream(
                    ref.kind,
                    ref.name,
                    entry.phase if entry else None,
                    entry.reason if entry else None,
                    entry.promoted if entry else None,
                    entry.promotion_message if entry else "",
                    field,
                    ref.allow_unpromoted,
                )
            )
        deps = decisions.dependencies(upstream)
        if isinstance(deps, decisions.UpstreamFailed):
            return self.out.transition("Failed", "DependencyFailed", deps.message)
        if isinstance(deps, decisions.UpstreamNotPromoted):
            return self.out.transition("Failed", "UpstreamNotPromoted", deps.message)
        if isinstance(deps, decisions.WaitForJob):
            return self.out.transition("Waiting", "WaitingForJob", deps.message)
        verdict = self.rt.index.admit(self.out.key, self.rt.settings.max_running_jobs)
        if isinstance(verdict, decisions.Queued):
            return self.out.transition("Pending", "Queued", verdict.message)
        paths = self._config(0).paths
        timings = self.status.get("timings") or {"admittedAt": lifecycle.now(precise=True)}
        self.out.transition(
            "Provisioning",
            "Provisioning",
            f"creating the Ray cluster ({self.backend.name})",
            checkpointUri=paths.checkpoints,
            outputUri=paths.output,
            ray=_requested(clusterUid=None),  # admitted (again): whatever cluster it had is not its
            timings=timings,
        )
        return None

    def _output_of(self, ref: JobRef) -> str | None:
        entry = self.rt.index.get(JobKey(self.out.key.namespace, ref.kind, ref.name))
        return entry.output_uri if entry else None

    def _config(self, attempt: int) -> TrainingJobConfig | FineTuneJobConfig:
        """The trainer's config for an attempt, with `fromJob` resolved to those jobs' outputs."""
        job, settings = self.job, self.rt.settings
        base, reward = job.model_source(), job.reward_model_source()
        work_dir = self._work_dir()
        notes, allowed = job.metadata.annotations, settings.allow_fault_injection
        fail_at = decisions.injected_failure_step(notes, allowed)
        hang_at = decisions.injected_failure_step(notes, allowed, decisions.HANG_ANNOTATION)
        return build_job_config(
            job,
            base_model=self._output_of(base.from_job) if base and base.from_job else None,
            reward_model=self._output_of(reward.from_job) if reward and reward.from_job else None,
            adapters=[self._output_of(a.from_job) if a.from_job else None for a in job.adapter_sources()],
            work_dir=work_dir,
            attempt=attempt,
            fail_at_step=fail_at,
            hang_at_step=hang_at,
            # a lost or preempted worker group fails the Ray job, not a restart inside it that
            # status never shows: the operator resubmits (from the newest checkpoint, on the same
            # cluster once KubeRay has replaced the pod) and says why in status.lastFailure, with
            # preemptions counted apart from spec.backoffLimit
            max_worker_failures=0,
            trainer_image=(job.spec.resources.image or settings.default_trainer_image)
            if isinstance(self.backend, KubeRayBackend)
            else None,
            mlflow_default=settings.mlflow_tracking_uri,
        )

    def _work_dir(self) -> str | None:
        """What relative paths in the spec resolve against (local runs; the trainer's cwd else)."""
        return self.rt.settings.work_dir(self.backend.name)

    # -- budget (spec.budget), checked while the job holds or waits for a cluster ---------------

    def over_budget(self) -> bool:
        res = self.job.spec.resources
        why = decisions.budget_exceeded(
            self.job.spec.budget, res.workers, res.gpus_per_worker, self.status.get("startTime")
        )
        if why is None:
            return False
        self._close_attempt(self._cursor(), "BudgetExceeded")
        self._stop_and_release()
        kept = self.status.get("checkpointUri") or "storage"
        message = f"{why}: Ray job stopped and cluster deleted; checkpoints kept in {kept}"
        self.out.transition("Failed", "BudgetExceeded", message, **self._cost({}, finished=True))
        return True

    def _cost(self, fields: dict[str, Any], *, finished: bool = False, force: bool = True) -> dict[str, Any]:
        """status.cost now (and the BudgetAtRisk condition, the cost metrics), as fields to write;
        {} for CPU jobs, jobs not started yet, and (force=False) a cost written less than
        _COST_REFRESH_SECONDS ago."""
        res, at = self.job.spec.resources, datetime.now(UTC)
        progress = fields.get("progress") or self.status.get("progress") or {}
        eta = None if finished else progress.get("etaSeconds")
        start = self.status.get("startTime")
        cost = costs.live(
            res.workers * res.gpus_per_worker,
            self.rt.settings.price_for(res.node_pool),
            self.rt.settings.currency,
            start,
            eta,
            at,
            finished=finished,
        )
        if cost is None:
            return {}
        key = self.out.key
        metrics.relay_cost(key.namespace, key.name, key.kind, cost)
        if self.job.spec.budget is not None and not finished:
            risk = costs.budget_at_risk(self.job.spec.budget, cost, start, eta, at)
            if risk:
                self.out.condition("BudgetAtRisk", "True", "ProjectedOverBudget", risk, warn_when="True")
            elif eta is not None:
                self.out.condition(
                    "BudgetAtRisk", "False", "WithinBudget", "projected to finish within spec.budget"
                )
        last = (self.status.get("cost") or {}).get("updatedAt")
        if not force and last and (at - decisions.parse_time(last)).total_seconds() < _COST_REFRESH_SECONDS:
            return {}
        return {"cost": cost.status(lifecycle.now())}

    # -- Provisioning ---------------------------------------------------------------------------

    def provision(self) -> None:
        if self.over_budget():
            return
        # a RayCluster this job was given (status.ray.clusterUid) is not made again: gone now, a
        # person deleted it (Forgeline forgets the uid when it deletes the cluster itself)
        given = (self.status.get("ray") or {}).get("clusterUid")
        state = self.backend.ensure(self.job, self.out.body, self.out.key.namespace, create=not given)
        if state.missing:
            self._deleted_by_someone(state)
            return
        if state.queued:  # Kueue's queue time is no provisioning time
            self.out.transition("Provisioning", "QueuedByKueue", state.message, ray=_ray_info(state))
            return
        admitted = self.status.get("reason") == "QueuedByKueue"
        if state.ready:
            self.submit(state, attempt=self._attempt())
            return
        waited = 0.0 if admitted else decisions.seconds_provisioning(self.status, datetime.now(UTC))
        recreatable = isinstance(self.backend, KubeRayBackend)
        if decisions.cluster_overdue(waited, self.rt.settings.cluster_ready_timeout, recreatable):
            # never ready, so no Ray job ran on it: its pods go at once and the new one can start
            self.backend.teardown(self.job, self.out.key.namespace, ended=True)
            message = f"RayCluster not ready after {waited:.0f}s: deleted, recreating"
            self.out.transition("Provisioning", "ClusterRecreated", message, ray=_requested(clusterUid=None))
            return
        ray = {**_ray_info(state), **(_requested() if admitted else {})}
        self.out.transition("Provisioning", "ClusterStarting", state.message, ray=ray)

    def submit(self, state: ClusterState, attempt: int) -> None:
        sid = builders.submission_id(self.job, attempt)
        config = self._config(attempt)
        try:
            self.rt.ray_jobs(state.address, state.python, state.token).submit(config, sid)
        except RayUnreachable as exc:
            self._unreachable(exc)
            return
        except Exception as exc:  # any failure to reach Ray is retried (kopf, after the delay)
            metrics.SUBMIT_ERRORS.labels(self.out.kind).inc()
            self.out.transition(
                "Provisioning", "SubmissionFailed", f"submitting to Ray at {state.address} failed: {exc}"
            )
            raise kopf.TemporaryError(f"Ray submission failed: {exc}", delay=10) from exc
        fields: dict[str, Any] = {
            "ray": _ray_info(state, jobId=sid, jobStatus="PENDING", submittedAt=lifecycle.now(precise=True)),
            "outputUri": config.paths.output,
            "checkpointUri": config.paths.checkpoints,
        }
        if not self.status.get("startTime"):
            fields["startTime"] = lifecycle.now()
        self.out.transition(
            "Running",
            "Submitted" if attempt == 0 else "Resubmitted",
            f"Ray job {sid} submitted" + (f" (attempt {attempt + 1})" if attempt else ""),
            **fields,
        )

    # -- Running --------------------------------------------------------------------------------

    def track(self) -> None:
        if self.over_budget():
            return
        ray = dict(self.status.get("ray") or {})
        sid = ray.get("jobId")
        state = self.backend.ensure(self.job, self.out.body, self.out.key.namespace, create=False)
        if state.missing:  # the job ran on it: someone else deleted it (Forgeline deletes finished jobs')
            self._deleted_by_someone(state)
            return
        replaced = decisions.head_replaced(ray.get("headPod"), state.head)
        if replaced:
            self._cluster_lost(replaced)
            return
        if not state.ready:
            self._cluster_lost(f"the Ray cluster is gone or unready ({state.message})")
            return
        try:
            jobs = self.rt.ray_jobs(state.address, state.python, state.token)
            ray_status = jobs.status(sid) if sid else None
            log = jobs.logs(sid) if ray_status is not None else ""
        except RayUnreachable as exc:
            self._unreachable(exc)
            return
        if ray_status is None:
            self._cluster_lost(f"Ray has no job {sid}: its head restarted and forgot it, or it was deleted")
            return
        if ray.get("unreachableSince"):
            ray["unreachableSince"] = None  # a null in kopf's merge patch deletes the field
            message = f"the Ray head at {state.address} answers again"
            self.out.transition("Running", "Reconnected", message, ray=ray)
        cursor = self.rt.cursors.setdefault(sid, LogCursor())
        self._first_step(cursor.feed(log))
        self._archive(log, cursor)
        fields = self._progress_fields(cursor, {**ray, "jobStatus": ray_status})
        if ray_status == "SUCCEEDED":
            self._succeeded(sid, {**fields, **self._cost(fields, finished=True)})
        elif ray_status in TERMINAL_RAY_STATES:  # FAILED or STOPPED
            self._failed(state, jobs, sid, ray_status, cursor, log, fields)
        elif self._stalled(state, jobs, sid, cursor, fields):
            return
        else:
            changed = fields.get("progress") != self.status.get("progress")
            changed = changed or ray_status != ray.get("jobStatus")
            fields.update(self._cost(fields, force=changed))
            if changed or "cost" in fields:
                split = self._attempt_split(cursor)
                running = goodput.running_record(self._attempt(), split, datetime.now(UTC))
                fields["goodput"] = self.out.goodput(running=running)
                self.out.write(fields)

    def _deleted_by_someone(self, state: ClusterState) -> None:
        """The job's RayCluster is gone, or being deleted, and Forgeline did not delete it: the job
        fails (not retried: a cluster made again under the same name raced the old pods, still
        draining) and says so; a Ray job that a finalizer's hold keeps running is stopped first."""
        sid = (self.status.get("ray") or {}).get("jobId")
        if state.deleting and sid:
            self._stop_on(state, sid)
        cursor = self.rt.cursors.get(sid or "") or LogCursor()
        pending, kept = state.message if state.deleting else None, self.status.get("checkpointUri")
        failure = failures.cluster_deleted(state.cluster_name or "", kept, pending)
        self._after_failure(None, sid or "(none)", "lost", failure, cursor, {})

    def _attempt_split(self, cursor: LogCursor, stalled_since: float | None = None) -> dict[str, Any]:
        """The current attempt's time by category, to now (goodput.split). An operator that never
        read this attempt's log (it restarted, and the attempt ended first) has only the split its
        predecessor last wrote (status.goodput.running): that, with the time since as `other`."""
        ray, g = self.status.get("ray") or {}, self.status.get("goodput") or {}
        sid = ray.get("jobId")
        if sid and sid not in self.rt.cursors:
            parts = goodput.carried(g.get("running"), self._attempt(), datetime.now(UTC))
            if parts is not None:
                return parts
        at = datetime.now(UTC).timestamp()
        attempt = goodput.Attempt(
            submitted=goodput.epoch(ray.get("submittedAt")) or at,
            ended=at,
            first=cursor.first_progress,
            last=cursor.last_ledger,
            furthest_before=int(g.get("furthestStep") or 0),
            stalled_since=stalled_since,
            reached=int((cursor.latest.get("checkpoint") or {}).get("step") or 0),
        )
        return goodput.split(attempt)

    def _close_attempt(self, cursor: LogCursor, ended_by: str, stalled_since: float | None = None) -> None:
        """The running attempt has ended: its split joins status.goodput's totals (once: only
        while the job is Running on a submitted Ray job)."""
        if self.out.phase != "Running" or not (self.status.get("ray") or {}).get("submittedAt"):
            return
        parts = self._attempt_split(cursor, stalled_since)
        g = goodput.close_attempt(self.status.get("goodput"), self._attempt(), parts, ended_by)
        self.out.write({"goodput": self.out.goodput(g)})

    def _first_step(self, records: list[dict[str, Any]]) -> None:
        """status.timings and the start-up metrics, once, from the first progress record (its
        own time stamp: the reconcile interval does not blur it)."""
        timings = dict(self.status.get("timings") or {})
        first = next((r for r in records if r.get("type") == "progress"), None)
        if first is None or timings.get("firstStepAt"):
            return
        stamp = first.get("time")
        at = datetime.fromtimestamp(stamp, UTC) if isinstance(stamp, (int, float)) else datetime.now(UTC)
        split = decisions.startup_timings(
            self.out.created, timings.get("admittedAt"), self.status.get("startTime"), at
        )
        self.out.write({"timings": {**timings, **split}})
        metrics.observe_startup(self.out.kind, split)

    def _archive(self, log: str, cursor: LogCursor) -> None:
        """Keep the attempt's log where `forgeline logs` finds it after the cluster is gone
        (logarchive), and point to it in status.logs."""
        if len(log) == cursor.archived:
            return
        attempt, settings, key = self._attempt(), self.rt.settings, self.out.key
        uri = logarchive.location(
            attempt,
            (key.namespace, key.kind, key.name),
            self.status.get("checkpointUri"),
            settings.log_archive,
            self._work_dir(),
            local_paths=self.backend.name in ("local", "address"),
        )
        cursor.archived = len(log)
        if uri is None:
            return
        try:
            logarchive.write(uri, log, settings.log_archive_bytes)
        except OSError as exc:  # the job goes on; the live log is still in Ray
            self.logger.warning(f"could not archive the Ray job log to {uri}: {exc}")
            return
        entries = list(self.status.get("logs") or [])
        if not any(e.get("attempt") == attempt for e in entries):
            self.out.write({"logs": [*entries, {"attempt": attempt, "uri": uri}]})

    def _unreachable(self, exc: RayUnreachable) -> None:
        """The Ray head does not answer: wait it out for FORGELINE_CLUSTER_LOST_SECONDS (the clock
        in status.ray.unreachableSince), then count the attempt as lost."""
        ray = dict(self.status.get("ray") or {})
        bound, now = self.rt.settings.cluster_lost_seconds, datetime.now(UTC)
        since = ray.get("unreachableSince")
        if decisions.cluster_lost(since, now, bound):
            waited = decisions.ray_unreachable_for(since, now)
            self._cluster_lost(f"{exc} for {waited:.0f}s (FORGELINE_CLUSTER_LOST_SECONDS={bound:g})")
            return
        ray["unreachableSince"] = since or lifecycle.now()
        message = f"{exc}; waiting up to {bound:g}s for it to answer before counting the attempt as lost"
        self.out.transition(self.out.phase or "Running", "RayUnreachable", message, ray=ray)

    def _cluster_lost(self, message: str) -> None:
        """The attempt's Ray cluster is gone: a ClusterLost failure, resubmitted through
        Provisioning (which waits for a cluster that answers) or, past the backoff limit, Failed."""
        sid = (self.status.get("ray") or {}).get("jobId") or "(none)"
        cursor = self.rt.cursors.get(sid) or LogCursor()
        self._after_failure(None, sid, "lost", failures.cluster_lost(message), cursor, {})

    def _progress_fields(self, cursor: LogCursor, ray: dict[str, Any]) -> dict[str, Any]:
        """status.ray and, once the trainer has reported, status.progress (also relayed to metrics)."""
        fields: dict[str, Any] = {"ray": ray}
        record = cursor.latest.get("progress") or cursor.latest.get("done")
        if record:
            previous = self.status.get("progress")
            fields["progress"] = lifecycle.progress_from(
                record, cursor.latest.get("eval"), previous, cursor.latest.get("baseline")
            )
            key = self.out.key
            metrics.relay_progress(key.namespace, key.name, key.kind, fields["progress"])
        return fields

    def _succeeded(self, sid: str, fields: dict[str, Any]) -> None:
        cursor = self.rt.cursors.get(sid) or LogCursor()
        self._close_attempt(cursor, "Succeeded")
        self.rt.cursors.pop(sid, None)
        record = (cursor.latest.get("done") or {}).get("lineage")
        if isinstance(record, dict):  # the output's lineage record, as the trainer summarised it
            fields = {**fields, "lineage": record}
        self._promote(fields.get("progress") or self.status.get("progress") or {})
        self.out.transition(
            "Succeeded", "Completed", f"training finished; model at {self.status.get('outputUri')}", **fields
        )
        self.rt.index.release(self.out.key)
        if self.job.spec.ttl_seconds_after_finished is None:
            self.backend.teardown(self.job, self.out.key.namespace, ended=True)

    def _promote(self, progress: dict[str, Any]) -> None:
        """spec.promotion's gate on the finished job's evals before and after training: the
        Promoted condition (a Warning Event when it is False) and status.promotion."""
        gate = self.job.spec.promotion
        if gate is None:
            return
        verdict = promotion.decide(gate, progress.get("evalBaseline"), progress.get("evalMetrics"))
        status = "True" if verdict.promoted else "False"
        self.out.condition("Promoted", status, verdict.reason, verdict.message, warn_when="False")
        self.out.write({"promotion": verdict.status()})

    def _failed(
        self,
        state: ClusterState,
        jobs: RayJobs,
        sid: str,
        ray_status: str,
        cursor: LogCursor,
        log: str,
        fields: dict[str, Any],
    ) -> None:
        """The Ray job ended FAILED or STOPPED: classify why, then act on it."""
        failure = failures.classify(cursor.latest.get("error"), jobs.message(sid), log[-_LOG_TAIL_CHARS:])
        if self.backend.name == "kuberay":  # the workers' memory is the pods' limit
            failure = failures.in_pods(failure, str(self.job.spec.resources.memory))
        self._after_failure(state, sid, ray_status, failure, cursor, fields)

    def _stalled(
        self, state: ClusterState, jobs: RayJobs, sid: str, cursor: LogCursor, fields: dict[str, Any]
    ) -> bool:
        """The watchdog: a running attempt without steps for too long is stopped and handled as a
        Stalled failure."""
        progress = fields.get("progress") or self.status.get("progress")
        submitted = (self.status.get("ray") or {}).get("submittedAt")
        why = decisions.stall(self.job.spec.watchdog, submitted, progress, datetime.now(UTC))
        if why is None:
            return False
        final = jobs.stop_and_wait(sid)
        self.logger.warning(f"watchdog: {why}; stopped Ray job {sid} ({final})")
        self._after_failure(state, sid, final, failures.stalled(why), cursor, fields)
        return True

    def _after_failure(
        self,
        state: ClusterState | None,
        sid: str,
        ray_status: str,
        failure: failures.Failure,
        cursor: LogCursor,
        fields: dict[str, Any],
    ) -> None:
        """Record the failed attempt, then resubmit it or fail the job, as `decisions` says.
        `state` None: the cluster is gone, so the resubmission goes through Provisioning."""
        stalled = (fields.get("progress") or self.status.get("progress") or {}).get("stepAdvancedAt")
        since = None
        if failure.reason == "Stalled":
            since = goodput.epoch(stalled or (self.status.get("ray") or {}).get("submittedAt"))
        self._close_attempt(cursor, failure.reason, since)
        self.rt.cursors.pop(sid, None)
        metrics.FAILURES.labels(self.out.kind, failure.reason).inc()
        verdict = decisions.after_failure(
            int(self.status.get("restarts") or 0), self.job.spec.backoff_limit, failure
        )
        last = self._last_failure(failure, cursor, retried=isinstance(verdict, decisions.Resubmit))
        if isinstance(verdict, decisions.Resubmit):
            self._count_resubmission(sid, ray_status, failure, verdict, last)
            if state is not None:
                self.submit(state, attempt=self._attempt())
                return
            message = f"{failure.message}; resubmitting from the newest checkpoint once a Ray cluster answers"
            self.out.transition("Provisioning", "ClusterLost", message, ray=_requested(unreachableSince=None))
            return
        self.out.transition(
            "Failed",
            verdict.reason,
            failures.failed_line(failure, verdict.why),
            lastFailure=last,
            **{**fields, **self._cost(fields, finished=True)},
        )
        self.rt.index.release(self.out.key)
        # a cluster lost or deleted by someone may still run the Ray job: its pods keep their grace
        ended = ray_status in TERMINAL_RAY_STATES
        self.backend.teardown(self.job, self.out.key.namespace, ended=ended)

    def _count_resubmission(
        self,
        sid: str,
        ray_status: str,
        failure: failures.Failure,
        verdict: decisions.Resubmit,
        last: dict[str, Any],
    ) -> None:
        """restarts (or preemptions) + 1, status.lastFailure, and a RayJobFailed Event."""
        counter = "restarts" if verdict.counted else "preemptions"
        count = int(self.status.get(counter) or 0) + 1
        if verdict.counted:
            metrics.RESTARTS.labels(self.out.kind).inc()
        self.out.write({counter: count, "lastFailure": last})
        limit = self.job.spec.backoff_limit
        budget = f"{count}/{limit}" if verdict.counted else "a preemption: not counted in spec.backoffLimit"
        kopf.event(
            self.out.body,
            type="Warning",
            reason="RayJobFailed",
            message=f"Ray job {sid} {ray_status} ({failure.reason}): {failure.message}; "
            f"resubmitting ({budget})"[:1000],
        )

    def _last_failure(self, failure: failures.Failure, cursor: LogCursor, retried: bool) -> dict[str, Any]:
        """status.lastFailure for this attempt."""
        # the furthest step the attempt is known to have reached: its newest progress record, or
        # a checkpoint written after it (a preemption's, at the step the drain stopped it)
        steps = [(cursor.latest.get(kind) or {}).get("step") for kind in ("progress", "checkpoint")]
        known = [s for s in steps if isinstance(s, (int, float))]
        step = max(known) if known else None
        last = {
            "reason": failure.reason,
            "attempt": self._attempt(),
            "step": int(step) if isinstance(step, (int, float)) else None,
            "time": lifecycle.now(),
            "message": failure.message,
            "fix": failure.fix or None,
            "logLines": list(failure.decisive_lines),
            "retried": retried,
        }
        return {k: v for k, v in last.items() if v is not None}

    def _cursor(self) -> LogCursor:
        """The current Ray job's log cursor (an empty one when this operator has not read it)."""
        return self.rt.cursors.get((self.status.get("ray") or {}).get("jobId") or "") or LogCursor()

    def _attempt(self) -> int:
        """The current attempt: every resubmission so far, counted or not."""
        return int(self.status.get("restarts") or 0) + int(self.status.get("preemptions") or 0)

    # -- Suspended, deleted -----------------------------------------------------------------------

    def suspend(self) -> None:
        self._close_attempt(self._cursor(), "Suspended")
        self._stop_and_release()
        kept = self.status.get("checkpointUri") or "storage"
        self.out.transition(
            "Suspended",
            "Suspended",
            f"Ray job stopped and cluster deleted; checkpoints kept in {kept}; "
            "set spec.suspend=false to resume",
            ray={"clusterUid": None},  # Forgeline deleted it: resuming makes a new one
        )

    def finalize(self) -> None:
        """The job is being deleted: stop its Ray job, free its slot, delete its cluster."""
        self._stop_and_release()

    def _stop_and_release(self) -> None:
        ended = self.stop_ray_job()
        self.backend.teardown(self.job, self.out.key.namespace, ended=ended)
        self.rt.index.release(self.out.key)

    def stop_ray_job(self) -> bool:
        """Stop the job's current Ray job, if it has one that may still run; whether it has
        ended (False: it may still be running, e.g. writing a checkpoint, so its pods keep their
        grace period)."""
        sid = (self.status.get("ray") or {}).get("jobId")
        if not sid or self.out.phase not in decisions.ACTIVE_PHASES:
            return True
        namespace = self.out.key.namespace
        if isinstance(self.backend, KubeRayBackend) and not self.backend.exists(self.job, namespace):
            return True
        state = self.backend.ensure(self.job, self.out.body, namespace)
        if state.ready or state.deleting:
            return self._stop_on(state, sid)
        return True  # a cluster still starting runs no Ray job

    def _stop_on(self, state: ClusterState, sid: str) -> bool:
        """Stop Ray job `sid` on the cluster `state` describes (also one being deleted, whose pods
        a finalizer may keep running); whether it has ended."""
        if state.address is None:
            return False
        try:
            final = self.rt.ray_jobs(state.address, state.python, state.token).stop_and_wait(sid)
        except RayUnreachable as exc:  # gone, or only out of reach: its pods keep their grace
            self.logger.warning(f"Ray job {sid} not stopped: {exc}")
            return False
        self.logger.info(f"stopped Ray job {sid} ({final})")
        return final in TERMINAL_RAY_STATES


def _requested(**extra: str | None) -> dict[str, str | None]:
    """status.ray's clock for the cluster-ready timeout, started now."""
    return {"clusterRequestedAt": lifecycle.now(), **extra}


def _ray_info(state: ClusterState, **extra: str) -> dict[str, str]:
    """status.ray: the cluster and Jobs API address (the dashboard serves both), without empties."""
    info = {
        "clusterName": state.cluster_name,
        "address": state.address,
        "dashboardUrl": state.address,
        "headPod": state.head,
        "clusterUid": state.uid,
        **extra,
    }
    return {k: v for k, v in info.items() if v}
