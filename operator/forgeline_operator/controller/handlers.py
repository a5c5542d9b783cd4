"""kopf handlers: thin shells that parse the job once and hand it to `Reconciler`.

`registry(settings)` registers them for both job kinds in a fresh kopf registry, which
`python -m forgeline_operator` runs with a `Runtime` as the memo:

- index: every job's phase into `Runtime.index` (kopf's indexing stage sees every existing job
  before any other handler runs, so the cap and dependencies are right after a restart);
- create: an invalid spec ends as Failed/ValidationFailed (PermanentError) before anything exists;
- timer (non-terminal jobs, every FORGELINE_RECONCILE_INTERVAL s): one `Reconciler.step`;
- field spec.suspend: suspend at once; timer (terminal jobs): TTL clean-up;
- delete (finalizer): stop the Ray job, then delete the cluster.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any, NoReturn

import kopf

from ..api import (
    API_GROUP,
    API_VERSION,
    TERMINAL_PHASES,
    FieldError,
    FineTuneJob,
    InvalidJobError,
    Job,
    TrainingJob,
    parse_job,
)
from . import decisions, fitcheck, metrics, storagepolicy
from .jobindex import JobKey
from .reconciler import Reconciler, StatusWriter
from .runtime import Runtime
from .settings import OperatorSettings

KINDS: dict[str, type[TrainingJob] | type[FineTuneJob]] = {
    "trainingjobs": TrainingJob,
    "finetunejobs": FineTuneJob,
}


def registry(settings: OperatorSettings) -> kopf.OperatorRegistry:
    """A kopf registry with the login, startup and cleanup handlers and both kinds' job handlers."""
    reg = kopf.OperatorRegistry()
    # Credentials as the kubernetes client finds them: the in-cluster ServiceAccount or KUBECONFIG
    # (kopf's default registry adds this itself; an explicit registry has to ask for it).
    kopf.on.login(registry=reg)(kopf.login_via_client)
    kopf.on.startup(registry=reg)(_configure)
    kopf.on.cleanup(registry=reg)(_shutdown)
    for plural, cls in KINDS.items():
        _JobHandlers(plural, cls.KIND).register(reg, settings)
    return reg


def _configure(settings: kopf.OperatorSettings, memo: Runtime, **_: Any) -> None:
    # Our CRDs' status is a strict schema: kopf keeps its bookkeeping in annotations instead.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="forgeline.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="forgeline.dev", key="last-handled-configuration"
    )
    # Our own Events mark every transition; kopf posts only its warnings and errors (not a
    # "Timer succeeded" Event per reconcile).
    settings.posting.level = logging.WARNING
    # Sync handlers run in a thread pool; this bounds concurrent reconciles (1,000 jobs are fine:
    # each reconcile is short, and terminal jobs have no timer).
    settings.execution.max_workers = 16
    # A deleted job waits for its timers (the reconcile, the TTL) to stop before its finalizer goes.
    # A timer still running when the deletion arrives was re-checked only every 60 s (kopf's
    # default): the TTL timer deletes the job from inside itself, so such a job lingered a minute
    # after its TTL (and a job deleted mid-reconcile did too). Wait up to 1 s for the timer to
    # finish (a reconcile step is shorter), then poll every 2 s.
    settings.background.instant_exit_timeout = 1.0
    settings.background.cancellation_polling = 2
    # Re-list every 10 minutes so a missed watch event cannot strand a job.
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    # Exact namespaces (the chart's rbac.scope=namespaces): no cluster-wide list/watch of
    # namespaces and CRDs, which such an install has no permission for. Globs need the scan.
    watched = memo.settings.namespaces()
    settings.scanning.disabled = bool(watched) and not any(set(n) & set("*?[!") for n in watched)
    try:
        memo.connect(kopf.adopt)
    except ValueError as exc:
        raise kopf.PermanentError(str(exc)) from exc


def _shutdown(memo: Runtime, **_: Any) -> None:
    memo.close()


def _parse(body: kopf.Body, kind: str, settings: OperatorSettings) -> Job:
    """The typed job, or InvalidJobError: the spec's own rules, then this operator's (credentials
    only on clusters it creates, its node pools, its storage prefixes)."""
    manifest = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": kind,
        "metadata": dict(body["metadata"]),
        "spec": dict(body["spec"]),
    }
    job: Job = parse_job(manifest)  # type: ignore[assignment]
    errors = [*_credential_errors(job, settings), *_node_pool_errors(job, settings)]
    errors += _storage_errors(job, settings)
    if errors:
        raise InvalidJobError(errors, job.metadata.name)
    return job


