"""Pure builders and the status table, without a cluster."""

from __future__ import annotations

import copy

import yaml

from forgeline_operator import builders, lifecycle
from forgeline_operator.api import parse_job

from .conftest import EXAMPLES


def _job(example: str = "pretrain-tiny-llama", **resources: object):
    doc = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())
    doc["metadata"]["uid"] = "0123456789abcdef"
    doc["spec"]["resources"].update(resources)
    doc["spec"]["training"].pop("globalBatchSize", None)
    return parse_job(doc)


def test_cpu_cluster_has_no_gpu_and_no_gpu_toleration() -> None:
    rc = builders.build_ray_cluster(_job(), "img:1")
    pod = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert pod["tolerations"] == [] and "nodeSelector" not in pod
    assert pod["containers"][0]["image"] == "img:1"


def test_gpu_cluster_placement_and_threads() -> None:
    job = _job("pretrain-tiny-llama", gpusPerWorker=8, cpu="96", nodeSelector={"pool": "h100"},
               tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
               affinity={"nodeAffinity": {"x": 1}}, image="custom:2")
    rc = builders.build_ray_cluster(job, "img:1")
    pod = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 8 and pod["containers"][0]["image"] == "custom:2"
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["affinity"] == {"nodeAffinity": {"x": 1}}
    keys = [t["key"] for t in pod["tolerations"]]
    assert keys == ["dedicated", "nvidia.com/gpu"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["OMP_NUM_THREADS"] == "12"  # 96 CPUs / 8 GPUs (one training process per GPU)


def test_pvc_uris_become_mounts() -> None:
    doc = yaml.safe_load((EXAMPLES / "production/qlora-llama-8b.yaml").read_text())
    job = parse_job(doc)
    assert builders.pvc_claims(job) == ["checkpoints", "models"]
    rc = builders.build_ray_cluster(job, "img")
    mounts = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "pvc-models", "mountPath": "/mnt/pvc/models"} in mounts


def test_kubectl_and_kopf_annotations_labels_never_propagate() -> None:
    doc = yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())
    doc["metadata"]["labels"] = {"team": "a", "kopf.zalando.org/x": "y", "kubectl.kubernetes.io/z": "w"}
    job = parse_job(doc)
    labels = builders.build_ray_cluster(job, "img")["metadata"]["labels"]
    assert labels["team"] == "a" and not any(k.startswith(("kopf.", "kubectl.")) for k in labels)


def test_names_and_ids_fit() -> None:
    job = _job()
    assert builders.submission_id(job, 2) == "forgeline-tiny-llama-01234567-2"
    assert builders.dashboard_address(job, "ml") == "http://tiny-llama-tj-head-svc.ml.svc:8265"
    secret = builders.build_token_secret(job, "s3cret")
    assert secret["metadata"]["name"] == "tiny-llama-tj-ray-token" and secret["data"]["token"] == "czNjcmV0"


def test_status_table_and_condition_times() -> None:
    s1 = lifecycle.status_patch({}, "Pending", "Accepted", "ok", 1)
    conds = {c["type"]: c for c in s1["conditions"]}
    assert all(c["status"] == "False" for c in conds.values())
    s2 = lifecycle.status_patch(s1, "Running", "Submitted", "go", 1)
    conds2 = {c["type"]: c for c in s2["conditions"]}
    assert conds2["Running"]["status"] == "True" and conds2["ClusterReady"]["status"] == "True"
    assert conds2["Failed"]["lastTransitionTime"] == conds["Failed"]["lastTransitionTime"]
    s3 = lifecycle.status_patch({**s1, **s2}, "Succeeded", "Completed", "done", 1)
    assert s3["completionTime"] and {c["type"]: c["status"] for c in s3["conditions"]}["Complete"] == "True"
    assert "completionTime" not in lifecycle.status_patch(copy.deepcopy(s2), "Running", "x", "y", 1)


def test_progress_mapping() -> None:
    p = lifecycle.progress_from({"step": 30, "total_steps": 60, "loss": 2.5, "tokens_per_second": 100.0,
                                 "mfu": 0.2, "eta_seconds": 12.0}, {"type": "eval", "step": 20, "eval_loss": 3.0})
    assert p["summary"] == "30/60" and p["percent"] == 50 and p["tokensPerSecond"] == 100.0
    assert p["evalMetrics"] == {"eval_loss": 3.0}
