"""Faults and load against the real operator process and the real kube-apiserver, with a Ray
Jobs API that does no training (tests/rayjobs_standin.py): the operator SIGKILLed at random points
of many jobs' lives, the apiserver restarted mid-run, the Ray head lost, and a burst of jobs
against the running-jobs cap. Training itself is the business of test_trainer/test_operator; here
every second goes to the operator's own behaviour.

The operator SIGKILLs (8 and 20) and the long variants (1,000 jobs) are marked `soak`: `make soak`
runs them; every suite deletes the real operator pod 8 times through a real job's life instead
(tests/test_kube_faults.py). Figures in docs/reliability.md.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from forgeline_operator.rayclient.rayjobs import parse_records

from .conftest import EXAMPLES, Cluster, Release
from .rayjobs_standin import RayJobsStandIn
from .test_operator import Operator

pytestmark = [pytest.mark.cluster, pytest.mark.operator]

CAP = 4
LOST_AFTER = 3.0  # FORGELINE_CLUSTER_LOST_SECONDS of this module's operator


@pytest.fixture(scope="module")
def standin() -> Iterator[RayJobsStandIn]:
    head = RayJobsStandIn(seconds_per_step=0.05).start()
    yield head
    head.stop()


@pytest.fixture(scope="module")
def chaos_operator(
    cluster: Cluster, standin: RayJobsStandIn, release: Release, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    logs = tmp_path_factory.mktemp("chaos")
    op = Operator(
        cluster,
        logs,
        logs / "operator.log",
        release.token_kubeconfig(logs / "sa.kubeconfig"),
        FORGELINE_BACKEND="address",
        FORGELINE_RAY_ADDRESS=standin.address,
        FORGELINE_MAX_RUNNING_JOBS=str(CAP),
        FORGELINE_CLUSTER_LOST_SECONDS=str(LOST_AFTER),
        FORGELINE_WATCH_NAMESPACES="ft-*",
        FORGELINE_STORAGE_PREFIXES=f"{logs}/runs",  # every job of this module writes under runs/
        FORGELINE_PRICE_PER_GPU_HOUR="2.5",
        FORGELINE_NODE_POOLS=json.dumps({"spot": {"gpuMemory": "24Gi", "pricePerGpuHour": 1.0}}),
    )
    op.start()
    yield op
    op.stop()


def _kubelet(op: Operator, restarts: list[int] | None = None) -> None:
    """What the operator's Deployment does (restartPolicy: Always): start it again if it exited."""
    if op.proc is not None and op.proc.poll() is not None:
        if restarts is not None:
            restarts.append(op.proc.returncode)
        op.start()


@pytest.fixture(autouse=True)
def _operator_running(chaos_operator: Operator) -> None:
    _kubelet(chaos_operator)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    with cluster.scratch_namespace("ft") as name:
        yield name


def _job(name: str, steps: int, **spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())
    doc["metadata"] = {"name": name}
    doc["spec"]["output"]["uri"] = f"runs/{name}"
    doc["spec"]["training"]["maxSteps"] = steps
    doc["spec"]["checkpointing"] = {"intervalSteps": 20, "keep": 2}
    doc["spec"].update(spec)
    return doc


def _create(cluster: Cluster, ns: str, docs: list[dict[str, Any]]) -> None:
    items = [{**d, "metadata": {**d["metadata"], "namespace": ns}} for d in docs]
    cluster.kubectl(
        "create",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        timeout=300,
    )


def _jobs(cluster: Cluster, ns: str) -> dict[str, dict[str, Any]]:
    out = json.loads(cluster.kubectl("get", "tj", "-n", ns, "-o", "json", timeout=120).stdout)
    return {o["metadata"]["name"]: o for o in out["items"]}


def _forgeline_logs(cluster: Cluster, ns: str, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "forgeline_operator.cli.main", "logs", name, "-n", ns, *args]
    return subprocess.run(
        [*argv, "--kubeconfig", str(cluster.kubeconfig)], capture_output=True, text=True, timeout=60
    )


def _until(predicate: Callable[[], Any], timeout: float, what: str, op: Operator) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    lines = op.log_path.read_text(errors="replace").splitlines()
    raise AssertionError(
        f"timed out waiting for {what}; operator log (last 40 lines):\n" + "\n".join(lines[-40:])
    )