def _creates_clusters(job: Job, settings: OperatorSettings) -> bool:
    return settings.backend == "kuberay" and not job.spec.ray.address


def _credential_errors(job: Job, settings: OperatorSettings) -> list[FieldError]:
    if not job.spec.credentials or _creates_clusters(job, settings):
        return []
    return [
        FieldError(
            "spec.credentials",
            "this job runs on an existing Ray cluster, whose pods Forgeline does not create, "
            "so it cannot hand them Secrets",
            "give that Ray cluster's pods the variables (or an IAM role) and remove "
            "spec.credentials, or run the job on a RayCluster of its own (no spec.ray.address)",
        )
    ]


def _node_pool_errors(job: Job, settings: OperatorSettings) -> list[FieldError]:
    pool = job.spec.resources.node_pool
    if not pool or not _creates_clusters(job, settings) or pool in settings.node_pools:
        return []
    known = ", ".join(sorted(settings.node_pools)) or "none are configured"
    return [
        FieldError(
            "spec.resources.nodePool",
            f"this cluster has no node pool '{pool}'",
            f"use one of the operator's node pools ({known}; Helm value nodePools), or remove "
            "nodePool and set resources.nodeSelector/tolerations",
        )
    ]


def _storage_errors(job: Job, settings: OperatorSettings) -> list[FieldError]:
    """Output and checkpoints inside FORGELINE_STORAGE_PREFIXES (after resolving `..`)."""
    prefixes, errors = settings.allowed_storage(), []
    work_dir = settings.work_dir(settings.backend)
    for path, uri in (
        ("spec.output.uri", job.spec.output.uri),
        ("spec.checkpointing.storage", job.spec.checkpointing.storage),
    ):
        where = storagepolicy.outside(uri, prefixes, work_dir) if uri else None
        if where is not None:
            errors.append(
                FieldError(
                    path,
                    f"{uri[:200]!r} resolves to {where[:200]!r}, outside the storage this operator "
                    f"allows ({', '.join(prefixes)})",
                    "write under one of those prefixes (FORGELINE_STORAGE_PREFIXES; ask the platform "
                    "team to add one)",
                )
            )
    return errors


def _check_fit(job: Job, out: StatusWriter, settings: OperatorSettings) -> None:
    """The Fits condition, for each new generation of the spec (a Warning Event when it does not fit)."""
    conditions = out.status.get("conditions") or []
    current = next((c for c in conditions if c.get("type") == fitcheck.CONDITION), None)
    if current is not None and current.get("observedGeneration") == out.generation:
        return
    found = fitcheck.verdict(job, settings)
    out.condition(fitcheck.CONDITION, found.status, found.reason, found.message)


def _fail_invalid(exc: InvalidJobError, out: StatusWriter) -> NoReturn:
    message = "; ".join(f"{e.path}: {e.message}" + (f" (fix: {e.fix})" if e.fix else "") for e in exc.errors)
    out.transition("Failed", "ValidationFailed", message)
    raise kopf.PermanentError(f"invalid spec: {message}")


