"""Pure builders: typed job in, Kubernetes manifest dicts out. No API calls, no kopf.

The handlers adopt what these return (owner reference → deletion cascades) and create it if absent.
"""

from __future__ import annotations

import base64
import math
import re
from typing import Any

from ..api import Job
from ..api.common import Resources
from ..api.quantities import cpu_cores
from .settings import NodePool

MANAGED_BY = "forgeline"
DASHBOARD_PORT = 8265
RAY_METRICS_PORT = 8080
PVC_ROOT = "/mnt/pvc"
_NOT_PROPAGATED = re.compile(r"^(kubectl\.kubernetes\.io/|kopf\.zalando\.org/)")


def labels(job: Job) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/name": "forgeline-ray",
        "forgeline.dev/job": job.metadata.name,
        "forgeline.dev/kind": job.KIND,
    }


def ray_pods_selector(job: Job) -> str:
    """The label selector of the job's Ray pods: KubeRay's cluster label and Forgeline's own
    (a pod that only one of them names is not this job's)."""
    mine = labels(job)
    return ",".join(
        [
            f"ray.io/cluster={job.ray_cluster_name()}",
            f"forgeline.dev/job={mine['forgeline.dev/job']}",
            f"forgeline.dev/kind={mine['forgeline.dev/kind']}",
            f"app.kubernetes.io/managed-by={mine['app.kubernetes.io/managed-by']}",
        ]
    )


def user_labels(job: Job) -> dict[str, str]:
    """The job's own labels, minus kubectl's and kopf's bookkeeping (never copied to children)."""
    return {k: v for k, v in job.metadata.labels.items() if not _NOT_PROPAGATED.match(k)}


def token_secret_name(job: Job) -> str:
    return f"{job.ray_cluster_name()}-ray-token"


def head_service(job: Job) -> str:
    """KubeRay names the head Service `<cluster>-head-svc`."""
    return f"{job.ray_cluster_name()}-head-svc"


def dashboard_address(job: Job, namespace: str) -> str:
    return f"http://{head_service(job)}.{namespace}.svc:{DASHBOARD_PORT}"


def submission_id(job: Job, attempt: int) -> str:
    """Deterministic per job and attempt: a re-delivered submit finds the job instead of duplicating it."""
    uid = (job.metadata.uid or "local")[:8]
    return f"forgeline-{job.metadata.name}-{uid}-{attempt}"


def build_token_secret(job: Job, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": token_secret_name(job), "labels": {**user_labels(job), **labels(job)}},
        "data": {"token": base64.b64encode(token.encode()).decode()},
    }


def pvc_claims(job: Job) -> list[str]:
    """Every PersistentVolumeClaim a `pvc://claim/...` URI in the spec names, sorted."""
    claims = set(re.findall(r"pvc://([a-z0-9]([-a-z0-9.]*[a-z0-9])?)", job.spec.model_dump_json()))
    return sorted(c[0] for c in claims)


def _volumes(job: Job, res: Resources) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shared_memory}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    for claim in pvc_claims(job):
        name = f"pvc-{claim}"[:63].rstrip("-.")
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": name, "mountPath": f"{PVC_ROOT}/{claim}"})
    return volumes, mounts


def _credentials(job: Job) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """spec.credentials as (env, envFrom): Secret references only, never a value."""
    env, env_from = [], []
    for ref in job.spec.credentials:
        if ref.keys:
            refs = [{"name": ref.secret_name, "key": key, "optional": ref.optional} for key in ref.keys]
            env += [{"name": r["key"], "valueFrom": {"secretKeyRef": r}} for r in refs]
        else:
            env_from.append({"secretRef": {"name": ref.secret_name, "optional": ref.optional}})
    return env, env_from


def _container_env(job: Job, threads: int, drain: bool = True) -> dict[str, Any]:
    """A Ray container's `env` (Ray token auth, threads, spec.credentials) and `envFrom`."""
    env, env_from = _credentials(job)
    return {"env": _env(job, threads, drain) + env, **({"envFrom": env_from} if env_from else {})}


def _env(job: Job, threads: int, drain: bool = True) -> list[dict[str, Any]]:
    return [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {
            "name": "RAY_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": token_secret_name(job), "key": "token"}},
        },
        {"name": "OMP_NUM_THREADS", "value": str(threads)},
        {"name": "FORGELINE_PVC_ROOT", "value": PVC_ROOT},
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        # graceful preemption in a pod: the kubelet's SIGTERM reaches `ray start --block` (PID 1),
        # which drains its Ray node for this long before it stops the node's processes; Ray
        # Train's watcher sees the drain (polled every second) and the trainer checkpoints at the
        # current step within it (forgeline_trainer.preemption). Workers only: the head trains
        # nothing, and a draining head would hold a finished job's cluster up to the grace period
        {
            "name": "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S",
            "value": str(job.spec.preemption.grace_period_seconds if drain else 0),
        },
        {"name": "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "value": "1"},
        *(
            # a lost head is replaced by KubeRay with a new GCS (no GCS fault tolerance here): a
            # worker's raylet waiting Ray's default 60 s for the old one only delays its
            # container's restart into the new cluster (tests/test_kube_faults.py: head deleted)
            [{"name": "RAY_gcs_rpc_server_reconnect_timeout_s", "value": str(GCS_RECONNECT_SECONDS)}]
            if drain
            else []
        ),
        # the trainer names the pod and node in a failure (a GPU the node advertises but lacks)
        {"name": "FORGELINE_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "FORGELINE_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]


def build_ray_cluster(job: Job, default_image: str, node_pool: NodePool | None = None) -> dict[str, Any]:
    """A KubeRay RayCluster: a CPU-only head (no training on it) and one worker group on the
    job's node pool with its GPUs, shared memory, PVC mounts and Ray token auth.

    `node_pool` is the preset `spec.resources.nodePool` names: its selector and tolerations come
    first, the job's own nodeSelector keys override it and its tolerations are added."""
    res = job.spec.resources
    image = res.image or default_image
    pod_labels = {**user_labels(job), **labels(job)}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": job.ray_cluster_name(), "labels": pod_labels},
        "spec": {
            "rayVersion": job.spec.ray.version,
            "enableInTreeAutoscaling": False,
            # Kueue's RayCluster integration admits a suspended cluster that carries its queue label
            **({"suspend": True} if job.kueue_queue() else {}),
            "headGroupSpec": {
                "rayStartParams": {
                    "dashboard-host": "0.0.0.0",
                    "num-cpus": "0",
                    "metrics-export-port": str(RAY_METRICS_PORT),
                },
                "template": {
                    "metadata": {"labels": {**pod_labels, "forgeline.dev/role": "head"}},
                    "spec": _head_pod(job, image),
                },
            },
            "workerGroupSpecs": [
                {
                    "groupName": "train",
                    "replicas": res.workers,
                    "minReplicas": res.workers,
                    "maxReplicas": res.workers,
                    "rayStartParams": {"metrics-export-port": str(RAY_METRICS_PORT)},
                    "template": {
                        "metadata": {"labels": {**pod_labels, "forgeline.dev/role": "worker"}},
                        "spec": _worker_pod(job, image, node_pool),
                    },
                }
            ],
        },
    }