def _all_succeeded(cluster: Cluster, ns: str, count: int) -> Callable[[], dict[str, dict[str, Any]] | None]:
    def check() -> dict[str, dict[str, Any]] | None:
        jobs = _jobs(cluster, ns)
        phases = [(j.get("status") or {}).get("phase") for j in jobs.values()]
        return jobs if len(jobs) == count and all(p == "Succeeded" for p in phases) else None

    return check


def _assert_ran_once_and_completely(
    jobs: dict[str, dict[str, Any]], standin: RayJobsStandIn, ns: str
) -> None:
    """Every job Succeeded on its first Ray submission, submitted exactly once, its status whole."""
    for name, obj in jobs.items():
        status = obj["status"]
        progress = status.get("progress") or {}
        assert status["restarts"] == 0 and not status.get("lastFailure"), (name, status)
        assert progress.get("step") == progress.get("totalSteps") == obj["spec"]["training"]["maxSteps"]
        assert status.get("startTime") and status.get("completionTime"), (name, status)
        sids = standin.submissions_of(ns, name)
        assert len(sids) == 1 and sids[0].endswith("-0"), (name, sids)
    assert standin.duplicate_submits == []


# -- the operator killed ------------------------------------------------------------------------


@pytest.mark.parametrize(
    # every suite deletes the real operator pod 8 times through a job's life (test_kube_faults);
    # these SIGKILLs of an operator process over 8 and 20 stand-in jobs run in make soak
    "kills",
    [
        pytest.param(8, id="8-kills", marks=pytest.mark.soak),
        pytest.param(20, id="20-kills", marks=pytest.mark.soak),
    ],
)
def test_operator_sigkilled_at_random_points_loses_and_duplicates_nothing(
    cluster: Cluster, chaos_operator: Operator, standin: RayJobsStandIn, namespace: str, kills: int
) -> None:
    """One new job per round, then SIGKILL the operator at a random moment and start it again:
    the kills land on jobs being accepted, queued by the cap, submitted, running and finishing,
    while the stand-in Ray head (as a KubeRay cluster would) keeps running their Ray jobs."""
    rng = random.Random(kills)
    names = [f"chaos-{i:02d}" for i in range(kills)]
    restarts: list[float] = []
    for name in names:
        _create(cluster, namespace, [_job(name, steps=rng.randrange(40, 160, 20))])
        time.sleep(rng.uniform(0.1, 2.5))
        chaos_operator.stop(kill=True)
        started = time.monotonic()
        chaos_operator.start()
        restarts.append(time.monotonic() - started)
    jobs = _until(_all_succeeded(cluster, namespace, kills), 240, f"{kills} jobs Succeeded", chaos_operator)
    _assert_ran_once_and_completely(jobs, standin, namespace)
    assert standin.max_running <= CAP
    print(
        f"\n{kills} operator SIGKILLs: {kills} jobs Succeeded, one Ray submission each, 0 duplicates; "
        f"operator back up in {sorted(restarts)[len(restarts) // 2]:.1f}s (median)"
    )


# -- the Ray head lost ---------------------------------------------------------------------------


def test_lost_ray_head_is_clusterlost_within_the_bound_and_the_job_resumes(
    cluster: Cluster, chaos_operator: Operator, namespace: str
) -> None:
    """A job on its own (stand-in) Ray head: the head dies mid-run, taking its jobs with it; the
    attempt is declared lost within FORGELINE_CLUSTER_LOST_SECONDS plus a reconcile, and once a
    head answers at the address again the job is resubmitted (attempt 1) and finishes."""
    head = RayJobsStandIn(seconds_per_step=0.05).start()
    _create(cluster, namespace, [_job("orphan", steps=200, ray={"address": head.address}, backoffLimit=2)])

    def status() -> dict[str, Any]:
        return _jobs(cluster, namespace)["orphan"].get("status") or {}

    _until(lambda: (status().get("progress") or {}).get("step", 0) >= 20, 60, "step 20", chaos_operator)
    head.stop()
    died = time.monotonic()
    _until(lambda: status().get("reason") == "RayUnreachable", 30, "RayUnreachable", chaos_operator)
    lost = _until(lambda: status().get("restarts") == 1 and status(), 30, "ClusterLost", chaos_operator)
    detected = time.monotonic() - died
    assert lost["lastFailure"]["reason"] == "ClusterLost" and lost["lastFailure"]["retried"] is True
    assert "does not answer" in lost["lastFailure"]["message"]
    assert detected < LOST_AFTER + 5
    back = RayJobsStandIn(seconds_per_step=0.05, port=head.port).start()  # the head restarted: no jobs
    try:
        final = _until(
            lambda: status().get("phase") == "Succeeded" and status(), 60, "Succeeded", chaos_operator
        )
        assert final["restarts"] == 1 and final["ray"]["jobId"].endswith("-1")
        assert not final["ray"].get("unreachableSince")
        assert len(back.jobs) == 1
    finally:
        back.stop()
    # the first attempt's head is gone with its log: the archive still has it
    assert [e["attempt"] for e in final["logs"]] == [0, 1]
    first = _forgeline_logs(cluster, namespace, "orphan", "--attempt", "0")
    assert first.returncode == 0, first.stderr
    steps = [r["step"] for r in parse_records(first.stdout) if r.get("type") == "progress"]
    assert steps and max(steps) >= 20 and max(steps) < 200
    missing = _forgeline_logs(cluster, namespace, "orphan", "--attempt", "7")
    assert missing.returncode == 1 and "it has attempts [0, 1]" in missing.stderr
    print(f"\nRay head lost: ClusterLost declared {detected:.1f}s after it died (bound {LOST_AFTER:g}s)")


