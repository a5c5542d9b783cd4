"""Faults on real pods: what Kubernetes itself does to a training job, survived and measured.

One pretraining job on the session's cluster (tests/kube.py) lives through, in order:

- the operator pod deleted at points of its life (Provisioning, just after the submission, mid-run,
  while a preemption is handled, during a resubmission; the Deployment starts a new one each time);
- an eviction of a worker pod through the Eviction API (what `kubectl drain` and spot reclaims
  do): the kubelet's SIGTERM reaches `ray start --block`, Ray drains the node, the trainer
  checkpoints at that step, the job is resubmitted on the same RayCluster (once KubeRay has
  replaced the pod) and resumes at exactly that step; `Preempted`, not counted in backoffLimit;
- `kubectl delete pod` of a worker: the same drain, the same checkpoint at the step;
- the kube-apiserver restarted under the running pods: nothing fails or restarts for it;
- the RayCluster deleted by a person: the job stops at once, saying who deleted what;

with exactly one Ray submission per attempt. The figures (time to detect, time to recover, steps
redone) go to $FORGELINE_CACHE/kube-e2e-figures.json and docs/reliability.md. A failing test prints
the cluster's diagnostics (tests/conftest.py).

In `make soak` (run once each, figures in docs/reliability.md; they cost the suite minutes): the
head pod deleted, then the RayCluster deleted under a finalizer
(`test_a_deleted_head_pod_is_seen_and_the_job_resumes_on_the_new_head`); 20 operator pod
deletions at random moments through three jobs' lives
(`test_twenty_operator_pod_deletions_at_random_points_lose_nothing`); the same training as a bare
KubeRay RayJob under a worker and a head deletion, for comparison
(`test_kuberay_alone_a_rayjob_under_the_same_faults`). A worker's Ray node crashing (SIGKILL to
its raylet: NodeLost, resubmitted from the newest checkpoint) ran until 2026-12-03; its
classification is unit-tested in tests/test_failures.py."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from forgeline_operator.dev.cluster.cluster import RELEASE, RELEASE_NS, on_a_small_cluster
from forgeline_operator.rayclient.rayjobs import parse_records

from .conftest import EXAMPLES, load_yaml_documents
from .kube import PLURAL, KubeEnv, Watch
from .test_kube_e2e import record

pytestmark = [pytest.mark.kube, pytest.mark.timeout(1800)]

JOB, STEPS, INTERVAL = "survivor", 6000, 50
"""The job ends when the test deletes its RayCluster, never by its steps: 1,500 ran out before the
faults did once the nodes ran without CFS quotas (training about twice as fast)."""
OPERATOR = "app.kubernetes.io/component=operator"


# -- injecting faults: the exact commands a person or Kubernetes would run -------------------------


def evict(kube: KubeEnv, ns: str, pod: str) -> None:
    """The Eviction API (policy/v1), as `kubectl drain` and cluster autoscalers call it."""
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": ns}}
    kube.kubectl(
        "create", "--raw", f"/api/v1/namespaces/{ns}/pods/{pod}/eviction", "-f", "-", input=json.dumps(body)
    )


def delete_operator_pod(kube: KubeEnv) -> str:
    """`kubectl delete pod` of the running operator (graceful: kopf stops on SIGTERM)."""
    (pod,) = [p for p in kube.pods(RELEASE_NS, OPERATOR) if not p["metadata"].get("deletionTimestamp")]
    name = pod["metadata"]["name"]
    kube.kubectl("delete", "pod", name, "-n", RELEASE_NS, "--wait=false")
    return name


def workers(kube: KubeEnv, ns: str) -> list[dict[str, Any]]:
    return [
        p
        for p in kube.pods(ns, f"forgeline.dev/job={JOB},ray.io/node-type=worker")
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]


def head_pod(kube: KubeEnv, ns: str) -> str:
    (head,) = [
        p["metadata"]["name"]
        for p in kube.pods(ns, f"forgeline.dev/job={JOB},ray.io/node-type=head")
        if not p["metadata"].get("deletionTimestamp")
    ]
    return head


def ray_submissions(kube: KubeEnv, ns: str) -> list[str]:
    """Every Ray job the head knows (asked from inside the head pod, with its token)."""
    code = (
        "import os; from ray.job_submission import JobSubmissionClient as C; "
        "auth = {'Authorization': 'Bearer ' + os.environ['RAY_AUTH_TOKEN']}; "
        "c = C('http://127.0.0.1:8265', headers=auth); "
        "print('\\n'.join(j.submission_id for j in c.list_jobs() if j.submission_id))"
    )
    out = kube.kubectl("exec", "-n", ns, head_pod(kube, ns), "-c", "ray-head", "--", "python", "-c", code)
    return sorted(out.stdout.split())


def attempt_records(kube: KubeEnv, ns: str, submissions: list[str]) -> dict[int, list[dict[str, Any]]]:
    """Each attempt's trainer records, from its Ray driver log in the head pod (the operator
    archives logs only where it can write: not to a PVC of the job's namespace)."""
    head = head_pod(kube, ns)
    out = {}
    for sid in submissions:
        log = f"/tmp/ray/session_latest/logs/job-driver-{sid}.log"
        text = kube.kubectl("exec", "-n", ns, head, "-c", "ray-head", "--", "cat", log).stdout
        out[int(sid.rsplit("-", 1)[1])] = parse_records(text)
    return out