class _JobHandlers:
    """The handlers of one job kind (TrainingJob or FineTuneJob)."""

    def __init__(self, plural: str, kind: str) -> None:
        self.plural, self.kind = plural, kind

    def register(self, reg: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
        resource = (API_GROUP, API_VERSION, self.plural)
        kopf.index(*resource, id="phases", registry=reg)(self.index)
        kopf.on.create(*resource, id="admit", registry=reg)(self.on_create)
        kopf.timer(
            *resource,
            id="reconcile",
            registry=reg,
            interval=settings.reconcile_interval,
            initial_delay=0.5,
            sharp=False,
            when=lambda status, spec, **_: decisions.needs_reconcile(
                (status or {}).get("phase"), bool((spec or {}).get("suspend"))
            ),
        )(self.reconcile)
        kopf.on.field(*resource, field="spec.suspend", id="suspend", registry=reg)(self.on_suspend)
        kopf.timer(
            *resource,
            id="ttl",
            registry=reg,
            interval=5,
            initial_delay=1,
            when=lambda status, spec, **_: (
                (status or {}).get("phase") in TERMINAL_PHASES
                and (spec or {}).get("ttlSecondsAfterFinished") is not None
            ),
        )(self.ttl)
        kopf.on.delete(*resource, id="finalize", registry=reg)(self.on_delete)

    def index(self, body: kopf.Body, memo: Runtime, **_: Any) -> None:
        """Keeps `memo.index` (read outside handlers by the cap and the metrics scrape); kopf's own
        index stays empty — this handler is here for kopf's guarantee that it sees every job first."""
        meta = body["metadata"]
        key = JobKey(meta["namespace"], self.kind, meta["name"])
        status = body.get("status") or {}
        memo.index.record(key, status, meta.get("creationTimestamp", ""))
        if isinstance(status.get("goodput"), dict) and "seconds" in status["goodput"]:
            metrics.relay_goodput(key.namespace, key.name, self.kind, status["goodput"])  # after a restart

    def on_create(
        self, body: kopf.Body, patch: kopf.Patch, memo: Runtime, logger: kopf.Logger, **_: Any
    ) -> None:
        """Validate, set Fits, and admit at once: a job with its dependencies met and a free slot
        goes to Provisioning in this one status patch (the reconcile timer then creates its cluster);
        one created suspended waits in Pending for the timer to suspend it."""
        out = StatusWriter(memo, body, patch, self.kind)
        try:
            job = _parse(body, self.kind, memo.settings)
        except InvalidJobError as exc:
            _fail_invalid(exc, out)
        _check_fit(job, out, memo.settings)
        if out.phase:
            return
        if job.spec.suspend:
            out.transition("Pending", "Accepted", "spec is valid; created suspended", restarts=0)
            return
        out.write({"restarts": 0})
        Reconciler(memo, job, out, logger).admit()

    def reconcile(
        self, body: kopf.Body, patch: kopf.Patch, memo: Runtime, logger: kopf.Logger, **_: Any
    ) -> None:
        started = time.perf_counter()
        out = StatusWriter(memo, body, patch, self.kind)
        try:
            try:
                job = _parse(body, self.kind, memo.settings)
            except InvalidJobError as exc:  # the spec was edited into an invalid one
                _fail_invalid(exc, out)
            if out.phase not in TERMINAL_PHASES:
                _check_fit(job, out, memo.settings)
            Reconciler(memo, job, out, logger).step()
        except (kopf.TemporaryError, kopf.PermanentError):
            raise
        except Exception:
            metrics.RECONCILE_ERRORS.labels(self.kind).inc()
            raise
        finally:
            metrics.RECONCILE.labels(self.kind).observe(time.perf_counter() - started)

    def on_suspend(
        self, body: kopf.Body, patch: kopf.Patch, memo: Runtime, logger: kopf.Logger, new: Any, **_: Any
    ) -> None:
        out = StatusWriter(memo, body, patch, self.kind)
        if not new or out.phase is None or out.phase == "Suspended" or out.phase in TERMINAL_PHASES:
            return  # resuming is the reconcile timer's job (it runs again for a Suspended job)
        try:
            job = _parse(body, self.kind, memo.settings)
        except InvalidJobError:
            return
        Reconciler(memo, job, out, logger).suspend()

    def ttl(self, body: kopf.Body, memo: Runtime, logger: kopf.Logger, **_: Any) -> None:
        try:
            job = _parse(body, self.kind, memo.settings)
        except InvalidJobError:
            return  # failed validation: nothing was ever created for it
        status = body.get("status") or {}
        ttl = job.spec.ttl_seconds_after_finished
        if ttl is None or not decisions.ttl_expired(status.get("completionTime"), ttl, datetime.now(UTC)):
            return
        namespace = body["metadata"]["namespace"]
        memo.backend_for(job).teardown(job, namespace, ended=True)  # TTL: the job has finished
        if job.spec.delete_job_after_ttl:
            from kubernetes import client

            client.CustomObjectsApi(memo.api_client).delete_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, self.plural, job.metadata.name
            )
            logger.info("TTL expired: job and Ray cluster deleted")

    def on_delete(
        self, body: kopf.Body, patch: kopf.Patch, memo: Runtime, logger: kopf.Logger, **_: Any
    ) -> None:
        out = StatusWriter(memo, body, patch, self.kind)
        metrics.forget_job(out.key.namespace, out.key.name, self.kind)
        memo.index.forget(out.key)
        try:
            job = _parse(body, self.kind, memo.settings)
        except InvalidJobError:
            return  # nothing was ever created for it
        Reconciler(memo, job, out, logger).finalize()