def test_a_ray_head_that_never_answers_fails_after_the_backoff_limit(
    cluster: Cluster, chaos_operator: Operator, namespace: str
) -> None:
    dead = RayJobsStandIn()  # a port reserved and never served
    dead.server.server_close()
    started = time.monotonic()
    _create(cluster, namespace, [_job("nowhere", steps=20, ray={"address": dead.address}, backoffLimit=1)])

    def failed() -> dict[str, Any] | None:
        status = _jobs(cluster, namespace)["nowhere"].get("status") or {}
        return status if status.get("phase") == "Failed" else None

    status = _until(failed, 60, "Failed", chaos_operator)
    took = time.monotonic() - started
    assert status["reason"] == "ClusterLost" and status["restarts"] == 1
    assert status["lastFailure"]["reason"] == "ClusterLost" and status["lastFailure"]["retried"] is False
    assert dead.address in status["message"] and "spec.backoffLimit (1)" in status["message"]
    assert took >= 2 * LOST_AFTER
    print(
        f"\nunreachable Ray head: Failed/ClusterLost after {took:.1f}s "
        f"(backoffLimit 1, bound {LOST_AFTER:g}s)"
    )


# -- hostile paths ---------------------------------------------------------------------------------


def test_storage_outside_the_operators_prefixes_is_refused_naming_the_field(
    cluster: Cluster, chaos_operator: Operator, standin: RayJobsStandIn, namespace: str
) -> None:
    doc = _job("escape", steps=20, checkpointing={"storage": "s3://someone-else/ckpt"})
    doc["spec"]["output"]["uri"] = "runs/../../../escape"
    _create(cluster, namespace, [doc])

    def failed() -> dict[str, Any] | None:
        status = _jobs(cluster, namespace)["escape"].get("status") or {}
        return status if status.get("phase") == "Failed" else None

    status = _until(failed, 60, "Failed", chaos_operator)
    assert status["reason"] == "ValidationFailed"
    assert "spec.output.uri: 'runs/../../../escape' resolves to" in status["message"]
    assert "spec.checkpointing.storage: 's3://someone-else/ckpt'" in status["message"]
    assert "FORGELINE_STORAGE_PREFIXES" in status["message"]
    assert standin.submissions_of(namespace, "escape") == []
    assert not (chaos_operator.workdir.parent / "escape").exists()


# -- eval-gated promotion ---------------------------------------------------------------------------