def long_pretraining() -> dict[str, Any]:
    """The pretraining example on the CPU pool, long enough to fault: STEPS steps, a checkpoint
    every INTERVAL, one eval at the end."""
    doc = on_a_small_cluster(load_yaml_documents(EXAMPLES / "pretrain-tiny-llama.yaml")[0], nodePool="cpu")
    doc["metadata"]["name"] = JOB
    doc["spec"]["training"].update(maxSteps=STEPS)
    doc["spec"]["checkpointing"].update(intervalSteps=INTERVAL, keep=3)
    doc["spec"]["evaluation"].update(intervalSteps=STEPS)
    return doc


# -- the job's life --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def survivor(kube: KubeEnv) -> dict[str, Any]:
    ns = kube.namespace("faults")
    doc = long_pretraining()
    doc["spec"]["backoffLimit"] = 3
    facts: dict[str, Any] = {"ns": ns, "operator_kills": []}

    def kill_operator(why: str) -> None:
        facts["operator_kills"].append((why, delete_operator_pod(kube), time.time()))

    def wait(done: Any, timeout: float = 300) -> dict[str, Any]:
        return kube.wait_for("TrainingJob", JOB, ns, done, timeout)

    def step(s: dict[str, Any]) -> int:
        return int((s.get("progress") or {}).get("step") or 0)

    def attempts(s: dict[str, Any]) -> int:
        return int(s.get("restarts") or 0) + int(s.get("preemptions") or 0)

    def fault(name: str, at_step: int, inject: Any, kill_during: str = "", kill_after: str = "") -> None:
        """At `at_step`: inject the fault into a worker pod, delete the operator pod while the
        failure is handled, wait for the next attempt to train past where this one stopped, then
        delete the operator pod once more."""
        s = wait(lambda s: step(s) >= at_step, 420)
        (victim, *_) = workers(kube, ns)
        before = attempts(s)
        facts[name] = {"pod": victim["metadata"]["name"], "at": time.time(), "step_seen": step(s)}
        inject(victim["metadata"]["name"])
        time.sleep(1)
        if kill_during:
            kill_operator(kill_during)
        s = wait(lambda s: attempts(s) > before)
        facts[name].update(detected=time.time(), status=s)
        stopped = int(s["lastFailure"].get("step") or 0)
        wait(lambda s: attempts(s) > before and step(s) > stopped)
        facts[name]["resumed"] = time.time()
        if kill_after:
            kill_operator(kill_after)

    def next_step(name: str) -> int:
        return int(facts[name]["status"]["lastFailure"]["step"]) + 3 * INTERVAL + 10

    with Watch(kube, PLURAL["TrainingJob"], JOB, "-n", ns) as versions:
        kube.apply([doc], ns)
        kill_operator("right after the apply")
        wait(lambda s: (s.get("ray") or {}).get("jobId"), 420)
        kill_operator("just after the first submission")
        facts["raycluster_uid"] = kube.get("rayclusters", "-n", ns)["items"][0]["metadata"]["uid"]
        # 1. `kubectl delete pod` of a worker (graceful: the pod's terminationGracePeriodSeconds)
        fault(
            "deleted",
            2 * INTERVAL + 10,
            lambda pod: kube.kubectl("delete", "pod", pod, "-n", ns, "--wait=false"),
            "while the deletion is handled",
            "mid-run after the resubmission",
        )
        # 2. an eviction (policy/v1 Eviction: kubectl drain, autoscalers, spot reclaim handlers)
        fault(
            "evicted",
            next_step("deleted"),
            lambda pod: evict(kube, ns, pod),
            "while the eviction is handled",
            "mid-run after the second resubmission",
        )
        # 5. the kube-apiserver restarted while the pods run: nothing fails or restarts for it
        s = wait(lambda s: attempts(s) == 2 and step(s) >= next_step("evicted") - 2 * INTERVAL, 300)
        facts["apiserver"] = {"attempts_before": attempts(s), "step_before": step(s)}
        facts["apiserver"]["unavailable_s"] = kube.cluster.control_plane.restart_apiserver()
        s = wait(lambda s: step(s) >= facts["apiserver"]["step_before"] + INTERVAL, 300)
        facts["apiserver"].update(attempts_after=attempts(s), step_after=step(s), status=s)
        kill_operator("just after the kube-apiserver came back")
        # what Ray ran on this head, and each attempt's records, before the head goes
        facts["submissions"] = ray_submissions(kube, ns)
        facts["records"] = attempt_records(kube, ns, facts["submissions"])
        # 4. a person deletes the RayCluster while the job runs: the job stops, saying so. The
        # operator was just deleted too: its successor, still starting, has not read the attempt's
        # log, and closes the attempt from the split its predecessor last wrote (docs/goodput.md)
        s = wait(lambda s: step(s) >= facts["apiserver"]["step_after"] + INTERVAL, 300)
        kill_operator("just before the RayCluster is deleted")
        facts["raycluster_deleted"] = {"at": time.time(), "step_seen": step(s)}
        kube.kubectl("delete", "raycluster", f"{JOB}-tj", "-n", ns, "--wait=false")
        s = kube.wait_terminal("TrainingJob", JOB, ns, timeout=120)
        facts["raycluster_deleted"]["detected"] = time.time()
    facts["status"] = s
    facts["versions"] = [v for _, v in versions]
    facts["events"] = kube.get("events", "-n", ns)["items"]
    return facts


