"""kopf handlers: thin shells around `Reconciler`, registered for both job kinds.

- create: parse the spec once; an invalid spec ends as Failed/ValidationFailed (PermanentError),
  before anything is created.
- timer (every FORGELINE_RECONCILE_INTERVAL s, non-terminal jobs): one step of the state machine —
  admit (cap, dependencies) → provision (backend) → submit (Ray Jobs API) → track (status,
  progress, retries) — plus suspend/resume.
- timer (terminal jobs): TTL cleanup of the Ray cluster (and the job, if asked).
- delete (finalizer): stop the Ray job, then delete the cluster.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from . import builders, lifecycle, metrics
from .api import API_GROUP, API_VERSION, FieldError, FineTuneJob, InvalidJobError, TrainingJob, parse_job
from .api.jobconfig import build_job_config
from .backends import AddressBackend, Backend, ClusterState, KubeRayBackend, LocalBackend
from .rayjobs import TERMINAL_RAY_STATES, LogCursor, RayJobs
from .settings import OperatorSettings

log = logging.getLogger("forgeline")
SETTINGS = OperatorSettings()
KINDS = {"trainingjobs": TrainingJob, "finetunejobs": FineTuneJob}
ACTIVE_PHASES = frozenset({"Provisioning", "Running"})
# Phases that need a periodic reconcile. Terminal and Suspended jobs have no timer at all, so a
# thousand finished or parked jobs cost nothing but their watch events.
_TIMED = frozenset({"Pending", "Waiting", "Provisioning", "Running"})


@dataclass
class Runtime:
    """What the handlers share, set up once at startup."""

    settings: OperatorSettings
    backend: Backend
    api_client: Any = None
    local_ray: Any = None
    cursors: dict[str, LogCursor] = field(default_factory=dict)
    admitted: set[tuple[str, str, str]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


RUNTIME: Runtime | None = None


# -- startup / cleanup -------------------------------------------------------------------------


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global RUNTIME
    # Our CRDs' status is a strict schema: kopf keeps its bookkeeping in annotations instead.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="forgeline.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="forgeline.dev", key="last-handled-configuration"
    )
    # Our own Events mark every transition (kopf.event); kopf posts only its warnings and errors
    # (not a "Timer succeeded" Event per reconcile).
    settings.posting.level = logging.WARNING
    # Sync handlers run in a thread pool; this bounds concurrent reconciles (1,000 jobs are fine:
    # each reconcile is short, and terminal jobs have no timer).
    settings.execution.max_workers = 16
    # Re-list every 10 minutes so a missed watch event cannot strand a job.
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    # Exact namespaces (the chart's rbac.scope=namespaces): no cluster-wide list/watch of
    # namespaces and CRDs, which such an install has no permission for. Globs need the scan.
    watched = SETTINGS.namespaces()
    settings.scanning.disabled = bool(watched) and not any(set(n) & set("*?[!") for n in watched)
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    from kubernetes import client

    api_client = client.ApiClient()
    s = SETTINGS
    local = None
    backend: Backend
    if s.backend == "local":
        import sys

        from .localray import LocalRay

        local = LocalRay(num_cpus=s.local_num_cpus)
        local.start()
        backend = LocalBackend(local, sys.executable)
        log.info("embedded Ray head at %s", local.address)
    elif s.backend == "address":
        if not s.ray_address:
            raise kopf.PermanentError("FORGELINE_BACKEND=address needs FORGELINE_RAY_ADDRESS")
        backend = AddressBackend(s.ray_address, s.ray_token)
    else:
        backend = KubeRayBackend(api_client, s.default_trainer_image, kopf.adopt, s.node_pools)
    RUNTIME = Runtime(settings=s, backend=backend, api_client=api_client, local_ray=local)
    metrics.register_phase_source(_phase_counts)
    metrics.serve(s.metrics_port)
    log.info(
        "forgeline operator: backend=%s, cap=%s, metrics on :%d",
        s.backend,
        s.max_running_jobs or "none",
        s.metrics_port,
    )


@kopf.on.cleanup()
def shutdown(**_: Any) -> None:
    if RUNTIME is not None and RUNTIME.local_ray is not None:
        RUNTIME.local_ray.stop()


# -- index: every job's phase, for the cap, dependencies and metrics -----------------------------

_INDEX: dict[tuple[str, str, str], dict[str, Any]] = {}
_INDEX_LOCK = threading.Lock()


def _remember(kind: str, namespace: str, name: str, status: dict[str, Any], created: str) -> None:
    with _INDEX_LOCK:
        _INDEX[(namespace, kind, name)] = {
            "phase": status.get("phase") or "Pending",
            "outputUri": status.get("outputUri"),
            "created": created,
            "reason": status.get("reason"),
        }


def _forget(kind: str, namespace: str, name: str) -> None:
    with _INDEX_LOCK:
        _INDEX.pop((namespace, kind, name), None)


def _phase_counts() -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    with _INDEX_LOCK:
        for (_, kind, _), entry in _INDEX.items():
            key = (kind, entry["phase"])
            counts[key] = counts.get(key, 0) + 1
    return counts


# -- the state machine ---------------------------------------------------------------------------


class Reconciler:
    """One reconcile step for one job. Reads the typed job and its status, writes `patch.status`."""

    def __init__(
        self, rt: Runtime, job: TrainingJob | FineTuneJob, body: Any, patch: Any, namespace: str, logger: Any
    ) -> None:
        self.rt, self.job, self.body, self.patch, self.ns, self.logger = (
            rt,
            job,
            body,
            patch,
            namespace,
            logger,
        )
        self.status: dict[str, Any] = dict(body.get("status") or {})
        self.generation = body.get("metadata", {}).get("generation")
        self.kind = job.KIND
        # spec.ray.address names an existing Ray cluster for this job, whatever the operator's backend.
        self.backend = _backend_for(rt, job)

    # -- transitions --
    def move(self, phase: str, reason: str, message: str, **fields: Any) -> None:
        if not lifecycle.changed(self.status, phase, reason, message) and not fields:
            return
        before = self.status.get("phase")
        update = lifecycle.status_patch(self.status, phase, reason, message, self.generation, **fields)
        for k, v in update.items():
            self.patch.status[k] = v
        self.status.update(update)
        if before != phase:
            metrics.TRANSITIONS.labels(self.kind, phase).inc()
            kopf.event(
                self.body,
                type="Warning" if phase == "Failed" else "Normal",
                reason=reason,
                message=f"{before or 'New'} → {phase}: {message}",
            )
        _remember(
            self.kind,
            self.ns,
            self.job.metadata.name,
            self.status,
            self.body["metadata"].get("creationTimestamp", ""),
        )

    def step(self) -> None:
        phase = self.status.get("phase") or "Pending"
        spec = self.job.spec
        if spec.suspend and phase != "Suspended":
            return self.suspend()
        if phase == "Suspended":
            if not spec.suspend:
                self.move("Pending", "Resumed", "resumed: will continue from the newest checkpoint")
            return None
        if phase in ("Pending", "Waiting"):
            return self.admit()
        if phase == "Provisioning":
            return self.provision()
        if phase == "Running":
            return self.track()
        return None

    # -- Pending / Waiting --
    def admit(self) -> None:
        dep = self._dependency()
        if dep is not None:
            kind, name, entry = dep
            if entry is None or entry["phase"] != "Succeeded":
                if entry is not None and entry["phase"] == "Failed":
                    self.move(
                        "Failed",
                        "DependencyFailed",
                        f"{kind}/{name} failed ({entry.get('reason')}); this job uses its output",
                    )
                    return
                state = "does not exist yet" if entry is None else f"is {entry['phase']}"
                self.move("Waiting", "WaitingForJob", f"waiting for {kind}/{name} to succeed ({state})")
                return
        cap = self.rt.settings.max_running_jobs
        me = (self.ns, self.kind, self.job.metadata.name)
        with self.rt.lock:
            if cap:
                with _INDEX_LOCK:
                    active = {k for k, e in _INDEX.items() if e["phase"] in ACTIVE_PHASES} | self.rt.admitted
                    # Waiting jobs queue only once their dependencies are met (else a pipeline
                    # applied at once could block its own first stage).
                    queue = sorted(
                        (e["created"], k)
                        for k, e in _INDEX.items()
                        if e["phase"] == "Pending" and k not in active
                    )
                position = next((i for i, (_, k) in enumerate(queue) if k == me), len(queue))
                free = cap - len(active - {me})
                if me not in active and position >= free:
                    self.move(
                        "Pending",
                        "Queued",
                        f"waiting for a slot: {len(active)} of {cap} jobs running; "
                        f"position {position + 1 - max(free, 0)} in the queue",
                    )
                    return
            self.rt.admitted.add(me)
        self.move(
            "Provisioning",
            "Provisioning",
            f"creating the Ray cluster ({self.backend.name})",
            checkpointUri=self._config(0).paths.checkpoints,
            outputUri=self._config(0).paths.output,
        )

    def _dependency(self) -> tuple[str, str, dict[str, Any] | None] | None:
        refs = []
        src = self.job.spec.model.init_from if isinstance(self.job, TrainingJob) else self.job.spec.base_model
        if src is not None and src.from_job is not None:
            refs.append(src.from_job)
        if isinstance(self.job, FineTuneJob) and self.job.spec.rl and self.job.spec.rl.reward_model.from_job:
            refs.append(self.job.spec.rl.reward_model.from_job)
        for ref in refs:
            with _INDEX_LOCK:
                entry = _INDEX.get((self.ns, ref.kind, ref.name))
            if entry is None or entry["phase"] != "Succeeded":
                return ref.kind, ref.name, entry
        return None

    def _resolved(self, ref: Any) -> str | None:
        if ref is None or ref.from_job is None:
            return None
        with _INDEX_LOCK:
            entry = _INDEX.get((self.ns, ref.from_job.kind, ref.from_job.name))
        return entry.get("outputUri") if entry else None

    def _config(self, attempt: int) -> Any:
        job = self.job
        src = job.spec.model.init_from if isinstance(job, TrainingJob) else job.spec.base_model
        rm = job.spec.rl.reward_model if isinstance(job, FineTuneJob) and job.spec.rl else None
        work_dir = self.rt.settings.local_work_dir or (os.getcwd() if self.backend.name == "local" else None)
        fail_at = _fault_injection(self.body)
        return build_job_config(
            job,
            base_model=self._resolved(src),
            reward_model=self._resolved(rm),
            work_dir=work_dir,
            attempt=attempt,
            fail_at_step=fail_at,
            # an injected failure must fail the Ray job, not be absorbed by Ray Train
            max_worker_failures=0 if fail_at else 2,
        )

    # -- budget (spec.budget), checked while the job holds or waits for a cluster --
    def over_budget(self) -> bool:
        res = self.job.spec.resources
        why = lifecycle.budget_exceeded(
            self.job.spec.budget, res.workers, res.gpus_per_worker, self.status.get("startTime")
        )
        if why is None:
            return False
        self.stop_ray_job()
        self.backend.teardown(self.job, self.ns)
        self._release()
        self.move(
            "Failed",
            "BudgetExceeded",
            f"{why}: Ray job stopped and cluster deleted; checkpoints kept in "
            f"{self.status.get('checkpointUri') or 'storage'}",
        )
        return True

    # -- Provisioning --
    def provision(self) -> None:
        if self.over_budget():
            return
        state = self.backend.ensure(self.job, self.body, self.ns)
        ray_info = {
            "clusterName": state.cluster_name,
            "address": state.address,
            "dashboardUrl": state.address,
        }
        if not state.ready:
            waited = _age(self.status, "Provisioning")
            if waited > self.rt.settings.cluster_ready_timeout and isinstance(self.backend, KubeRayBackend):
                self.backend.teardown(self.job, self.ns)
                self.move(
                    "Provisioning",
                    "ClusterRecreated",
                    f"RayCluster not ready after {waited:.0f}s: deleted, recreating",
                )
                return
            self.move(
                "Provisioning", "ClusterStarting", state.message, ray={k: v for k, v in ray_info.items() if v}
            )
            return
        self.submit(state, attempt=int(self.status.get("restarts") or 0))

    def submit(self, state: ClusterState, attempt: int) -> None:
        sid = builders.submission_id(self.job, attempt)
        config = self._config(attempt)
        try:
            RayJobs(state.address, python=state.python, token=state.token).submit(config, sid)
        except Exception as exc:
            metrics.SUBMIT_ERRORS.labels(self.kind).inc()
            self.move(
                "Provisioning", "SubmissionFailed", f"submitting to Ray at {state.address} failed: {exc}"
            )
            raise kopf.TemporaryError(f"Ray submission failed: {exc}", delay=10) from exc
        fields: dict[str, Any] = {
            "ray": {
                k: v
                for k, v in {
                    "clusterName": state.cluster_name,
                    "address": state.address,
                    "dashboardUrl": state.address,
                    "jobId": sid,
                    "jobStatus": "PENDING",
                }.items()
                if v
            },
            "outputUri": config.paths.output,
            "checkpointUri": config.paths.checkpoints,
        }
        if not self.status.get("startTime"):
            fields["startTime"] = lifecycle.now()
        self.move(
            "Running",
            "Submitted" if attempt == 0 else "Resubmitted",
            f"Ray job {sid} submitted" + (f" (attempt {attempt + 1})" if attempt else ""),
            **fields,
        )

    # -- Running --
    def track(self) -> None:
        if self.over_budget():
            return
        ray = dict(self.status.get("ray") or {})
        sid = ray.get("jobId")
        state = self.backend.ensure(self.job, self.body, self.ns)
        if not state.ready:
            self.move(
                "Provisioning",
                "ClusterLost",
                f"the Ray cluster is gone or unready ({state.message}); "
                "recreating it and resubmitting from the newest checkpoint",
            )
            return
        jobs = RayJobs(state.address, python=state.python, token=state.token)
        ray_status = jobs.status(sid) if sid else None
        if ray_status is None:
            self.move("Provisioning", "RayJobLost", f"Ray has no job {sid}; resubmitting")
            return
        cursor = self.rt.cursors.setdefault(sid, LogCursor())
        cursor.feed(jobs.logs(sid))
        progress = cursor.latest.get("progress") or cursor.latest.get("done")
        fields: dict[str, Any] = {"ray": {**ray, "jobStatus": ray_status}}
        if progress:
            fields["progress"] = lifecycle.progress_from(progress, cursor.latest.get("eval"))
            metrics.relay_progress(self.ns, self.job.metadata.name, self.kind, fields["progress"])
        if ray_status == "SUCCEEDED":
            self.rt.cursors.pop(sid, None)
            self.move(
                "Succeeded",
                "Completed",
                f"training finished; model at {self.status.get('outputUri')}",
                **fields,
            )
            self._release()
            if self.job.spec.ttl_seconds_after_finished is None:
                self.backend.teardown(self.job, self.ns)
            return
        if ray_status in TERMINAL_RAY_STATES:  # FAILED or STOPPED
            error = cursor.latest.get("error", {}).get("message") or _last_error(jobs, sid)
            restarts = int(self.status.get("restarts") or 0)
            self.rt.cursors.pop(sid, None)
            if restarts < self.job.spec.backoff_limit:
                metrics.RESTARTS.labels(self.kind).inc()
                self.patch.status["restarts"] = restarts + 1
                self.status["restarts"] = restarts + 1
                kopf.event(
                    self.body,
                    type="Warning",
                    reason="RayJobFailed",
                    message=f"Ray job {sid} {ray_status}: {error}; resubmitting "
                    f"({restarts + 1}/{self.job.spec.backoff_limit})",
                )
                self.submit(state, attempt=restarts + 1)
                return
            self.move(
                "Failed",
                "BackoffLimitExceeded",
                f"Ray job {sid} {ray_status} after {restarts} resubmissions: {error}",
                **fields,
            )
            self._release()
            self.backend.teardown(self.job, self.ns)
            return
        if fields.get("progress") != self.status.get("progress") or ray_status != ray.get("jobStatus"):
            for k, v in fields.items():
                self.patch.status[k] = v

    # -- Suspended --
    def suspend(self) -> None:
        self.stop_ray_job()
        self.backend.teardown(self.job, self.ns)
        self._release()
        self.move(
            "Suspended",
            "Suspended",
            "Ray job stopped and cluster deleted; checkpoints kept in "
            f"{self.status.get('checkpointUri') or 'storage'}; set spec.suspend=false to resume",
        )

    def stop_ray_job(self) -> None:
        sid = (self.status.get("ray") or {}).get("jobId")
        if not sid or self.status.get("phase") not in ("Running", "Provisioning"):
            return
        state = (
            self.backend.ensure(self.job, self.body, self.ns)
            if not isinstance(self.backend, KubeRayBackend) or self.backend.exists(self.job, self.ns)
            else None
        )
        if state is None or not state.ready:
            return
        jobs = RayJobs(state.address, python=state.python, token=state.token)
        if (jobs.status(sid) or "STOPPED") in TERMINAL_RAY_STATES:
            return
        jobs.stop(sid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (jobs.status(sid) or "STOPPED") not in TERMINAL_RAY_STATES:
            time.sleep(0.5)  # bounded: a stop request takes a few seconds to land
        self.logger.info(f"stopped Ray job {sid}")

    def _release(self) -> None:
        with self.rt.lock:
            self.rt.admitted.discard((self.ns, self.kind, self.job.metadata.name))


def _backend_for(rt: Runtime, job: TrainingJob | FineTuneJob) -> Backend:
    """spec.ray.address names an existing Ray cluster for this job, whatever the operator's backend."""
    if job.spec.ray.address:
        return AddressBackend(job.spec.ray.address, rt.settings.ray_token)
    return rt.backend