def test_an_unpromoted_output_is_refused_downstream_unless_allowed(
    cluster: Cluster, chaos_operator: Operator, standin: RayJobsStandIn, namespace: str
) -> None:
    """Two jobs with a gate: one whose held-out loss improves past its interval (Promoted True,
    Improved), one held to a threshold it cannot reach (Promoted False, ThresholdNotMet, a Warning
    Event, the output kept). A continued pretraining from the unpromoted one fails at once saying
    why and what to set; one that sets allowUnpromoted trains from it."""
    better = _job("gate-better", steps=20, promotion={"metric": "eval_loss", "minImprovement": 0.5})
    unmet = _job("gate-unmet", steps=20, promotion={"metric": "eval_loss", "threshold": 0.01})
    _create(cluster, namespace, [better, unmet])
    jobs = _until(_all_succeeded(cluster, namespace, 2), 120, "both gated jobs Succeeded", chaos_operator)

    def promoted(name: str) -> dict[str, Any]:
        status = jobs[name]["status"]
        (cond,) = [c for c in status["conditions"] if c["type"] == "Promoted"]
        return {**cond, "verdict": status["promotion"]}

    ok, no = promoted("gate-better"), promoted("gate-unmet")
    assert (ok["status"], ok["reason"], ok["verdict"]["promoted"]) == ("True", "Improved", True), ok
    assert ok["verdict"]["before"] == 5.0 and ok["verdict"]["interval95"] == pytest.approx(0.0707, abs=1e-3)
    assert ok["message"].startswith("eval_loss 5 → 0.2381: eval_loss improved by 4.762"), ok
    assert (no["status"], no["reason"]) == ("False", "ThresholdNotMet"), no
    assert no["message"] == "eval_loss 0.2381 after training; promotion needs at most 0.01: not promoted"
    events = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    assert any(e["reason"] == "ThresholdNotMet" and e["type"] == "Warning" for e in events)

    def downstream(name: str, upstream: str, allow: bool) -> dict[str, Any]:
        doc = _job(name, steps=20)
        doc["spec"]["model"] = {"initFrom": {"fromJob": {"kind": "TrainingJob", "name": upstream}}}
        if allow:
            doc["spec"]["model"]["initFrom"]["fromJob"]["allowUnpromoted"] = True
        doc["spec"]["data"].pop("tokenizer", None)  # the tokenizer comes from the initFrom model
        return doc

    _create(
        cluster,
        namespace,
        [downstream("from-unmet", "gate-unmet", False), downstream("from-unmet-anyway", "gate-unmet", True)],
    )

    def phases() -> dict[str, dict[str, Any]] | None:
        now = {n: j.get("status") or {} for n, j in _jobs(cluster, namespace).items()}
        refused, anyway = now.get("from-unmet", {}), now.get("from-unmet-anyway", {})
        return now if refused.get("phase") == "Failed" and anyway.get("phase") == "Succeeded" else None

    now = _until(phases, 120, "the refusal and the allowed run", chaos_operator)
    refused = now["from-unmet"]
    assert refused["reason"] == "UpstreamNotPromoted", refused
    assert refused["message"] == (
        "TrainingJob/gate-unmet succeeded but its output was not promoted (ThresholdNotMet: eval_loss "
        "0.2381 after training; promotion needs at most 0.01: not promoted); this job trains from it: "
        "set spec.model.initFrom.fromJob.allowUnpromoted: true to use it anyway"
    )
    assert standin.submissions_of(namespace, "from-unmet") == []  # nothing ran, nothing was made
    assert len(standin.submissions_of(namespace, "from-unmet-anyway")) == 1


# -- a burst against the cap ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "count", [pytest.param(40, id="40-jobs"), pytest.param(1000, id="1000-jobs", marks=pytest.mark.soak)]
)
def test_a_burst_of_jobs_never_exceeds_the_running_jobs_cap(
    cluster: Cluster, chaos_operator: Operator, standin: RayJobsStandIn, namespace: str, count: int
) -> None:
    """`count` jobs created at once: at no moment do more than CAP run (sampled every 20 ms by
    the Ray stand-in, and in every status poll), the cap is used, the rest wait in Pending saying
    so and start first come, first served, each job is submitted once, and all succeed."""
    before = standin.max_running
    standin.max_running = 0
    started = time.monotonic()
    docs = [_job(f"burst-{i:04d}", steps=20) for i in range(count)]
    for chunk in range(0, count, 250):
        _create(cluster, namespace, docs[chunk : chunk + 250])
    active_max, queued = 0, set()

    def done() -> dict[str, dict[str, Any]] | None:
        nonlocal active_max
        jobs = _jobs(cluster, namespace)
        statuses = [j.get("status") or {} for j in jobs.values()]
        phases = [s.get("phase") for s in statuses]
        active_max = max(active_max, sum(p in ("Provisioning", "Running") for p in phases))
        queued.update(s.get("message", "") for s in statuses if s.get("reason") == "Queued")
        return jobs if len(jobs) == count and all(p == "Succeeded" for p in phases) else None

    jobs = _until(done, 120 + count * 3, f"{count} jobs Succeeded", chaos_operator)
    elapsed = time.monotonic() - started
    _assert_ran_once_and_completely(jobs, standin, namespace)
    assert standin.max_running == CAP, (standin.max_running, before)
    assert active_max <= CAP
    assert any(f"waiting for one of {CAP} slots" in m for m in queued), queued
    # goodput counts the wait behind the cap as queued (holding nothing), as status.timings does
    waits = {n: (j["status"]["goodput"], j["status"]["timings"]) for n, j in jobs.items()}
    off = {n: (g["seconds"]["queued"], t["queuedSeconds"]) for n, (g, t) in waits.items()}
    assert all(abs(a - b) <= 2.0 for a, b in off.values()), off
    assert max(a for a, _ in off.values()) > 5, off
    assert all(
        g["heldSeconds"] + g["seconds"]["queued"] == pytest.approx(g["totalSeconds"], abs=0.2)
        for g, _ in waits.values()
    )
    starts = [jobs[d["metadata"]["name"]]["status"]["startTime"] for d in docs]
    # first come, first served: jobs admitted in one wave (up to CAP slots freed at once) may
    # start in any order within it, never after a job CAP places behind them
    late = [(i, j) for i in range(count) for j in range(i + CAP, count) if starts[j] < starts[i]]
    assert not late, f"not first come, first served: {late[:5]}"
    print(
        f"\n{count} jobs against a cap of {CAP}: all Succeeded in {elapsed:.0f}s; at most {CAP} ran at once"
    )