def test_the_job_survives_every_worker_fault(survivor: dict[str, Any]) -> None:
    """Two preemptions (not counted in backoffLimit) later, it trained on (until the RayCluster
    was deleted under it: the last test)."""
    status = survivor["status"]
    assert int(status.get("preemptions") or 0) == 2 and int(status.get("restarts") or 0) == 0, status
    assert status["progress"]["step"] >= survivor["raycluster_deleted"]["step_seen"] > 0
    assert sorted(survivor["records"]) == [0, 1, 2]


def _started(records: list[dict[str, Any]]) -> dict[str, Any]:
    (start,) = [r for r in records if r["type"] == "event" and r["message"] == "training started"]
    return start


def _reached(records: list[dict[str, Any]]) -> int:
    return max(r["step"] for r in records if r["type"] in ("progress", "checkpoint"))


@pytest.mark.parametrize("fault,attempt", [("deleted", 0), ("evicted", 1)])
def test_a_deleted_or_evicted_worker_checkpoints_at_its_step_and_resumes_there(
    survivor: dict[str, Any], fault: str, attempt: int
) -> None:
    """SIGTERM to the pod (`kubectl delete pod`, or the Eviction API) → `ray start` drains the Ray
    node → every worker finishes its step, rank 0 writes a checkpoint at it → Preempted, not
    counted → the resubmission on the same RayCluster resumes at exactly that step."""
    last = survivor[fault]["status"]["lastFailure"]
    assert last["reason"] == "Preempted" and last["retried"] is True and last["attempt"] == attempt, last
    records = survivor["records"]
    # rank 0 says it for the drain; a drained rank whose process Ray then also SIGTERMs may say
    # it too (the same step: the workers agreed on it). Which notice a rank sees first is a race
    # (seen: rank 0 on the drained node got Ray's SIGTERM before the drain mark, once in two runs
    # with unthrottled pods); either way the workers agree on one step and checkpoint at it
    events = [r for r in records[attempt] if r["type"] == "event" and r["message"].startswith("preempted")]
    assert len({e["step"] for e in events}) == 1, events
    (event, *_) = sorted(events, key=lambda e: not e["signal"].startswith("Ray node drain"))
    assert event["signal"].startswith(("Ray node drain", "SIGTERM")), events
    assert any(r["type"] == "checkpoint" and r["step"] == event["step"] for r in records[attempt])
    assert last["step"] == event["step"]  # status names the step it stopped at
    start = _started(records[attempt + 1])
    assert start["start_step"] == event["step"] == _reached(records[attempt])  # nothing redone
    # goodput says so too: the attempt ended Preempted, the next one resumed at that step, 0 redone
    attempts = {a["attempt"]: a for a in survivor["status"]["goodput"]["attempts"]}
    assert attempts[attempt]["endedBy"] == "Preempted", attempts
    # on a failure: the next attempt's split, and each worker group's latest ledger in its log
    groups = {
        r["ledger"].get("group"): {"type": r["type"], "step": r.get("step"), **r["ledger"]}
        for r in records[attempt + 1]
        if isinstance(r.get("ledger"), dict)
    }
    seen = {"attempt": attempts[attempt + 1], "worker_groups": groups}
    assert attempts[attempt + 1]["resumedFrom"] == event["step"], seen
    assert attempts[attempt + 1]["redoneSteps"] == 0, seen
    assert attempts[attempt + 1]["seconds"]["checkpointRestore"] > 0, attempts
    f = survivor[fault]
    written = next(
        r["time"] for r in records[attempt] if r["type"] == "checkpoint" and r["step"] == event["step"]
    )
    record(
        f"fault: worker pod {fault}",
        {
            "stopped_at_step": event["step"],
            "rank0_notice": event["signal"],
            "fault_to_checkpoint_written_s": round(written - f["at"], 1),
            "drain_notice_to_checkpoint_s": event["seconds_to_checkpoint"],
            "fault_to_status_preempted_s": round(f["detected"] - f["at"], 1),
            "fault_to_training_again_s": round(f["resumed"] - f["at"], 1),
            "steps_redone": _reached(records[attempt]) - start["start_step"],
        },
    )


