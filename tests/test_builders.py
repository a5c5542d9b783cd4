"""Pure builders (RayCluster, token Secret, names), without a cluster."""

from __future__ import annotations

import pytest
import yaml

from forgeline_operator.api import InvalidJobError, parse_job
from forgeline_operator.controller import builders

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
    job = _job(
        "pretrain-tiny-llama",
        gpusPerWorker=8,
        cpu="96",
        nodeSelector={"pool": "h100"},
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {"x": 1}},
        image="custom:2",
    )
    rc = builders.build_ray_cluster(job, "img:1")
    pod = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 8 and pod["containers"][0]["image"] == "custom:2"
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["affinity"] == {"nodeAffinity": {"x": 1}}
    keys = [t["key"] for t in pod["tolerations"]]
    assert keys == ["dedicated", "nvidia.com/gpu"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["OMP_NUM_THREADS"] == "12"  # 96 CPUs / 8 GPUs (one training process per GPU)
    assert env["RAY_gcs_rpc_server_reconnect_timeout_s"] == str(builders.GCS_RECONNECT_SECONDS)
    # the head: no GPU, no node selector, the job's own tolerations only (not the GPU taint's)
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    assert "nodeSelector" not in head and [t["key"] for t in head["tolerations"]] == ["dedicated"]
    head_env = {e["name"] for e in head["containers"][0]["env"]}
    assert "RAY_gcs_rpc_server_reconnect_timeout_s" not in head_env


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


def test_node_pool_preset_merges_with_the_jobs_own_placement() -> None:
    from forgeline_operator.controller.settings import NodePool

    pool = NodePool.model_validate(
        {
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "zone": "a"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }
    )
    job = _job(
        nodePool="h100",
        gpusPerWorker=1,
        nodeSelector={"zone": "b"},
        tolerations=[{"key": "spot", "operator": "Exists"}],
    )
    worker = builders.build_ray_cluster(job, "img", pool)["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "zone": "b"}
    assert worker["tolerations"] == [pool.tolerations[0], {"key": "spot", "operator": "Exists"}]


def test_node_pools_parse_from_the_helm_rendered_env(monkeypatch) -> None:
    import json

    from forgeline_operator.controller.settings import OperatorSettings

    values = yaml.safe_load((EXAMPLES.parent / "helm/forgeline/values.yaml").read_text())
    monkeypatch.setenv("FORGELINE_NODE_POOLS", json.dumps(values["nodePools"]))
    pools = OperatorSettings().node_pools
    assert pools["h100"].node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pools["h100"].tolerations[0]["key"] == "nvidia.com/gpu"
    monkeypatch.setenv("FORGELINE_NODE_POOLS", '{"h100": {"nodeSelectr": {}}}')
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError, match="nodeSelectr"):
        OperatorSettings()


def _tolerates(tolerations: list[dict], taint: dict) -> bool:
    return any(
        t.get("key") == taint["key"]
        and t.get("effect") in (None, "", taint["effect"])
        and (t.get("operator") == "Exists" or t.get("value") == taint.get("value"))
        for t in tolerations
    )


def test_gpu_examples_land_on_the_kind_gpu_pool() -> None:
    """Every example that asks for GPUs, with the chart's default node pools, selects the GPU
    node of kind-config.yaml and tolerates its taint; CPU examples tolerate nothing special."""
    from forgeline_operator.controller.settings import NodePool

    root = EXAMPLES.parent
    kind = yaml.safe_load((root / "kind-config.yaml").read_text())
    pools = {
        k: NodePool.model_validate(v)
        for k, v in yaml.safe_load((root / "helm/forgeline/values.yaml").read_text())["nodePools"].items()
    }
    gpu_nodes = [n for n in kind["nodes"] if n.get("labels", {}).get("nvidia.com/gpu.present") == "true"]
    assert gpu_nodes, "kind-config.yaml has no GPU pool"
    taints = [
        t
        for n in gpu_nodes
        for p in n.get("kubeadmConfigPatches", [])
        for t in yaml.safe_load(p)["nodeRegistration"]["taints"]
    ]
    checked = 0
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") not in ("TrainingJob", "FineTuneJob"):
                continue
            doc.setdefault("metadata", {})["uid"] = "u"
            job = parse_job(doc)
            if not job.spec.resources.gpus_per_worker:
                continue
            pool = pools.get(job.spec.resources.node_pool or "")
            assert not job.spec.resources.node_pool or pool, f"{path.name}: unknown node pool"
            spec = builders.build_ray_cluster(job, "img", pool)["spec"]["workerGroupSpecs"][0]["template"][
                "spec"
            ]
            selector = spec.get("nodeSelector", {})
            assert selector, f"{path.name}: a GPU job without a node selector lands anywhere"
            assert any(selector.items() <= n["labels"].items() for n in gpu_nodes), (
                f"{path.name}: nodeSelector {selector} matches no GPU node in kind-config.yaml"
            )
            assert all(_tolerates(spec["tolerations"], t) for t in taints), path.name
            checked += 1
    assert checked >= 2


def test_ray_pods_meet_pod_security_restricted() -> None:
    rc = builders.build_ray_cluster(_job(gpusPerWorker=8, cpu="96"), "img")
    pods = [rc["spec"]["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]]
    for pod in pods:
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000 and sc["fsGroup"] == 100
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            csc = container["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"] == {"drop": ["ALL"]}
            assert not csc.get("privileged")
    custom = builders.build_ray_cluster(_job(runAsUser=4242, fsGroup=4242), "img")
    assert custom["spec"]["headGroupSpec"]["template"]["spec"]["securityContext"]["runAsUser"] == 4242


def test_a_kueue_job_gets_a_suspended_raycluster_with_its_queue_label() -> None:
    from forgeline_operator.api import parse_job

    doc = yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a"}
    job = parse_job(doc)
    assert job.kueue_queue() == "team-a"
    rc = builders.build_ray_cluster(job, "img")
    assert rc["spec"]["suspend"] is True
    assert rc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "suspend" not in builders.build_ray_cluster(_job(), "img")["spec"]


def test_credentials_reach_the_pods_by_reference_only() -> None:
    from forgeline_operator.api import parse_job

    doc = yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())
    doc["spec"]["credentials"] = [
        {"secretName": "s3-creds"},
        {"secretName": "hf", "keys": ["HF_TOKEN"], "optional": True},
    ]
    doc["spec"]["resources"]["serviceAccountName"] = "trainer-irsa"
    rc = builders.build_ray_cluster(parse_job(doc), "img")
    for pod in (
        rc["spec"]["headGroupSpec"]["template"]["spec"],
        rc["spec"]["workerGroupSpecs"][0]["template"]["spec"],
    ):
        (container,) = pod["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-creds", "optional": False}}]
        hf = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
        assert hf["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN", "optional": True}}
        assert pod["serviceAccountName"] == "trainer-irsa"
    plain = builders.build_ray_cluster(_job(), "img")["spec"]["headGroupSpec"]["template"]["spec"]
    assert "envFrom" not in plain["containers"][0] and "serviceAccountName" not in plain