# -- the apiserver restarted (last in the module: the session's control plane is shared) ----------


def test_apiserver_restart_mid_run_fails_no_job(
    cluster: Cluster, chaos_operator: Operator, standin: RayJobsStandIn, namespace: str
) -> None:
    if cluster.control_plane is None:
        pytest.skip("FORGELINE_TEST_KUBECONFIG: an external cluster's apiserver is not ours to restart")
    _create(cluster, namespace, [_job(f"steady-{i}", steps=200) for i in range(3)])

    def running() -> bool:
        phases = [(j.get("status") or {}).get("phase") for j in _jobs(cluster, namespace).values()]
        return phases.count("Running") == 3

    _until(running, 60, "3 jobs Running", chaos_operator)
    down = cluster.control_plane.restart_apiserver(down_seconds=3)
    exits: list[int] = []
    succeeded = _all_succeeded(cluster, namespace, 3)

    def done() -> dict[str, dict[str, Any]] | None:
        _kubelet(chaos_operator, exits)  # kopf stops if the restarted apiserver 404s its watches
        return succeeded()

    _until(done, 120, "3 jobs Succeeded", chaos_operator)
    # and it still sees what happens after the restart: a new job in the watched namespace
    _create(cluster, namespace, [_job("after-restart", steps=20)])
    succeeded = _all_succeeded(cluster, namespace, 4)
    jobs = _until(done, 120, "the job created after the restart Succeeded", chaos_operator)
    _assert_ran_once_and_completely(jobs, standin, namespace)
    print(
        f"\nkube-apiserver unavailable for {down:.1f}s mid-run: 3 jobs Succeeded, none restarted; "
        f"the operator process exited {len(exits)} time(s) and was restarted as its Deployment would"
    )


# -- cost and fit ---------------------------------------------------------------------------------


def _condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == ctype), {})


def test_live_cost_warns_budget_at_risk_before_the_budget_stops_the_job(
    cluster: Cluster, chaos_operator: Operator, standin: RayJobsStandIn, namespace: str
) -> None:
    """32 "GPUs" for 400 steps of 0.05 s: 0.18 GPU-hours at this pace, against a budget of 0.1.
    The projection says so (BudgetAtRisk) seconds before the budget stops it at 11 s; a job on
    the spot pool is priced at the pool's $1.00, and both show their cost in `kubectl get`."""
    gpus = {"workers": 2, "gpusPerWorker": 16, "cpu": "1", "memory": "2Gi"}
    risky = _job("risky", 400, resources=gpus, budget={"maxGpuHours": 0.1})
    risky["spec"]["training"]["globalBatchSize"] = 8 * 32
    spot = _job("spot", 100, resources={**gpus, "workers": 1, "gpusPerWorker": 2, "nodePool": "spot"})
    _create(cluster, namespace, [risky, spot])

    def at_risk() -> dict[str, Any] | None:
        obj = _jobs(cluster, namespace)["risky"]
        return obj if _condition(obj, "BudgetAtRisk").get("status") == "True" else None

    warned = _until(at_risk, 60, "BudgetAtRisk", chaos_operator)
    assert warned["status"]["phase"] == "Running", warned["status"]
    assert "over spec.budget.maxGpuHours (0.1)" in _condition(warned, "BudgetAtRisk")["message"]
    cost = warned["status"]["cost"]
    assert cost["gpus"] == 32 and cost["pricePerGpuHour"] == 2.5 and cost["currency"] == "$"
    assert cost["gpuHours"] < 0.1 < cost["projectedGpuHours"], cost
    assert cost["projectedCost"] == pytest.approx(cost["projectedGpuHours"] * 2.5, rel=1e-3)

    def finished() -> dict[str, dict[str, Any]] | None:
        jobs = _jobs(cluster, namespace)
        phases = {n: (o.get("status") or {}).get("phase") for n, o in jobs.items()}
        return jobs if phases == {"risky": "Failed", "spot": "Succeeded"} else None

    jobs = _until(finished, 90, "the budget to stop risky and spot to finish", chaos_operator)
    stopped = jobs["risky"]["status"]
    assert stopped["reason"] == "BudgetExceeded", stopped
    assert stopped["cost"]["gpuHours"] == pytest.approx(0.1, rel=0.5)  # stopped at the limit
    done = jobs["spot"]["status"]["cost"]
    assert done["pricePerGpuHour"] == 1.0 and done["cost"] == pytest.approx(done["gpuHours"], rel=1e-3)
    assert done["projectedGpuHours"] == done["gpuHours"] and not _condition(jobs["spot"], "BudgetAtRisk")
    table = cluster.kubectl("get", "tj", "-n", namespace, timeout=60).stdout
    assert "COST" in table.splitlines()[0], table
    assert f"${stopped['cost']['cost']:.2f}" in table, table
    events = cluster.kubectl("get", "events", "-n", namespace, timeout=60).stdout
    assert "ProjectedOverBudget" in events, events