def test_a_raycluster_deleted_by_a_person_stops_the_job_saying_who_deleted_what(
    kube: KubeEnv, survivor: dict[str, Any]
) -> None:
    """`kubectl delete raycluster` mid-run: the operator's next reconcile finds it gone and fails
    the job at once (not retried: a cluster made again under the same name raced the old pods,
    still draining, and its resubmissions reached the old head), naming the RayCluster, that
    Forgeline did not delete it, and where the checkpoints are; nothing is left running."""
    status = survivor["status"]
    assert status["phase"] == "Failed" and status["reason"] == "ClusterLost", status
    assert f"RayCluster {JOB}-tj was deleted before its job finished, not by Forgeline" in status["message"]
    assert "resumeFrom" in status["message"] and status["checkpointUri"] in status["message"], status
    assert status["lastFailure"]["retried"] is False and int(status.get("restarts") or 0) == 0
    ns, f = survivor["ns"], survivor["raycluster_deleted"]
    assert kube.get("rayclusters", "-n", ns)["items"] == []
    assert kube.get("secrets", "-n", ns, "-l", f"forgeline.dev/job={JOB}")["items"] == []
    record(
        "fault: RayCluster deleted by a person", {"deletion_to_failed_s": round(f["detected"] - f["at"], 1)}
    )


def test_a_kube_apiserver_restart_under_running_pods_fails_and_restarts_nothing(
    survivor: dict[str, Any],
) -> None:
    """The kube-apiserver stopped and started again (etcd keeps its data) while the job's pods
    train: the kubelets, KubeRay, Kueue and the operator reconnect; the job goes on in the same
    attempt, its status follows it, and the next faults are handled as before."""
    a = survivor["apiserver"]
    assert a["attempts_after"] == a["attempts_before"] == 2, a
    assert a["status"]["phase"] == "Running" and a["step_after"] >= a["step_before"] + INTERVAL, a
    record(
        "fault: kube-apiserver restarted",
        {
            "unavailable_s": round(a["unavailable_s"], 1),
            "attempts_added": a["attempts_after"] - a["attempts_before"],
        },
    )