def _age(status: dict[str, Any], phase: str) -> float:
    for c in status.get("conditions") or []:
        if c.get("type") == "ClusterReady" and status.get("phase") == phase:
            t = c.get("lastTransitionTime")
            if t:
                return (datetime.now(UTC) - datetime.fromisoformat(t.replace("Z", "+00:00"))).total_seconds()
    return 0.0


def _last_error(jobs: RayJobs, sid: str) -> str:
    try:
        info = jobs.info(sid)
        return (info.message or "").strip().splitlines()[-1][:500] if info.message else "no error message"
    except Exception:  # noqa: BLE001
        return "no error message"


def _fault_injection(body: Any) -> int | None:
    """Tests inject a trainer failure with this annotation (never set it in production)."""
    value = (body["metadata"].get("annotations") or {}).get("forgeline.dev/fail-at-step")
    return int(value) if value and value.isdigit() else None


# -- handler registration ----------------------------------------------------------------------


def _parse(body: Any, plural: str) -> TrainingJob | FineTuneJob:
    """The typed job, or InvalidJobError: the spec's own rules, then this operator's node pools."""
    manifest = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KINDS[plural].KIND,
        "metadata": dict(body["metadata"]),
        "spec": dict(body["spec"]),
    }
    job: TrainingJob | FineTuneJob = parse_job(manifest)  # type: ignore[assignment]
    pool = job.spec.resources.node_pool
    settings = RUNTIME.settings if RUNTIME else SETTINGS
    if (
        pool
        and pool not in settings.node_pools
        and settings.backend == "kuberay"
        and not job.spec.ray.address
    ):
        known = ", ".join(sorted(settings.node_pools)) or "none are configured"
        raise InvalidJobError(
            [
                FieldError(
                    "spec.resources.nodePool",
                    f"this cluster has no node pool '{pool}'",
                    f"use one of the operator's node pools ({known}; Helm value nodePools), or remove "
                    "nodePool and set resources.nodeSelector/tolerations",
                )
            ],
            job.metadata.name,
        )
    return job