def _placement(res: Resources, node_pool: NodePool | None) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """nodeSelector and tolerations: the pool's, then the job's; GPU pools' usual taint tolerated."""
    node_selector = {**(node_pool.node_selector if node_pool else {}), **res.node_selector}
    tolerations = list(node_pool.tolerations) if node_pool else []
    tolerations += [t for t in res.tolerations if t not in tolerations]
    if res.gpus_per_worker and not any(t.get("key") == res.gpu_resource for t in tolerations):
        tolerations.append({"key": res.gpu_resource, "operator": "Exists", "effect": "NoSchedule"})
    return node_selector, tolerations


# Pod Security "restricted": non-root, no privilege escalation, no capabilities, the runtime's
# seccomp profile. GPUs need none of these (the device plugin hands the devices in).
def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def _pod_security(res: Resources) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": res.run_as_user,
        "runAsGroup": res.fs_group,
        "fsGroup": res.fs_group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


PREEMPTION_MARGIN_SECONDS = 15
"""Kubernetes' wait before SIGKILL beyond spec.preemption.gracePeriodSeconds (Ray's own shutdown)."""


def termination_grace_seconds(job: Job) -> int:
    """terminationGracePeriodSeconds of the Ray pods: the job's preemption grace period (the time a
    worker gets to finish its step and write a checkpoint after SIGTERM) plus a small margin."""
    return job.spec.preemption.grace_period_seconds + PREEMPTION_MARGIN_SECONDS


def _worker_pod(job: Job, image: str, node_pool: NodePool | None) -> dict[str, Any]:
    res = job.spec.resources
    volumes, mounts = _volumes(job, res)
    gpus = res.gpus_per_worker
    threads = max(1, math.floor(cpu_cores(res.cpu) / max(gpus, 1)))  # per training process
    limits: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    if gpus:
        limits[res.gpu_resource] = gpus
    node_selector, tolerations = _placement(res, node_pool)
    pod: dict[str, Any] = {
        "containers": [
            {
                "name": "ray-worker",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                **_container_env(job, threads),
                "resources": {"requests": dict(limits), "limits": dict(limits)},
                "volumeMounts": mounts,
                "ports": [{"name": "metrics", "containerPort": RAY_METRICS_PORT}],
                "securityContext": _container_security(),
            }
        ],
        "volumes": volumes,
        "tolerations": tolerations,
        "terminationGracePeriodSeconds": termination_grace_seconds(job),
        "securityContext": _pod_security(res),
        **({"serviceAccountName": res.service_account_name} if res.service_account_name else {}),
    }
    if node_selector:
        pod["nodeSelector"] = node_selector
    if res.affinity:
        pod["affinity"] = res.affinity
    return pod


GCS_RECONNECT_SECONDS = 20
"""How long a worker's raylet waits for a head that stopped answering before it exits."""


def _head_pod(job: Job, image: str) -> dict[str, Any]:
    """The head: CPU only, no node selector (it needs no GPU node), the job's own tolerations
    (a cluster whose every node is tainted for training must still place it; the pool's GPU
    tolerations are not added: they would let the head take a GPU node's CPU)."""
    res = job.spec.resources
    volumes, mounts = _volumes(job, res)
    quantities = {"cpu": res.head.cpu, "memory": res.head.memory}
    return {
        "containers": [
            {
                "name": "ray-head",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                **_container_env(job, 1, drain=False),
                "resources": {"requests": dict(quantities), "limits": dict(quantities)},
                "ports": [
                    {"name": "gcs", "containerPort": 6379},
                    {"name": "dashboard", "containerPort": DASHBOARD_PORT},
                    {"name": "client", "containerPort": 10001},
                    {"name": "metrics", "containerPort": RAY_METRICS_PORT},
                ],
                "volumeMounts": mounts,
                "securityContext": _container_security(),
            }
        ],
        "volumes": volumes,
        **({"tolerations": list(res.tolerations)} if res.tolerations else {}),
        "terminationGracePeriodSeconds": termination_grace_seconds(job),
        "securityContext": _pod_security(res),
        **({"serviceAccountName": res.service_account_name} if res.service_account_name else {}),
    }
