"""Where a job's Ray runs. Every backend answers the same two questions — is a Ray cluster
ready for this job, and at which Jobs API address with which token — so one submit-and-track
path (rayjobs.RayJobs) serves them all.

- KubeRayBackend: a RayCluster per job (builders.build_ray_cluster), owned by the job; ready when
  KubeRay reports it ready; address from the RayCluster's status (head service IP and dashboard
  port), falling back to the head Service's DNS name.
- AddressBackend: an existing Ray cluster (spec.ray.address, or the operator's default address).
- LocalBackend: an embedded Ray head started with the operator (tests, demo, laptops).
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..api import Job
from ..rayclient.localray import LocalRay
from . import builders
from .settings import NodePool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterState:
    ready: bool
    address: str | None = None
    token: str | None = None
    cluster_name: str | None = None
    message: str = ""
    python: str | None = None  # interpreter for the trainer entrypoint (local: this venv's)
    queued: bool = False  # waiting for Kueue to admit (unsuspend) the RayCluster
    missing: bool = False  # there is no RayCluster and the call was not to create one
    head: str | None = None  # KubeRay: the head pod's name (a new name: the head was recreated)
    deleting: bool = False  # KubeRay: the RayCluster has a deletionTimestamp (finalizers hold it)
    uid: str | None = None  # KubeRay: the RayCluster's uid (None: not read, or just created)


class Backend(Protocol):
    name: str

    def ensure(self, job: Job, body: Mapping[str, Any], namespace: str, create: bool = True) -> ClusterState:
        """The job's Ray cluster, created first when it does not exist and `create` is set."""
        ...

    def teardown(self, job: Job, namespace: str, *, ended: bool) -> None:
        """Delete what ensure() made for the job. `ended`: no Ray job of it can still run (it
        finished, failed, was stopped or never started), so nothing in its pods needs a grace
        period."""
        ...


class LocalBackend:
    name = "local"

    def __init__(self, local_ray: LocalRay, python: str) -> None:
        self.local = local_ray
        self.python = python

    def ensure(self, job: Job, body: Mapping[str, Any], namespace: str, create: bool = True) -> ClusterState:
        return ClusterState(
            True, self.local.address, self.local.token, None, "embedded Ray head", self.python
        )

    def teardown(self, job: Job, namespace: str, *, ended: bool) -> None:
        return None


class AddressBackend:
    name = "address"

    def __init__(self, address: str, token: str | None = None) -> None:
        self.address = address
        self.token = token

    def ensure(self, job: Job, body: Mapping[str, Any], namespace: str, create: bool = True) -> ClusterState:
        return ClusterState(True, self.address, self.token, None, f"existing Ray cluster {self.address}")

    def teardown(self, job: Job, namespace: str, *, ended: bool) -> None:
        return None


RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayclusters"

ENDED_POD_GRACE_SECONDS = 5
"""The grace period of a RayCluster's pods that Forgeline deletes once the job's Ray job ended.
Their own (spec.preemption.gracePeriodSeconds + 15, 135 s by default) exists for a preempted
worker to write its checkpoint; at teardown nothing is left to write. And KubeRay's init
container, a bash loop (PID 1) in which a worker waits for its head, ignores SIGTERM: a job
deleted while its workers waited held them, with their node's CPU or GPUs and their Kueue quota,
for the whole grace period (137 s measured; 8 s with this)."""