def _fail_invalid(exc: InvalidJobError, body: Any, patch: Any, kind: str) -> None:
    message = "; ".join(f"{e.path}: {e.message}" + (f" (fix: {e.fix})" if e.fix else "") for e in exc.errors)
    status = dict(body.get("status") or {})
    for k, v in lifecycle.status_patch(
        status, "Failed", "ValidationFailed", message, body["metadata"].get("generation")
    ).items():
        patch.status[k] = v
    metrics.TRANSITIONS.labels(kind, "Failed").inc()
    kopf.event(body, type="Warning", reason="ValidationFailed", message=message[:1000])
    _remember(
        kind,
        body["metadata"]["namespace"],
        body["metadata"]["name"],
        {"phase": "Failed"},
        body["metadata"].get("creationTimestamp", ""),
    )
    raise kopf.PermanentError(f"invalid spec: {message}")


def _register(plural: str) -> None:
    kind = KINDS[plural].KIND

    @kopf.index(API_GROUP, API_VERSION, plural)
    def phases(name: str, namespace: str, status: Any, meta: Any, **_: Any) -> dict[str, Any]:
        _remember(kind, namespace, name, dict(status or {}), meta.get("creationTimestamp", ""))
        return {}

    @kopf.on.create(API_GROUP, API_VERSION, plural, id="admit")
    def on_create(body: Any, patch: Any, namespace: str, **_: Any) -> None:
        try:
            _parse(body, plural)
        except InvalidJobError as exc:
            _fail_invalid(exc, body, patch, kind)
        if not (body.get("status") or {}).get("phase"):
            status: dict[str, Any] = {}
            for k, v in lifecycle.status_patch(
                status,
                "Pending",
                "Accepted",
                "spec is valid; waiting to start",
                body["metadata"].get("generation"),
                restarts=0,
            ).items():
                patch.status[k] = v
            metrics.TRANSITIONS.labels(kind, "Pending").inc()
            _remember(
                kind,
                namespace,
                body["metadata"]["name"],
                {"phase": "Pending"},
                body["metadata"].get("creationTimestamp", ""),
            )

    @kopf.timer(
        API_GROUP,
        API_VERSION,
        plural,
        id="reconcile",
        interval=SETTINGS.reconcile_interval,
        initial_delay=0.5,
        sharp=False,
        when=lambda status, spec, **_: (
            (status or {}).get("phase") in _TIMED
            or ((status or {}).get("phase") == "Suspended" and not (spec or {}).get("suspend"))
        ),
    )
    def reconcile(body: Any, patch: Any, namespace: str, logger: Any, **_: Any) -> None:
        assert RUNTIME is not None
        started = time.perf_counter()
        try:
            try:
                job = _parse(body, plural)
            except InvalidJobError as exc:  # the spec was edited into an invalid one
                _fail_invalid(exc, body, patch, kind)
                return
            Reconciler(RUNTIME, job, body, patch, namespace, logger).step()
        except (kopf.TemporaryError, kopf.PermanentError):
            raise
        except Exception:
            metrics.RECONCILE_ERRORS.labels(kind).inc()
            raise
        finally:
            metrics.RECONCILE.labels(kind).observe(time.perf_counter() - started)

    @kopf.on.field(API_GROUP, API_VERSION, plural, field="spec.suspend", id="suspend")
    def on_suspend(body: Any, patch: Any, namespace: str, logger: Any, new: Any, **_: Any) -> None:
        assert RUNTIME is not None
        phase = (body.get("status") or {}).get("phase")
        if not new or phase in (None, "Suspended", "Succeeded", "Failed"):
            return  # resuming is the reconcile timer's job (it runs again for a Suspended job)
        try:
            job = _parse(body, plural)
        except InvalidJobError:
            return
        Reconciler(RUNTIME, job, body, patch, namespace, logger).suspend()

    @kopf.timer(
        API_GROUP,
        API_VERSION,
        plural,
        id="ttl",
        interval=5,
        initial_delay=1,
        when=lambda status, spec, **_: (
            (status or {}).get("phase") in ("Succeeded", "Failed")
            and (spec or {}).get("ttlSecondsAfterFinished") is not None
        ),
    )
    def ttl(body: Any, namespace: str, status: Any, spec: Any, logger: Any, **_: Any) -> None:
        assert RUNTIME is not None
        done = status.get("completionTime")
        if not done:
            return
        age = (datetime.now(UTC) - datetime.fromisoformat(done.replace("Z", "+00:00"))).total_seconds()
        if age < spec["ttlSecondsAfterFinished"]:
            return
        job = _parse(body, plural)
        _backend_for(RUNTIME, job).teardown(job, namespace)
        if spec.get("deleteJobAfterTtl"):
            from kubernetes import client

            client.CustomObjectsApi(RUNTIME.api_client).delete_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, plural, body["metadata"]["name"]
            )
            logger.info("TTL expired: job and Ray cluster deleted")

    @kopf.on.delete(API_GROUP, API_VERSION, plural, id="finalize")
    def on_delete(body: Any, patch: Any, namespace: str, logger: Any, **_: Any) -> None:
        assert RUNTIME is not None
        metrics.forget_job(namespace, body["metadata"]["name"], kind)
        _forget(kind, namespace, body["metadata"]["name"])
        try:
            job = _parse(body, plural)
        except InvalidJobError:
            return  # nothing was ever created for it
        rec = Reconciler(RUNTIME, job, body, patch, namespace, logger)
        rec.stop_ray_job()
        rec._release()
        rec.backend.teardown(job, namespace)


for _plural in KINDS:
    _register(_plural)