def test_operator_pod_deletions_lose_nothing_and_duplicate_nothing(
    kube: KubeEnv, survivor: dict[str, Any]
) -> None:
    """The operator pod deleted 8 times through the job's life (Provisioning, just after a
    submission, while each preemption is handled, mid-run after each resubmission, after the
    apiserver's restart, before the RayCluster's deletion): each time the Deployment starts a new
    one, which picks the job up where status says it is: one RayCluster all along, exactly one Ray
    submission per attempt, counters and progress never going back."""
    kills = survivor["operator_kills"]
    assert len(kills) == 8 and len({name for _, name, _ in kills}) == 8, kills
    events = survivor["events"]
    clusters = {e["involvedObject"].get("uid") for e in events if e["involvedObject"]["kind"] == "RayCluster"}
    assert clusters == {survivor["raycluster_uid"]}, clusters  # one RayCluster all along
    heads = [e for e in events if e["reason"] == "CreatedHeadPod"]
    assert len(heads) == 1, [e["message"] for e in heads]
    submitted = {(v.get("status", {}).get("ray") or {}).get("jobId") for v in survivor["versions"]} - {None}
    assert len(submitted) == 3, submitted  # attempts 0-2: one Ray job each
    assert survivor["submissions"] == sorted(submitted), survivor["submissions"]  # and Ray knows no other
    for records in survivor["records"].values():
        _started(records)  # exactly one start per attempt: none ran twice
    seen = {"restarts": 0, "preemptions": 0}
    for v in survivor["versions"]:
        st = v.get("status", {})
        for key in seen:
            assert int(st.get(key) or 0) >= seen[key], (key, st)
            seen[key] = int(st.get(key) or 0)
    # the last deleted one's successor is up (its Deployment reports it available)
    kube.kubectl("rollout", "status", f"deploy/{RELEASE}", "-n", RELEASE_NS, "--timeout=120s")
    (pod,) = [p for p in kube.pods(RELEASE_NS, OPERATOR) if not p["metadata"].get("deletionTimestamp")]
    assert pod["status"]["containerStatuses"][0]["ready"], pod["status"]
    record(
        "fault: operator pod deleted",
        {"deletions": [why for why, _, _ in kills], "ray_submissions": len(submitted), "duplicates": 0},
    )


@pytest.mark.soak
def test_a_deleted_head_pod_is_seen_and_the_job_resumes_on_the_new_head(kube: KubeEnv) -> None:
    """`kubectl delete pod <head>`: KubeRay makes a new head pod in the same RayCluster; its Ray
    (a new GCS) knows none of the old jobs; the workers' raylets give up on the old GCS after
    RAY_gcs_rpc_server_reconnect_timeout_s (20 s) and their containers restart into the new one.
    The operator sees the new head's name in the RayCluster's status (or the old address stops
    answering, FORGELINE_CLUSTER_LOST_SECONDS), counts ClusterLost and resubmits on the new head
    from the newest checkpoint: at most one interval redone. Then the RayCluster is deleted while
    a finalizer holds it (KubeRay ignores a RayCluster being deleted; its pods run on): the job's
    Ray job is stopped on the still-running head and the job fails saying what holds the
    deletion; once the finalizer goes, nothing is left."""
    ns = kube.namespace("head")
    doc = long_pretraining()
    kube.apply([doc], ns)

    def step(s: dict[str, Any]) -> int:
        return int((s.get("progress") or {}).get("step") or 0)

    kube.wait_for("TrainingJob", JOB, ns, lambda s: step(s) >= 2 * INTERVAL + 10, 420)
    old = head_pod(kube, ns)
    at = time.time()
    kube.kubectl("delete", "pod", old, "-n", ns, "--wait=false")
    s = kube.wait_for("TrainingJob", JOB, ns, lambda s: int(s.get("restarts") or 0) >= 1, 300)
    detected = time.time()
    last = s["lastFailure"]
    assert last["reason"] == "ClusterLost" and last["retried"] is True, last
    stopped = int(last["step"])
    s = kube.wait_for("TrainingJob", JOB, ns, lambda s: step(s) > stopped + 5, 420)
    resumed = time.time()
    new = head_pod(kube, ns)
    (submission,) = ray_submissions(kube, ns)  # the new head ran only the resubmission
    records = attempt_records(kube, ns, [submission])[1]
    start = next(r for r in records if r["type"] == "event" and r["message"] == "training started")
    assert stopped - start["start_step"] <= INTERVAL, (start, last)
    assert new != old and int(s.get("restarts") or 0) == 1
    record(
        "fault: head pod deleted",
        {
            "fault_to_status_s": round(detected - at, 1),
            "fault_to_training_again_s": round(resumed - at, 1),
            "steps_redone_at_most": max(0, stopped - start["start_step"]),
            "detected_by": "new head name" if "was replaced by" in last["message"] else "unreachable",
        },
    )
    # then a person deletes the RayCluster, and a finalizer (another controller's, a backup
    # tool's) holds it: KubeRay ignores a RayCluster being deleted, so its pods run on. The job
    # must not run on with them: its Ray job is stopped and it fails, saying what holds the deletion.
    cluster = f"{JOB}-tj"
    hold = '{"metadata":{"finalizers":["forgeline.dev/test-hold"]}}'
    kube.kubectl("patch", "raycluster", cluster, "-n", ns, "--type=merge", "-p", hold)
    at = time.time()
    kube.kubectl("delete", "raycluster", cluster, "-n", ns, "--wait=false")
    s = kube.wait_terminal("TrainingJob", JOB, ns, timeout=120)
    failed = time.time()
    assert s["phase"] == "Failed" and s["reason"] == "ClusterLost", s
    assert f"RayCluster {cluster} was deleted before its job finished, not by Forgeline" in s["message"], s
    assert "finalizers: forgeline.dev/test-hold), so Forgeline stopped its Ray job" in s["message"], s
    assert head_pod(kube, ns) == new  # the held cluster's head still runs: ask it
    code = (
        "import os; from ray.job_submission import JobSubmissionClient as C; "
        "auth = {'Authorization': 'Bearer ' + os.environ['RAY_AUTH_TOKEN']}; "
        f"print(C('http://127.0.0.1:8265', headers=auth).get_job_status('{submission}'))"
    )
    out = kube.kubectl("exec", "-n", ns, new, "-c", "ray-head", "--", "python", "-c", code).stdout
    assert out.strip().endswith("STOPPED"), out
    kube.kubectl(
        "patch",
        "raycluster",
        cluster,
        "-n",
        ns,
        "--type=json",
        "-p",
        '[{"op":"remove","path":"/metadata/finalizers"}]',
    )
    deadline = time.monotonic() + 180
    while kube.get("rayclusters,pods", "-n", ns)["items"] and time.monotonic() < deadline:
        time.sleep(2)
    assert kube.get("rayclusters,pods", "-n", ns)["items"] == []
    record(
        "fault: RayCluster deleted, its deletion held by a finalizer",
        {"deletion_to_failed_s": round(failed - at, 1)},
    )