class KubeRayBackend:
    name = "kuberay"

    def __init__(
        self,
        api_client: Any,
        default_image: str,
        adopt: Callable[..., Any],
        node_pools: dict[str, NodePool] | None = None,
    ) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.default_image = default_image
        self.node_pools = node_pools or {}
        self.adopt = adopt  # kopf.adopt, injected so this module stays testable without kopf

    def _token(self, job: Job, body: Mapping[str, Any], namespace: str) -> str:
        from kubernetes.client.exceptions import ApiException

        name = builders.token_secret_name(job)
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
            return base64.b64decode(secret.data["token"]).decode()
        except ApiException as exc:
            if exc.status != 404:
                raise
        token = secrets.token_hex(24)
        manifest = builders.build_token_secret(job, token)
        self.adopt(manifest, owner=body)
        try:
            self.core.create_namespaced_secret(namespace, manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
            secret = self.core.read_namespaced_secret(name, namespace)  # created concurrently
            return base64.b64decode(secret.data["token"]).decode()
        return token

    def ensure(self, job: Job, body: Mapping[str, Any], namespace: str, create: bool = True) -> ClusterState:
        from kubernetes.client.exceptions import ApiException

        token = self._token(job, body, namespace)
        name = job.ray_cluster_name()
        try:
            rc = self.custom.get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            if not create:
                gone = f"RayCluster {name} does not exist"
                return ClusterState(False, None, token, name, gone, missing=True)
            pool = self.node_pools.get(job.spec.resources.node_pool or "")
            manifest = builders.build_ray_cluster(job, self.default_image, pool)
            self.adopt(manifest, owner=body)
            try:
                self.custom.create_namespaced_custom_object(
                    RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, manifest
                )
            except ApiException as exc2:
                if exc2.status == 404:
                    raise RuntimeError(
                        "the RayCluster CRD (ray.io/v1) is not installed: install KubeRay "
                        "first (see docs/install.md)"
                    ) from None
                if exc2.status != 409:
                    raise
            return ClusterState(False, None, token, name, f"RayCluster {name} created; waiting for KubeRay")
        meta = rc.get("metadata") or {}
        uid = meta.get("uid")
        if meta.get("deletionTimestamp"):  # deleted, held by a finalizer: its pods may still run
            address = _address(job, namespace, rc.get("status") or {})  # to stop what still runs there
            message = deleting_message(name, meta)
            # no uid: a cluster on its way out is given to no job (Forgeline's own teardown of a
            # cluster not ready in time may still be finishing while the job provisions again)
            return ClusterState(False, address, token, name, message, missing=not create, deleting=True)
        if (rc.get("spec") or {}).get("suspend"):
            queue = job.kueue_queue() or "its queue"
            message = f"queued by Kueue (LocalQueue {queue}): RayCluster {name} waits to be admitted"
            return ClusterState(False, None, token, name, message, queued=True, uid=uid)
        status = rc.get("status") or {}
        head = (status.get("head") or {}).get("podName")
        if not _is_ready(status):
            state = status.get("state") or "starting"
            return ClusterState(False, None, token, name, f"RayCluster {name} is {state}", head=head, uid=uid)
        address = _address(job, namespace, status)
        return ClusterState(True, address, token, name, f"RayCluster {name} ready", head=head, uid=uid)

    def teardown(self, job: Job, namespace: str, *, ended: bool) -> None:
        """Delete the job's RayCluster (its pods go with it, each within its own grace period) and
        its token Secret. When its Ray job has `ended`, its pods are deleted first, with a grace
        period of ENDED_POD_GRACE_SECONDS, and once more after the cluster (a pod KubeRay made
        again in between): a pod the garbage collector deletes first keeps its own grace period
        (a shorter one sent 1 s later did not cut the stop short: kubelet 1.34, containerd 1.6)."""
        from kubernetes.client.exceptions import ApiException

        if ended:
            self._delete_pods_now(job, namespace)
        for delete in (
            lambda: self.custom.delete_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, job.ray_cluster_name()
            ),
            lambda: self.core.delete_namespaced_secret(builders.token_secret_name(job), namespace),
        ):
            try:
                delete()
            except ApiException as exc:
                if exc.status != 404:
                    raise
        if ended:
            self._delete_pods_now(job, namespace)

    def _delete_pods_now(self, job: Job, namespace: str) -> None:
        from kubernetes.client.exceptions import ApiException

        selector = builders.ray_pods_selector(job)
        try:
            self.core.delete_collection_namespaced_pod(
                namespace, label_selector=selector, grace_period_seconds=ENDED_POD_GRACE_SECONDS
            )
        except ApiException as exc:
            if exc.status != 403:
                raise
            # RBAC made by hand without it: the pods end within their own grace period
            log.warning(
                f"cannot delete the pods of RayCluster {job.ray_cluster_name()} in {namespace} "
                "(403): they end within their own grace period; grant `deletecollection` on pods "
                "(the chart's RBAC does)"
            )

    def exists(self, job: Job, namespace: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.get_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, job.ray_cluster_name()
            )
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise


def deleting_message(name: str, meta: Mapping[str, Any]) -> str:
    """A RayCluster with a deletionTimestamp: deleted, not gone. A finalizer (Kueue's, a backup
    tool's, anyone's) keeps the object — and, with background deletion, its pods — until its
    controller lets go; a Ray job on it may still run and a cluster of the same name cannot be
    created yet."""
    held = ", ".join(meta.get("finalizers") or []) or "none"
    return f"RayCluster {name} is being deleted (since {meta['deletionTimestamp']}; finalizers: {held})"


def _is_ready(status: dict[str, Any]) -> bool:
    if str(status.get("state", "")).lower() == "ready":
        return True
    return any(
        c.get("type") == "RayClusterProvisioned" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def _address(job: Job, namespace: str, status: dict[str, Any]) -> str:
    head = status.get("head") or {}
    port = (status.get("endpoints") or {}).get("dashboard") or builders.DASHBOARD_PORT
    host = head.get("serviceIP") or head.get("podIP")
    if host:
        return f"http://{host}:{port}"
    return builders.dashboard_address(job, namespace)