def test_fits_is_decided_before_provisioning_and_says_what_to_change(
    cluster: Cluster, chaos_operator: Operator, namespace: str
) -> None:
    """A 7B full fine-tune on the spot pool's 24Gi GPUs does not fit; 7B QLoRA does. Both are
    suspended from the start: the condition is there before anything is provisioned."""
    docs = []
    for name, method, extra in (("full-7b", "full", {}), ("qlora-7b", "qlora", {"quantization": {}})):
        docs.append(
            {
                "apiVersion": "forgeline.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "suspend": True,
                    "baseModel": {"hubId": "meta-llama/Llama-2-7b-hf"},
                    "method": method,
                    "dataset": {
                        "sources": [{"uri": "d.jsonl"}],
                        "format": "alpaca",
                        "maxSequenceLength": 512,
                    },
                    "training": {"maxSteps": 10, "microBatchSize": 1, "gradientCheckpointing": True},
                    "resources": {"gpusPerWorker": 1, "nodePool": "spot"},
                    "output": {"uri": f"runs/{name}"},
                    **extra,
                },
            }
        )
    cluster.kubectl(
        "create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    )

    def conditions() -> dict[str, dict[str, Any]] | None:
        out = json.loads(cluster.kubectl("get", "ftj", "-n", namespace, "-o", "json").stdout)["items"]
        found = {o["metadata"]["name"]: _condition(o, "Fits") for o in out}
        return found if len(found) == 2 and all(found.values()) else None

    found = _until(conditions, 30, "Fits conditions", chaos_operator)
    full, qlora = found["full-7b"], found["qlora-7b"]
    assert (full["status"], full["reason"]) == ("False", "ExceedsGpuMemory"), full
    assert "node pool spot: gpuMemory 24Gi" in full["message"] and "method: qlora" in full["message"]
    assert (qlora["status"], qlora["reason"]) == ("True", "FitsInGpuMemory"), qlora
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=ExceedsGpuMemory")
    assert "full-7b" in events.stdout, events.stdout


def test_the_operator_keeps_one_ray_client_per_cluster(standin: RayJobsStandIn) -> None:
    """Reconciles reuse the Jobs API client (building one costs a version request), one per
    address and token, and the cache is bounded."""
    from forgeline_operator.controller import runtime
    from forgeline_operator.controller.settings import OperatorSettings

    rt = runtime.Runtime(OperatorSettings())
    first = rt.ray_jobs(standin.address, None, "t1")
    assert rt.ray_jobs(standin.address, None, "t1") is first
    assert rt.ray_jobs(standin.address, None, "t2") is not first
    assert first.status("no-such-job") is None  # it answers, and keeps answering when reused
    for i in range(runtime._RAY_CLIENTS_KEPT + 5):  # clusters that came and went
        rt._ray_clients[(f"http://gone-{i}", None, None)] = first
    newest = rt.ray_jobs(standin.address, None, "t3")
    assert len(rt._ray_clients) == runtime._RAY_CLIENTS_KEPT
    assert rt.ray_jobs(standin.address, None, "t3") is newest