@pytest.mark.soak
def test_twenty_operator_pod_deletions_at_random_points_lose_nothing(kube: KubeEnv) -> None:
    """The operator pod deleted 20 times at random moments (seeded; 3–20 s after its successor
    is ready) while jobs go through their whole lives: applied, provisioned, submitted, trained,
    one worker evicted (a resubmission), succeeded; a next job applied whenever one has ended
    and deletions remain. Every job Succeeded, each with one RayCluster and exactly one Ray
    submission per attempt (Ray's own list, asked on the job's head, which ttlSecondsAfterFinished
    keeps), restarts and preemptions never going back."""
    import random

    rng = random.Random(20)
    ns = kube.namespace("kills")
    kills: list[tuple[str, str, float]] = []
    names: list[str] = []

    def apply_next() -> str:
        doc = long_pretraining()
        name = doc["metadata"]["name"] = f"kills-{len(names)}"
        doc["spec"]["training"]["maxSteps"] = 900 if not names else 300
        doc["spec"]["ttlSecondsAfterFinished"] = 3600  # the head stays: Ray's list of submissions
        kube.apply([doc], ns)
        names.append(name)
        return name

    ray_knew: dict[str, list[str]] = {}

    def ray_list_then_free(name: str) -> None:
        """Ray's own list of the finished job's submissions, asked on its head (kept by the TTL),
        then its RayCluster deleted to free the node for the next job."""
        (head,) = [
            p["metadata"]["name"]
            for p in kube.pods(ns, f"forgeline.dev/job={name},ray.io/node-type=head")
            if not p["metadata"].get("deletionTimestamp")
        ]
        code = (
            "import os; from ray.job_submission import JobSubmissionClient as C; "
            "auth = {'Authorization': 'Bearer ' + os.environ['RAY_AUTH_TOKEN']}; "
            "print('\\n'.join(j.submission_id for j in C('http://127.0.0.1:8265', headers=auth).list_jobs()))"
        )
        out = kube.kubectl("exec", "-n", ns, head, "-c", "ray-head", "--", "python", "-c", code).stdout
        ray_knew[name] = sorted(out.split())
        kube.kubectl("delete", "raycluster", f"{name}-tj", "-n", ns, "--wait=false")

    def status(name: str) -> dict[str, Any]:
        return kube.get(PLURAL["TrainingJob"], name, "-n", ns).get("status") or {}

    evicted: dict[str, Any] = {}
    with Watch(kube, PLURAL["TrainingJob"], "-n", ns) as versions:
        current = apply_next()
        while len(kills) < 20:
            kube.kubectl("rollout", "status", f"deploy/{RELEASE}", "-n", RELEASE_NS, "--timeout=180s")
            time.sleep(rng.uniform(3, 20))
            s = status(current)
            kills.append(
                (f"{current}: {s.get('phase')}/{s.get('reason')}", delete_operator_pod(kube), time.time())
            )
            step = int((s.get("progress") or {}).get("step") or 0)
            if (
                not evicted
                and current == "kills-0"
                and step >= 2 * INTERVAL + 10
                and s.get("phase") == "Running"
            ):
                pods = [
                    p
                    for p in kube.pods(ns, "forgeline.dev/job=kills-0,ray.io/node-type=worker")
                    if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
                ]
                evict(kube, ns, pods[0]["metadata"]["name"])
                evicted = {"at": time.time(), "step_seen": step}
            if s.get("phase") in ("Succeeded", "Failed"):
                ray_list_then_free(current)
                current = apply_next()
        finals = {n: kube.wait_terminal("TrainingJob", n, ns, timeout=900) for n in names}
        if current not in ray_knew:
            ray_list_then_free(current)
    assert len({pod for _, pod, _ in kills}) == 20, kills
    assert evicted, "the first job never reached a step to evict at"
    for name, final in finals.items():
        assert final["phase"] == "Succeeded", (name, final)
    events = kube.get("events", "-n", ns)["items"]
    per_job: dict[str, Any] = {}
    for name in names:
        mine = [v for _, v in versions if v["metadata"]["name"] == name]
        submitted = {((v.get("status") or {}).get("ray") or {}).get("jobId") for v in mine} - {None}
        attempts = int(finals[name].get("restarts") or 0) + int(finals[name].get("preemptions") or 0)
        assert len(submitted) == attempts + 1, (name, submitted, finals[name])
        assert ray_knew[name] == sorted(submitted), (name, ray_knew[name], submitted)  # Ray ran no other
        clusters = {
            e["involvedObject"]["uid"]
            for e in events
            if e["involvedObject"]["kind"] == "RayCluster" and e["involvedObject"]["name"] == f"{name}-tj"
        }
        assert len(clusters) == 1, (name, clusters)
        seen = {"restarts": 0, "preemptions": 0}
        for v in mine:
            st = v.get("status") or {}
            for key in seen:
                assert int(st.get(key) or 0) >= seen[key], (name, key, st)
                seen[key] = int(st.get(key) or 0)
        per_job[name] = {"attempts": attempts + 1, "ray_submissions": len(submitted)}
    assert finals["kills-0"].get("preemptions") == 1, finals["kills-0"]
    kube.kubectl("delete", "trainingjobs", "--all", "-n", ns, "--timeout=180s")
    record(
        "soak: 20 operator pod deletions",
        {"deletions": [why for why, _, _ in kills], "jobs": per_job, "duplicates": 0},
    )


