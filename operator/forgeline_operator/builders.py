"""Pure builders: typed job in, Kubernetes manifest dicts out. No API calls, no kopf.

The handlers adopt what these return (owner reference → deletion cascades) and create it if absent.
"""

from __future__ import annotations

import base64
import math
import re
from typing import Any

from .api import FineTuneJob, TrainingJob
from .api.common import Resources
from .settings import NodePool

MANAGED_BY = "forgeline"
DASHBOARD_PORT = 8265
RAY_METRICS_PORT = 8080
PVC_ROOT = "/mnt/pvc"
_NOT_PROPAGATED = re.compile(r"^(kubectl\.kubernetes\.io/|kopf\.zalando\.org/)")


def labels(job: TrainingJob | FineTuneJob) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/name": "forgeline-ray",
        "forgeline.dev/job": job.metadata.name,
        "forgeline.dev/kind": job.KIND,
    }


def user_labels(job: TrainingJob | FineTuneJob) -> dict[str, str]:
    """The job's own labels, minus kubectl's and kopf's bookkeeping (never copied to children)."""
    return {k: v for k, v in job.metadata.labels.items() if not _NOT_PROPAGATED.match(k)}


def token_secret_name(job: TrainingJob | FineTuneJob) -> str:
    return f"{job.ray_cluster_name()}-ray-token"


def head_service(job: TrainingJob | FineTuneJob) -> str:
    """KubeRay names the head Service `<cluster>-head-svc`."""
    return f"{job.ray_cluster_name()}-head-svc"


def dashboard_address(job: TrainingJob | FineTuneJob, namespace: str) -> str:
    return f"http://{head_service(job)}.{namespace}.svc:{DASHBOARD_PORT}"


def submission_id(job: TrainingJob | FineTuneJob, attempt: int) -> str:
    """Deterministic per job and attempt: a re-delivered submit finds the job instead of duplicating it."""
    uid = (job.metadata.uid or "local")[:8]
    return f"forgeline-{job.metadata.name}-{uid}-{attempt}"


def build_token_secret(job: TrainingJob | FineTuneJob, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": token_secret_name(job), "labels": {**user_labels(job), **labels(job)}},
        "data": {"token": base64.b64encode(token.encode()).decode()},
    }


def _cpus(quantity: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(m?)", quantity)
    if not m:
        return 1.0
    return float(m.group(1)) / (1000 if m.group(2) else 1)


def pvc_claims(job: TrainingJob | FineTuneJob) -> list[str]:
    """Every PersistentVolumeClaim a `pvc://claim/...` URI in the spec names, sorted."""
    claims = set(re.findall(r"pvc://([a-z0-9]([-a-z0-9.]*[a-z0-9])?)", job.spec.model_dump_json()))
    return sorted(c[0] for c in claims)


def _volumes(job: TrainingJob | FineTuneJob, res: Resources) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shared_memory}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    for claim in pvc_claims(job):
        name = f"pvc-{claim}"[:63].rstrip("-.")
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": name, "mountPath": f"{PVC_ROOT}/{claim}"})
    return volumes, mounts


def _env(job: TrainingJob | FineTuneJob, threads: int) -> list[dict[str, Any]]:
    return [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {
            "name": "RAY_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": token_secret_name(job), "key": "token"}},
        },
        {"name": "OMP_NUM_THREADS", "value": str(threads)},
        {"name": "FORGELINE_PVC_ROOT", "value": PVC_ROOT},
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
    ]


def build_ray_cluster(
    job: TrainingJob | FineTuneJob, default_image: str, node_pool: NodePool | None = None
) -> dict[str, Any]:
    """A KubeRay RayCluster: a CPU-only head (no training on it) and one worker group on the
    job's node pool with its GPUs, shared memory, PVC mounts and Ray token auth.

    `node_pool` is the preset `spec.resources.nodePool` names: its selector and tolerations come
    first, the job's own nodeSelector keys override it and its tolerations are added."""
    spec, res = job.spec, job.spec.resources
    image = res.image or default_image
    volumes, mounts = _volumes(job, res)
    gpus = res.gpus_per_worker
    per_process_cpus = _cpus(res.cpu) / max(gpus, 1)
    node_selector = {**(node_pool.node_selector if node_pool else {}), **res.node_selector}
    tolerations = list(node_pool.tolerations) if node_pool else []
    tolerations += [t for t in res.tolerations if t not in tolerations]
    if gpus and not any(t.get("key") == res.gpu_resource for t in tolerations):
        tolerations.append({"key": res.gpu_resource, "operator": "Exists", "effect": "NoSchedule"})
    worker_limits: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    if gpus:
        worker_limits[res.gpu_resource] = gpus
    pod_labels = {**user_labels(job), **labels(job)}
    worker_pod: dict[str, Any] = {
        "containers": [
            {
                "name": "ray-worker",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "env": _env(job, max(1, math.floor(per_process_cpus))),
                "resources": {"requests": dict(worker_limits), "limits": dict(worker_limits)},
                "volumeMounts": mounts,
                "ports": [{"name": "metrics", "containerPort": RAY_METRICS_PORT}],
            }
        ],
        "volumes": volumes,
        "tolerations": tolerations,
    }
    if node_selector:
        worker_pod["nodeSelector"] = node_selector
    if res.affinity:
        worker_pod["affinity"] = res.affinity
    head_pod = {
        "containers": [
            {
                "name": "ray-head",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "env": _env(job, 1),
                "resources": {
                    "requests": {"cpu": res.head.cpu, "memory": res.head.memory},
                    "limits": {"cpu": res.head.cpu, "memory": res.head.memory},
                },
                "ports": [
                    {"name": "gcs", "containerPort": 6379},
                    {"name": "dashboard", "containerPort": DASHBOARD_PORT},
                    {"name": "client", "containerPort": 10001},
                    {"name": "metrics", "containerPort": RAY_METRICS_PORT},
                ],
                "volumeMounts": mounts,
            }
        ],
        "volumes": volumes,
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": job.ray_cluster_name(), "labels": pod_labels},
        "spec": {
            "rayVersion": spec.ray.version,
            "enableInTreeAutoscaling": False,
            "headGroupSpec": {
                "rayStartParams": {
                    "dashboard-host": "0.0.0.0",
                    "num-cpus": "0",
                    "metrics-export-port": str(RAY_METRICS_PORT),
                },
                "template": {
                    "metadata": {"labels": {**pod_labels, "forgeline.dev/role": "head"}},
                    "spec": head_pod,
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
                        "spec": worker_pod,
                    },
                }
            ],
        },
    }