def test_ray_pods_get_the_preemption_grace_period_plus_a_margin() -> None:
    """Kubernetes waits terminationGracePeriodSeconds between SIGTERM and SIGKILL: long enough for
    the trainer's graceful preemption (finish the step, write a checkpoint) and Ray's shutdown."""
    for example in ("pretrain-tiny-llama", "finetune-lora-tiny"):
        doc = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())
        doc["metadata"]["uid"] = "0123456789abcdef"
        default = parse_job(doc)
        assert default.spec.preemption.grace_period_seconds == 120
        doc["spec"]["preemption"] = {"gracePeriodSeconds": 300}
        custom = parse_job(doc)
        for job, grace in ((default, 120), (custom, 300)):
            rc = builders.build_ray_cluster(job, "img")
            pods = [rc["spec"]["headGroupSpec"]["template"]["spec"]]
            pods += [g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]]
            for pod in pods:
                assert pod["terminationGracePeriodSeconds"] == grace + builders.PREEMPTION_MARGIN_SECONDS
                # the SIGTERM reaches `ray start --block` (PID 1): it drains the Ray node for the
                # grace period, and Ray Train's watcher tells the workers within a second
                env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
                head = pod["containers"][0]["name"] == "ray-head"  # trains nothing: no drain
                assert env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] == ("0" if head else str(grace))
                assert env["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] == "1"
    doc["spec"]["preemption"] = {"gracePeriodSeconds": 5}
    with pytest.raises(InvalidJobError, match="gracePeriodSeconds"):
        parse_job(doc)


def test_a_raycluster_being_deleted_is_neither_ready_nor_recreated() -> None:
    """A RayCluster with a deletionTimestamp that a finalizer holds (KubeRay ignores it then and
    leaves its pods running): tracking sees it as deleted and gets the head's address to stop what
    still runs there; provisioning waits for it to go rather than submitting to it or creating
    one of the same name. (The same on real pods: tests/test_kube_faults.py.)"""
    from forgeline_operator.controller.backends import KubeRayBackend

    class Api:
        def __init__(self, rc: dict) -> None:
            self.rc, self.created = rc, []

        def read_namespaced_secret(self, name: str, ns: str):
            import base64
            from types import SimpleNamespace

            return SimpleNamespace(data={"token": base64.b64encode(b"t").decode()})

        def get_namespaced_custom_object(self, *args: str) -> dict:
            return self.rc

        def create_namespaced_custom_object(self, *args: object) -> None:
            self.created.append(args)

    job = _job()
    status = {"state": "ready", "head": {"podName": "tiny-llama-tj-head-x", "serviceIP": "10.96.0.9"}}
    meta = {"name": "tiny-llama-tj", "deletionTimestamp": "2026-12-03T19:20:00Z", "finalizers": ["x.io/hold"]}
    api = Api({"metadata": meta, "spec": {}, "status": status})
    backend = KubeRayBackend(None, "trainer:test", adopt=lambda *a, **k: None)
    backend.core = backend.custom = api
    tracked = backend.ensure(job, {}, "ns", create=False)
    assert tracked.missing and tracked.deleting and not tracked.ready
    assert tracked.address is not None and "10.96.0.9" in tracked.address
    assert tracked.message == (
        "RayCluster tiny-llama-tj is being deleted (since 2026-12-03T19:20:00Z; finalizers: x.io/hold)"
    )
    provisioned = backend.ensure(job, {}, "ns")
    assert not provisioned.ready and not provisioned.missing and provisioned.deleting
    assert api.created == []
    # its uid is given to no job: a job provisioning again after Forgeline's own teardown (still
    # held by a finalizer) must not record it, or the cluster's end would read as a person's deletion
    assert tracked.uid is None and provisioned.uid is None
    meta["uid"] = "u-1"
    del meta["deletionTimestamp"]
    live = backend.ensure(job, {}, "ns")  # the same object, not being deleted: ready, and given
    assert live.ready and live.uid == "u-1"


def test_a_deleted_raycluster_whose_deletion_waits_says_so_and_that_its_job_was_stopped() -> None:
    from forgeline_operator.controller.failures import cluster_deleted

    pending = "RayCluster j-tj is being deleted (since 2026-12-03T19:20:00Z; finalizers: x.io/hold)"
    failure = cluster_deleted("j-tj", "pvc://work/j/ckpt", pending)
    assert failure.reason == "ClusterLost" and not failure.retryable
    assert failure.message == (
        "RayCluster j-tj was deleted before its job finished, not by Forgeline (kubectl delete raycluster, "
        "or a clean-up of the namespace); it is being deleted (since 2026-12-03T19:20:00Z; finalizers: "
        "x.io/hold), so Forgeline stopped its Ray job"
    )
    assert "pvc://work/j/ckpt" in failure.fix and "resumeFrom" in failure.fix