# -- the comparison: KubeRay alone, a RayJob under the same faults ---------------------------------


def _bare_rayjob(kube: KubeEnv, ns: str, name: str) -> dict[str, Any]:
    """A RayJob as a KubeRay user would write it for the same training: the very pods Forgeline
    makes (the operator makes the RayCluster for a twin TrainingJob, its spec is copied, the twin
    deleted), the same trainer and typed config as entrypoint, Ray token auth off (KubeRay v1.5.0's
    dashboard client sends no token), retries by KubeRay's own spec.backoffLimit."""
    import yaml

    from forgeline_operator.api import parse_job
    from forgeline_operator.api.jobconfig import build_job_config, dump_job_config
    from forgeline_operator.rayclient.rayjobs import CONFIG_ENV, entrypoint

    doc = long_pretraining()
    doc["metadata"]["name"] = name
    kube.apply([doc], ns)
    twin = kube.wait_for("TrainingJob", name, ns, lambda s: (s.get("ray") or {}).get("clusterName"), 120)
    rc = kube.get("raycluster", twin["ray"]["clusterName"], "-n", ns)
    kube.kubectl("delete", PLURAL["TrainingJob"], name, "-n", ns, "--timeout=120s")
    spec = rc["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            env = [e for e in c.get("env", []) if e["name"] not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")]
            c["env"] = [*env, {"name": "RAY_AUTH_MODE", "value": "disabled"}]
    head = spec["headGroupSpec"]["template"]["spec"]
    config = build_job_config(
        parse_job({**doc, "metadata": {**doc["metadata"], "namespace": ns, "uid": "0" * 16}})
    )
    env_vars = {CONFIG_ENV: dump_job_config(config), "PYTHONUNBUFFERED": "1"}
    submitter = {
        "name": "ray-job-submitter",
        "image": head["containers"][0]["image"],
        "securityContext": head["containers"][0].get("securityContext", {}),
        "resources": {
            "requests": {"cpu": "50m", "memory": "256Mi"},
            "limits": {"cpu": "500m", "memory": "512Mi"},
        },
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name},
        "spec": {
            "entrypoint": entrypoint(),
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": env_vars}),
            "rayClusterSpec": spec,
            "backoffLimit": 2,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 60,
            "submitterPodTemplate": {
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": head.get("securityContext", {}),
                    "containers": [submitter],
                }
            },
        },
    }


