"""End to end on a real cluster: `kubectl apply` of a job → the chart's operator (a pod) creates a
RayCluster → the real KubeRay creates the head and worker pods on the node pool's node → Ray starts
in them from the trainer image with token auth → the operator submits through the head's Jobs API →
the trainer trains on a PersistentVolume → status says Succeeded, with progress, timings, evals.
Then the GPU pool (a node that advertises GPUs it does not have), two jobs that cannot succeed (a
worker over its memory limit, a full checkpoint volume), Kueue admitting one job at a time,
the 3-stage pipeline, Prometheus finding the pods through the apiserver, and clean-up.

The cluster (tests/kube.py, forgeline_operator.dev.cluster) is shared by the session; each test
has its own namespace. A failing test prints the cluster's diagnostics (tests/conftest.py)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from forgeline_operator.dev.cluster.binaries import CACHE
from forgeline_operator.dev.cluster.cluster import RELEASE, RELEASE_NS, on_a_small_cluster

from .conftest import CHART, EXAMPLES, load_yaml_documents
from .kube import PLURAL, KubeEnv, PodWatch, Watch, ts

pytestmark = [pytest.mark.kube, pytest.mark.timeout(1800)]

CPU_POOL_NODE, GPU_POOL_NODE = "forgeline-cpu", "forgeline-gpu"
FIGURES = CACHE / "kube-e2e-figures.json"


def record(section: str, figures: dict[str, Any]) -> None:
    """Phase timings for bench/results.md and docs/performance.md, printed and kept."""
    print(f"{section}: {json.dumps(figures)}", flush=True)
    known = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    FIGURES.write_text(json.dumps({**known, section: figures}, indent=1))


# -- 1. the operator, installed with helm, runs as a pod -------------------------------------------


def test_the_chart_runs_the_operator_as_a_restricted_pod(kube: KubeEnv) -> None:
    deploy = kube.get("deploy", RELEASE, "-n", RELEASE_NS)
    assert deploy["status"].get("availableReplicas") == 1, deploy["status"]
    (pod,) = kube.pods(RELEASE_NS, "app.kubernetes.io/component=operator")
    spec, status = pod["spec"], pod["status"]
    (container,) = spec["containers"]
    assert container["image"] == kube.images["operator"]
    assert spec["serviceAccountName"] == RELEASE and spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # the namespace enforces Pod Security "restricted": the pod exists, so it meets it
    assert status["containerStatuses"][0]["restartCount"] == 0 and status["containerStatuses"][0]["ready"]
    logs = kube.kubectl("logs", "-n", RELEASE_NS, pod["metadata"]["name"]).stdout
    assert "Forbidden" not in logs and "Traceback" not in logs, logs[-3000:]


# -- 2. placement: the GPU pool, on a node whose GPUs are advertised but absent ---------------------


def test_a_gpu_job_lands_on_the_gpu_pool_and_preflight_names_the_missing_gpu(kube: KubeEnv) -> None:
    ns = kube.namespace("gpu")
    doc = on_a_small_cluster(load_yaml_documents(EXAMPLES / "pretrain-tiny-llama.yaml")[0])
    doc["metadata"]["name"] = "needs-a-gpu"
    doc["spec"]["resources"].update(nodePool="h100", gpusPerWorker=1, workers=1)
    doc["spec"]["training"].update(globalBatchSize=8)
    watch = PodWatch(kube, ns)
    created = time.time()
    kube.apply([doc], ns)
    status = kube.wait_terminal("TrainingJob", "needs-a-gpu", ns, timeout=420, every=watch)
    failed_after = time.time() - created
    assert status["phase"] == "Failed" and status["reason"] == "PreflightFailed", status
    message = status["message"]
    assert "GPU" in message and GPU_POOL_NODE in message and "needs-a-gpu" in message, message
    assert status.get("restarts", 0) == 0  # a node without its GPUs is not retried
    workers = [p for p in watch.seen.values() if p["metadata"]["labels"].get("ray.io/node-type") == "worker"]
    assert workers, "no worker pod was ever seen"
    for pod in workers:
        assert pod["spec"]["nodeName"] == GPU_POOL_NODE
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == "1", limits
        keys = {t["key"] for t in pod["spec"].get("tolerations", [])}
        assert "nvidia.com/gpu" in keys
    record("gpu preflight", {"apply_to_failed_s": round(failed_after, 1), "pods": watch.phases()})


# -- 2. jobs that cannot succeed, in pods: a worker over its memory limit, a full volume -----------


ON_THE_OTHER_NODE = {  # the GPU-labelled node, CPU only
    "nodeSelector": {"forgeline.dev/pool": "gpu"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "workers": 1,
    # the head has no node selector, only the job's tolerations: it may take either node
    "head": {"cpu": "450m", "memory": "4Gi"},
}
OOM_MEMORY = "1536Mi"


@pytest.fixture(scope="module")
def doomed(kube: KubeEnv) -> dict[str, dict[str, Any]]:
    """Two jobs that cannot succeed, applied together, their workers on the GPU-labelled node (in
    `make soak`: beside the CPU node's jobs they added about 3 minutes to the suite): `oom` (a
    134M-parameter model in workers of 1536Mi: the first step's optimizer state does not fit) and
    `full` (its claim is the session's 1 MiB tmpfs every node sees: the first checkpoint fills it)."""
    base = load_yaml_documents(EXAMPLES / "pretrain-tiny-llama.yaml")[0]
    out = {}
    for name in ("oom", "full"):
        ns = kube.namespace(name, volume=kube.full_volume if name == "full" else None)
        doc = on_a_small_cluster(
            {**base, "metadata": {**base["metadata"], "name": name}}, **ON_THE_OTHER_NODE
        )
        doc["spec"]["training"].update(maxSteps=200)
        doc["spec"]["checkpointing"].update(intervalSteps=20)
        doc["spec"].pop("evaluation", None)
        if name == "oom":
            model = dict(hiddenSize=1024, intermediateSize=4096, numLayers=8, numHeads=8, numKvHeads=8)
            doc["spec"]["model"].update(model)
            doc["spec"]["resources"]["memory"] = OOM_MEMORY
        kube.apply([doc], ns)
        out[name] = {"ns": ns, "applied": time.time()}
    return out


def _ended(kube: KubeEnv, f: dict[str, Any], name: str) -> dict[str, Any]:
    """The failed job's status and Events, and what is left of its Ray cluster once the pods
    that were running when it failed have terminated (within their grace period)."""
    f["status"] = kube.wait_terminal("TrainingJob", name, f["ns"], timeout=420)
    f["events"] = kube.get("events", "-n", f["ns"])["items"]
    deadline = time.monotonic() + 150
    while (left := kube.get("rayclusters,pods", "-n", f["ns"])["items"]) and time.monotonic() < deadline:
        time.sleep(2)
    f["left"] = left
    return f


@pytest.mark.soak
def test_a_worker_over_its_memory_limit_fails_oomkilled_naming_the_limit_without_retries(
    kube: KubeEnv, doomed: dict[str, dict[str, Any]]
) -> None:
    """Workers of 1536Mi and a step that needs more: Ray's memory monitor kills the training
    worker at 95% of the container's limit (before the kernel's OOM killer would) and raises
    OutOfMemoryError; the job fails OOMKilled at once, not retried, the message saying the bytes
    used of the limit, the fix naming spec.resources.memory with its value; nothing is left."""
    f = _ended(kube, doomed["oom"], "oom")
    status = f["status"]
    assert status["phase"] == "Failed" and status["reason"] == "OOMKilled", status
    last = status["lastFailure"]
    assert last["retried"] is False and int(status.get("restarts") or 0) == 0, last
    assert re.search(r"(?i)memory.*limit", last["message"]), last  # Ray's words: used of the limit
    assert f"spec.resources.memory={OOM_MEMORY}" in last["fix"], last
    assert any(e["reason"] == "OOMKilled" for e in f["events"]), [
        (e["reason"], e["message"][:80]) for e in f["events"] if e["involvedObject"]["kind"] == "TrainingJob"
    ]
    assert f["left"] == [], [o["metadata"]["name"] for o in f["left"]]
    record(
        "fault: worker over its memory limit",
        {
            "apply_to_failed_s": round(ts(status["lastFailure"]["time"]) - f["applied"], 1),
            "message": last["message"],
        },
    )


@pytest.mark.soak
def test_a_full_checkpoint_volume_fails_the_job_with_storage_error_naming_it(
    kube: KubeEnv, doomed: dict[str, dict[str, Any]]
) -> None:
    """The claim is a 1 MiB tmpfs that every node sees: the first checkpoint fills it. The job
    fails StorageError naming the pvc:// location and its mount, not retried, never Succeeded
    without its checkpoints."""
    f = _ended(kube, doomed["full"], "full")
    status = f["status"]
    assert status["phase"] == "Failed" and status["reason"] == "StorageError", status
    last = status["lastFailure"]
    assert last["retried"] is False and "no space left" in last["message"], last
    assert "pvc://work/full/checkpoints" in last["message"] and "/mnt/pvc/work/full" in last["message"], last
    assert "spec.checkpointing.storage" in last["fix"], last
    assert f["left"] == [], [o["metadata"]["name"] for o in f["left"]]
    record("fault: checkpoint volume full", {"apply_to_failed_s": round(ts(last["time"]) - f["applied"], 1)})


# -- 3. the pretraining example on KubeRay's pods, with Prometheus watching -------------------------


@pytest.fixture(scope="module")
def prometheus(kube: KubeEnv, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from .kube_prometheus import KubePrometheus

    prom = KubePrometheus(tmp_path_factory.mktemp("prometheus"), kube)
    prom.start()
    yield prom
    prom.stop()


@pytest.fixture(scope="module")
def pretrained(kube: KubeEnv, prometheus: Any) -> dict[str, Any]:
    """`kubectl apply` of examples/pretrain-tiny-llama.yaml on the CPU pool; what happened."""
    ns = kube.namespace("pretrain")
    doc = on_a_small_cluster(load_yaml_documents(EXAMPLES / "pretrain-tiny-llama.yaml")[0], nodePool="cpu")
    watch = PodWatch(kube, ns)
    applied = time.time()
    kube.apply([doc], ns)
    job = doc["metadata"]["name"]
    seen: list[dict[str, Any]] = []

    def sample() -> None:
        watch()
        seen.append(kube.job("TrainingJob", job, ns).get("status", {}))

    with Watch(kube, PLURAL["TrainingJob"], job, "-n", ns) as versions:
        running = kube.wait_for(
            "TrainingJob", job, ns, lambda s: s.get("phase") in ("Running", "Failed"), 600, every=sample
        )
        assert running["phase"] == "Running", running
        rc_name = running["ray"]["clusterName"]
        raycluster = kube.get("raycluster", rc_name, "-n", ns)
        head_service = kube.get("service", f"{rc_name}-head-svc", "-n", ns)
        status = kube.wait_terminal("TrainingJob", job, ns, timeout=900, every=sample)
        ended = time.time()
    seen += [v.get("status", {}) for _, v in versions]  # every version the operator wrote
    return {
        "ns": ns, "job": job, "status": status, "watch": watch, "raycluster": raycluster,
        "head_service": head_service, "applied": applied, "ended": ended, "seen": seen,
        "table": kube.kubectl("get", "tj", "-n", ns).stdout,
        "events": {e["reason"] for e in kube.get("events", "-n", ns)["items"]},
        "generation": kube.job("TrainingJob", job, ns)["metadata"]["generation"],
    }  # fmt: skip


def test_the_pretraining_example_succeeds_in_kuberay_pods(kube: KubeEnv, pretrained: dict[str, Any]) -> None:
    """Succeeded, with live progress in status while it ran, the held-out eval before and after,
    conditions, Events and `kubectl get` columns, and the timings' split."""
    status = pretrained["status"]
    assert status["phase"] == "Succeeded", status
    live = [s["progress"] for s in pretrained["seen"] if s.get("phase") == "Running" and s.get("progress")]
    assert any(0 < p["step"] < p["totalSteps"] for p in live), "no live progress in status while Running"
    progress = status["progress"]
    assert progress["step"] == progress["totalSteps"] == 60 and progress["summary"] == "60/60"
    for key in ("loss", "tokensPerSecond", "mfu", "etaSeconds"):
        assert key in progress, key
    before, after = progress["evalBaseline"]["perplexity"], progress["evalMetrics"]["perplexity"]
    assert after < before / 2, (before, after)
    assert progress["display"]["eval"] == f"ppl {before:.3g}→{after:.3g}"
    assert (
        status["ray"]["jobId"].startswith("forgeline-tiny-llama-")
        and status["ray"]["jobStatus"] == "SUCCEEDED"
    )
    assert status["outputUri"] == "pvc://work/tiny-llama" and status.get("restarts", 0) == 0
    assert status["observedGeneration"] == pretrained["generation"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Complete"] == "True" and conditions["Running"] == "False"
    table = pretrained["table"]
    assert "Succeeded" in table and "60/60" in table and progress["display"]["eval"] in table
    assert {"Provisioning", "Submitted", "Completed"} <= pretrained["events"]
    timings = status["timings"]
    parts = timings["queuedSeconds"] + timings["provisioningSeconds"] + timings["startupSeconds"]
    assert timings["provisioningSeconds"] > 0 and abs(parts - timings["timeToFirstStepSeconds"]) < 0.05
    record_phases("pretrain-tiny-llama (2 workers)", pretrained)
    # goodput: the pods' start as provisioning, the trainer's as start-up, its evals (before, after)
    # and three checkpoint writes timed, nothing redone, the GOODPUT column in `kubectl get`
    g = status["goodput"]
    seconds = g["seconds"]
    assert abs(seconds["provisioning"] - timings["provisioningSeconds"]) <= 2.0, (seconds, timings)
    for category in ("startup", "productive", "evaluation", "checkpointSave"):
        assert seconds[category] > 0, (category, seconds)
    assert seconds["redone"] == seconds["stalled"] == 0, seconds
    assert seconds["checkpointRestore"] < 2, seconds  # only the look for a checkpoint: none to load
    (attempt,) = g["attempts"]
    assert attempt["endedBy"] == "Succeeded" and attempt["lastStep"] == 60 and attempt["redoneSteps"] == 0
    assert 0 < g["fraction"] < 1 and g["display"] in table and g["chipUnit"] == "CPU core"
    record("goodput: pretrain-tiny-llama (2 workers, pods)", {**seconds, "fraction": g["fraction"]})


def test_the_model_on_the_volume_is_complete_and_loads(kube: KubeEnv, pretrained: dict[str, Any]) -> None:
    """What the workers wrote to the PersistentVolume (as the image's ray user, readable by the
    volume's group): the model, its tokenizer, metrics.json, the loss plot; it loads with plain
    transformers and generates."""
    out = kube.volume(pretrained["ns"]) / "tiny-llama"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "loss.png"):
        assert (out / name).exists(), name
    assert out.stat().st_uid == 1000 and (out / "model.safetensors").stat().st_mode & 0o044 == 0o044
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_eval"]["perplexity"] < 10
    assert metrics["final_eval"]["eval_tokens"] >= 2000 and 0 < metrics["final_eval"]["eval_loss_ci95"] < 1
    assert metrics["tokenizer"].startswith("trained byte-level BPE")
    assert metrics["tokens_per_second"] > 0 and 0 < metrics["mfu"] < 1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = model.generate(**tok("The cat", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert ids.shape[1] > 2


def test_kuberay_made_the_pods_on_the_cpu_pool(kube: KubeEnv, pretrained: dict[str, Any]) -> None:
    rc, watch = pretrained["raycluster"], pretrained["watch"]
    assert rc["status"]["state"] == "ready"
    conditions = {c["type"]: c["status"] for c in rc["status"].get("conditions", [])}
    assert conditions.get("RayClusterProvisioned") == "True", rc["status"]
    assert rc["status"]["head"]["podIP"]
    assert pretrained["head_service"]["spec"]["ports"], pretrained["head_service"]
    roles = sorted(p["metadata"]["labels"]["ray.io/node-type"] for p in watch.seen.values())
    assert roles == ["head", "worker", "worker"], roles
    for pod in watch.seen.values():
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "RayCluster"
        assert pod["spec"]["nodeName"] == CPU_POOL_NODE
        (ray,) = [c for c in pod["spec"]["containers"] if c["name"].startswith("ray-")]
        assert ray["image"] == kube.images["trainer"]
        assert pod["spec"]["securityContext"]["runAsUser"] == 1000 and ray["securityContext"]["runAsNonRoot"]
        # KubeRay's own probes (wget | grep under bash in our image) passed: the pod became Ready
        assert ray.get("readinessProbe") and watch.phases()[pod["metadata"]["name"]]["ready_s"] is not None
        if pod["metadata"]["labels"]["ray.io/node-type"] == "worker":
            assert pod["spec"]["nodeSelector"]["forgeline.dev/pool"] == "cpu"
            # KubeRay's init container waited for the head's GCS through the head Service's DNS name
            assert [c["name"] for c in pod["spec"].get("initContainers", [])] == ["wait-gcs-ready"]


def test_a_succeeded_job_leaves_no_pods_and_its_deletion_removes_the_rest(
    kube: KubeEnv, pretrained: dict[str, Any]
) -> None:
    ns, job = pretrained["ns"], pretrained["job"]
    deadline = time.monotonic() + 120
    while (
        kube.pods(ns, "app.kubernetes.io/managed-by=forgeline") or kube.get("rayclusters", "-n", ns)["items"]
    ):
        assert time.monotonic() < deadline, "the finished job's RayCluster or pods remain"
        time.sleep(2)
    kube.kubectl("delete", "trainingjob", job, "-n", ns, "--timeout=120s")
    assert kube.get("secrets", "-n", ns, "-l", f"forgeline.dev/job={job}")["items"] == []
    assert kube.get("rayclusters", "-n", ns)["items"] == [] and kube.pods(ns) == []
    # the checkpoints and the model stay on the volume
    assert (kube.volume(ns) / "tiny-llama" / "config.json").exists()


def record_phases(section: str, run: dict[str, Any]) -> None:
    status, rc = run["status"], run["raycluster"]
    t0 = run["applied"]
    conds = {c["type"]: ts(c.get("lastTransitionTime")) for c in rc["status"].get("conditions", [])}
    pods = run["watch"].phases()

    def rel(value: float | None) -> float | None:
        return round(value - t0, 1) if value is not None else None

    record(
        section,
        {
            "raycluster_created_s": rel(ts(rc["metadata"]["creationTimestamp"])),
            "raycluster_provisioned_s": rel(conds.get("RayClusterProvisioned")),
            "ray_job_submitted_s": rel(ts(status["ray"].get("submittedAt"))),
            "first_step_s": rel(ts(status["timings"].get("firstStepAt"))),
            "succeeded_s": rel(ts(status.get("completionTime"))),
            "status_timings": status["timings"],
            "pods_from_their_creation": pods,
        },
    )


# -- 4. Kueue admits one job at a time -------------------------------------------------------------


def tiny_pretrain(name: str, steps: int = 10) -> dict[str, Any]:
    doc = on_a_small_cluster(load_yaml_documents(EXAMPLES / "pretrain-tiny-llama.yaml")[0], workers=1)
    doc["metadata"]["name"] = name
    doc["spec"]["training"].update(maxSteps=steps, globalBatchSize=8, warmupSteps=2)
    doc["spec"].pop("evaluation", None)
    doc["spec"].pop("checkpointing", None)
    return doc


def test_kueue_admits_the_second_job_when_the_first_frees_the_quota(kube: KubeEnv) -> None:
    """A ClusterQueue whose CPU quota holds one job (head 500m + one worker 500m): the second
    job's RayCluster stays suspended ("queued by Kueue") until the first finishes."""
    ns = kube.namespace("kueue")
    cq = f"cq-{ns}"
    kube.cluster.apply_objects(
        [
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "ResourceFlavor",
                "metadata": {"name": "default-flavor"},
            },
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "ClusterQueue",
                "metadata": {"name": cq},
                "spec": {
                    "namespaceSelector": {},
                    "resourceGroups": [
                        {
                            "coveredResources": ["cpu", "memory"],
                            "flavors": [
                                {
                                    "name": "default-flavor",
                                    "resources": [
                                        {"name": "cpu", "nominalQuota": "1500m"},
                                        {"name": "memory", "nominalQuota": "16Gi"},
                                    ],
                                }
                            ],
                        }
                    ],
                },
            },
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "LocalQueue",
                "metadata": {"name": "team-a", "namespace": ns},
                "spec": {"clusterQueue": cq},
            },
        ]
    )
    jobs = [tiny_pretrain("first"), tiny_pretrain("second")]
    for doc in jobs:
        doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a"}
    try:
        kube.apply(jobs[:1], ns)
        kube.wait_for("TrainingJob", "first", ns, lambda s: s.get("phase") in ("Running", "Failed"), 600)
        kube.apply(jobs[1:], ns)
        queued = kube.wait_for("TrainingJob", "second", ns, lambda s: s.get("reason") == "QueuedByKueue", 120)
        assert "queued by Kueue (LocalQueue team-a)" in queued["message"]
        rc = kube.get("rayclusters", "-n", ns, "-l", "forgeline.dev/job=second")["items"][0]
        assert rc["spec"]["suspend"] is True and not kube.pods(ns, "forgeline.dev/job=second")
        workloads = {
            w["metadata"]["ownerReferences"][0]["name"]: w for w in kube.get("workloads", "-n", ns)["items"]
        }
        assert len(workloads) == 2
        # Kueue unsuspends the second cluster only once the first job's cluster is gone
        queued_at = time.time()

        def admitted() -> bool:
            (rc,) = kube.get("rayclusters", "-n", ns, "-l", "forgeline.dev/job=second")["items"]
            return rc["spec"].get("suspend") is not True

        deadline = time.monotonic() + 600
        while not admitted():
            assert time.monotonic() < deadline, "Kueue never admitted the second job"
            time.sleep(1)
        waited = time.time() - queued_at
        first = kube.job("TrainingJob", "first", ns)["status"]
        assert first["phase"] == "Succeeded", first
        assert kube.get("rayclusters", "-n", ns, "-l", "forgeline.dev/job=first")["items"] == []
        # admitted: the operator sees it and the pods come (running it to the end would only repeat
        # the first job; the pretraining example runs a job to the end in pods)
        second = kube.wait_for("TrainingJob", "second", ns, lambda s: s.get("reason") != "QueuedByKueue", 120)
        assert second["phase"] in ("Provisioning", "Running"), second
        deadline = time.monotonic() + 120
        while not kube.pods(ns, "forgeline.dev/job=second"):
            assert time.monotonic() < deadline, "the admitted job's pods never came"
            time.sleep(1)
        record(
            "kueue",
            {
                "second_waited_for_admission_s": round(waited, 1),
                "first_time_to_first_step_s": first["timings"]["timeToFirstStepSeconds"],
            },
        )
    finally:
        kube.kubectl("delete", "trainingjobs", "--all", "-n", ns, "--timeout=120s", check=False)
        kube.kubectl("delete", "clusterqueue", cq, "--timeout=60s", check=False)


def test_a_job_deleted_while_its_worker_waits_for_the_head_frees_the_node_at_once(kube: KubeEnv) -> None:
    """KubeRay's init container, a bash loop (PID 1) in which a worker waits for its head,
    ignores SIGTERM: a job deleted while it waited kept the worker, with its node's CPU or GPUs,
    for the pods' whole grace period (135 s; the Kueue test's second job held the next test's node
    that long). Forgeline deletes an ended job's pods with a 5 s grace period before its
    RayCluster (backends.ENDED_POD_GRACE_SECONDS)."""
    ns = kube.namespace("held")
    doc = tiny_pretrain("held")
    doc["spec"]["resources"]["head"] = {"cpu": "64", "memory": "4Gi"}  # no node has it: head Pending
    kube.apply([doc], ns)
    workers = "forgeline.dev/job=held,ray.io/node-type=worker"

    def waiting() -> list[dict[str, Any]]:
        return [
            pod
            for pod in kube.pods(ns, workers)
            if any(
                "running" in (c.get("state") or {}) for c in pod["status"].get("initContainerStatuses") or []
            )
        ]

    deadline = time.monotonic() + 180
    while not (held := waiting()):
        assert time.monotonic() < deadline, (
            f"no worker waited for its head: {json.dumps(kube.pods(ns))[:3000]}"
        )
        time.sleep(1)
    grace = held[0]["spec"]["terminationGracePeriodSeconds"]
    start = time.monotonic()
    kube.kubectl("delete", "trainingjob", "held", "-n", ns, "--timeout=60s")
    while left := kube.pods(ns):
        assert time.monotonic() - start < 90, [(p["metadata"]["name"], p["status"]) for p in left]
        time.sleep(1)
    gone = time.monotonic() - start
    record("teardown", {"pods_grace_period_s": grace, "waiting_worker_gone_after_deletion_s": round(gone, 1)})
    assert grace == 135
    assert gone < 30, f"the pods went {gone:.0f} s after the job's deletion (their grace period: {grace} s)"


# -- 5. the 3-stage pipeline: pretrain → LoRA SFT from its output → DPO ---------------------------


def test_the_pipeline_runs_its_stages_in_order_on_the_volume(kube: KubeEnv) -> None:
    """Applied at once: the later stages wait for the ones they name; the LoRA SFT starts from the
    pretrained model on the volume, DPO from the SFT's merged model; each stage improves its own
    held-out metric. One worker per stage (the global batch accumulates micro-batches)."""
    ns = kube.namespace("pipeline")
    docs = [
        on_a_small_cluster(d, workers=1)
        for d in load_yaml_documents(EXAMPLES / "pipeline-pretrain-sft-dpo.yaml")
    ]
    stages = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert [n for _, n in stages] == ["pipe-pretrain", "pipe-sft", "pipe-dpo"]
    applied = time.time()
    kube.apply(docs, ns)
    waiting = kube.wait_for("FineTuneJob", "pipe-dpo", ns, lambda s: s.get("phase") == "Waiting", 120)
    assert "FineTuneJob/pipe-sft" in waiting["message"]
    statuses = {}
    for kind, name in stages:
        statuses[name] = kube.wait_terminal(kind, name, ns, timeout=900)
        assert statuses[name]["phase"] == "Succeeded", (name, statuses[name])
    for earlier, later in (("pipe-pretrain", "pipe-sft"), ("pipe-sft", "pipe-dpo")):
        assert ts(statuses[later]["timings"]["admittedAt"]) >= ts(statuses[earlier]["completionTime"]) - 1
    for name, key, better in (
        ("pipe-pretrain", "perplexity", float.__lt__),
        ("pipe-sft", "accuracy", float.__gt__),
        ("pipe-dpo", "eval_loss", float.__lt__),  # the held-out DPO loss (16 pairs: accuracy is coarse)
    ):
        progress = statuses[name]["progress"]
        before, after = progress["evalBaseline"][key], progress["evalMetrics"][key]
        assert better(after, before), (name, key, before, after)
    dpo = statuses["pipe-dpo"]["progress"]  # untrained, every pair a tie; said as one
    assert dpo["evalBaseline"]["preference_ties"] == 1.0 and dpo["evalBaseline"]["preference_accuracy"] == 0.5
    assert dpo["evalMetrics"]["preference_accuracy"] >= 0.5, dpo
    assert dpo["display"]["eval"].startswith("pref acc tie→"), dpo
    volume = kube.volume(ns)
    for name in ("pipe-pretrain", "pipe-sft", "pipe-dpo"):
        assert (volume / name / "config.json").exists(), sorted(p.name for p in (volume / name).iterdir())
    # each stage's gate promoted it (the next one would have refused it otherwise), with the numbers
    for name in ("pipe-pretrain", "pipe-sft", "pipe-dpo"):
        cond = next(c for c in statuses[name]["conditions"] if c["type"] == "Promoted")
        assert (cond["status"], cond["reason"]) == ("True", "Improved"), (name, cond)
        assert statuses[name]["promotion"]["improvement"] > statuses[name]["promotion"]["required"]
    # lineage: the DPO model's record reaches back through the SFT to the pretraining, digests
    # and all, in status and in the lineage.json on the volume
    lin = statuses["pipe-dpo"]["lineage"]
    assert [u["job"] for u in lin["upstream"]] == ["FineTuneJob/pipe-sft", "TrainingJob/pipe-pretrain"]
    assert lin["upstream"][0]["digest"] == statuses["pipe-sft"]["lineage"]["digest"]
    assert lin["upstream"][1]["digest"] == statuses["pipe-pretrain"]["lineage"]["digest"]
    assert lin["baseModel"]["sha256"] == statuses["pipe-sft"]["lineage"]["outputSha256"]
    assert lin["trainerImage"] and lin["versions"]["ray"] and lin["data"][0]["sha256"]
    on_volume = json.loads((volume / "pipe-dpo" / "lineage.json").read_text())
    nested = on_volume["inputs"]["baseModel"]["upstream"]["inputs"]["baseModel"]["upstream"]
    assert (
        nested["job"]["name"] == "pipe-pretrain"
        and nested["output"]["digest"]["sha256"] == (statuses["pipe-pretrain"]["lineage"]["outputSha256"])
    )
    assert "model-index:" in (volume / "pipe-dpo" / "README.md").read_text()
    record(
        "pipeline (3 stages, 1 worker each)",
        {
            "total_s": round(max(ts(s["completionTime"]) for s in statuses.values()) - applied, 1),
            **{n: s["timings"] for n, s in statuses.items()},
        },
    )


# -- 6. metrics: Prometheus finds the operator pod and the Ray head through the apiserver ------------


def test_every_dashboard_panel_answers_from_the_pods_prometheus_discovered(
    kube: KubeEnv, prometheus: Any, pretrained: dict[str, Any]
) -> None:
    from forgeline_operator.monitoring.dashboard import panel_queries

    up = {(t["labels"]["job"], t["health"]) for t in prometheus.active_targets()}
    assert ("forgeline-operator", "up") in up, prometheus.active_targets()
    heads = [t for t in prometheus.active_targets() if t["labels"].get("ray_node_type") == "head"]
    assert heads, "Prometheus never discovered a Ray head"
    dashboard = json.loads((CHART / "files/dashboards/forgeline.json").read_text())
    start, end = prometheus.started_at, time.time()
    empty = []
    for title, expr in panel_queries(dashboard):
        if any(m in expr for m in GPU_ONLY):
            continue
        promql = expr.replace("$__rate_interval", "15s").replace("$namespace", ".*")
        if not any(series["values"] for series in prometheus.query_range(promql, start, end)):
            empty.append(f"{title}: {promql}")
    assert empty == [], "panels without data:\n" + "\n".join(empty)
    for promql in (
        'forgeline_job_eval{job="tiny-llama",metric="perplexity",stage=~"before|after"}',
        'forgeline_jobs{kind="TrainingJob",phase="Succeeded"}',
        'forgeline_job_time_to_first_step_seconds_count{kind="TrainingJob"}',
    ):
        assert prometheus.query_range(promql, start, end), promql
    assert (
        len(
            prometheus.query_range(
                'forgeline_job_eval{job="tiny-llama",metric="perplexity",stage=~"before|after"}', start, end
            )
        )
        == 2
    )


GPU_ONLY = ("ray_node_gpus_utilization", "ray_node_gram_")
"""Series only a GPU node's Ray exports (this cluster's GPU node has none: tests/test_operator.py
checks those panels against a stand-in of Ray's GPU exporter)."""


def test_nothing_forgeline_made_is_left(kube: KubeEnv) -> None:
    """After the tests above deleted their jobs: no RayClusters, Ray pods or job Secrets anywhere."""
    for ns in kube.namespaces:
        kube.kubectl("delete", "trainingjobs,finetunejobs", "--all", "-n", ns, "--timeout=180s")
    deadline = time.monotonic() + 120
    while True:
        left = {
            "rayclusters": kube.get("rayclusters", "-A")["items"],
            "pods": [
                p
                for p in kube.get("pods", "-A")["items"]
                if p["metadata"]["labels"].get("app.kubernetes.io/managed-by") == "forgeline"
            ],
            "secrets": kube.get("secrets", "-A", "-l", "app.kubernetes.io/managed-by=forgeline")["items"],
        }
        if not any(left.values()):
            break
        assert time.monotonic() < deadline, {k: [i["metadata"]["name"] for i in v] for k, v in left.items()}
        time.sleep(2)