@pytest.mark.soak
def test_kuberay_alone_a_rayjob_under_the_same_faults(kube: KubeEnv) -> None:
    """What KubeRay (v1.5.0) alone tells a RayJob's user under the faults Forgeline handles: a
    worker pod deleted, then the head pod deleted. Every RayJob status version is kept (a watch),
    with the trainer's own records from the driver log; the figures go to docs/reliability.md
    beside Forgeline's for the same faults."""
    ns = kube.namespace("rayjob")
    name = "bare"
    job = _bare_rayjob(kube, ns, name)
    facts: dict[str, Any] = {}

    def head() -> str:
        (pod,) = [
            p["metadata"]["name"]
            for p in kube.pods(ns, "ray.io/node-type=head")
            if not p["metadata"].get("deletionTimestamp") and p["status"].get("phase") == "Running"
        ]
        return pod

    def records(job_id: str) -> list[dict[str, Any]]:
        log = f"/tmp/ray/session_latest/logs/job-driver-{job_id}.log"
        try:
            out = kube.kubectl("exec", "-n", ns, head(), "-c", "ray-head", "--", "cat", log).stdout
        except (RuntimeError, ValueError):  # the head is being replaced, or its driver has not started
            return []
        return parse_records(out)

    def reached(job_id: str) -> int:
        return max((r["step"] for r in records(job_id) if r.get("type") == "progress"), default=0)

    def until(check: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if got := check():
                return got
            time.sleep(3)
        return None

    def rayjob() -> dict[str, Any]:
        return kube.get("rayjob", name, "-n", ns)

    def seen_since(versions: list[tuple[float, dict[str, Any]]], since: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for at, v in versions:
            st = v.get("status") or {}
            row = {k: st.get(k) for k in ("jobStatus", "jobDeploymentStatus", "reason", "failed")}
            row["message"] = (st.get("message") or "")[:300]
            if at >= since and (not out or {k: out[-1][k] for k in row} != row):
                out.append({**row, "after_s": round(at - since, 1)})
        return out

    with Watch(kube, "rayjobs.ray.io", name, "-n", ns) as versions:
        applied = time.time()
        kube.apply([job], ns)
        job_id = until(lambda: (rayjob().get("status") or {}).get("jobId"), 300)
        assert job_id, rayjob()
        assert until(lambda: reached(job_id) >= 2 * INTERVAL + 10, 600), rayjob()
        facts["apply_to_step_110_s"] = round(time.time() - applied, 1)
        # 1. a worker pod deleted (the same command as for Forgeline's job)
        (victim, *_) = [
            p["metadata"]["name"]
            for p in kube.pods(ns, "ray.io/node-type=worker")
            if p["status"].get("phase") == "Running"
        ]
        at = time.time()
        step_seen = reached(job_id)
        kube.kubectl("delete", "pod", victim, "-n", ns, "--wait=false")
        time.sleep(90)
        recs = records(job_id)
        facts["worker_deleted"] = {
            "step_seen": step_seen,
            "rayjob_status_after": seen_since(versions, at),
            "trainer": [
                {k: r.get(k) for k in ("message", "step", "start_step", "signal") if r.get(k) is not None}
                for r in recs
                if r.get("type") == "event" and r.get("time", 0) >= at - 5
            ],
            "reached_90s_later": reached(job_id),
        }
        # 2. the head pod deleted
        at = time.time()
        old_head = head()
        kube.kubectl("delete", "pod", old_head, "-n", ns, "--wait=false")
        until(lambda: rayjob()["status"].get("jobDeploymentStatus") in ("Complete", "Failed"), 420)
        final = rayjob()
        facts["head_deleted"] = {
            "rayjob_status_after": seen_since(versions, at),
            "final": {
                k: final["status"].get(k) for k in ("jobStatus", "jobDeploymentStatus", "reason", "failed")
            },
        }
    record("comparison: a bare KubeRay RayJob under the same faults", facts)
    print(json.dumps(facts, indent=1))
    assert facts["worker_deleted"]["rayjob_status_after"] or facts["head_deleted"]["rayjob_status_after"]
    kube.kubectl("delete", "rayjob", name, "-n", ns, "--timeout=180s", check=False)
