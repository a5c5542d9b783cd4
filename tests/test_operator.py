"""The operator for real: a `python -m forgeline_operator` process against the real apiserver,
running jobs on a real (embedded) Ray through the Ray Jobs API.

The session operator uses backend=address pointing at a test-owned Ray head, so the Ray head
outlives operator restarts and the tests can look at the Ray jobs directly. Its running-jobs cap
is 1 (the 2-core machine runs one 2-worker job at a time anyway); the cap itself is tested under
load and faults in test_faults.py.
The KubeRay test runs a second operator with backend=kuberay and stands in for KubeRay itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from forgeline_operator.controller import goodput
from forgeline_operator.controller.decisions import parse_time
from forgeline_operator.dev.operator_process import OperatorProcess
from forgeline_operator.rayclient.localray import LocalRay
from forgeline_operator.rayclient.rayjobs import RayJobs

from . import test_first_contact as first_contact
from .conftest import CHART, EXAMPLES, Cluster, Release
from .prom import GpuStandIn, Prometheus
from .rayjobs_standin import RayJobsStandIn

pytestmark = [pytest.mark.cluster, pytest.mark.operator]


class Operator(OperatorProcess):
    """An operator subprocess with the tests' settings (fast reconciles, fault injection on)."""

    def __init__(
        self, cluster: Cluster, workdir: Path, log: Path, kubeconfig: Path | None = None, **env: str
    ) -> None:
        self.cluster = cluster
        super().__init__(
            kubeconfig or cluster.kubeconfig,
            workdir,
            log,
            FORGELINE_RECONCILE_INTERVAL="1",
            FORGELINE_LOCAL_WORK_DIR=str(workdir),
            FORGELINE_ALLOW_FAULT_INJECTION="true",  # the fail-at-step annotation (off by default)
            **env,
        )

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)

    def forbidden(self) -> list[str]:
        """Log lines where the apiserver refused the operator something (RBAC)."""
        return [
            line
            for line in self.log_path.read_text(errors="replace").splitlines()
            if "forbidden" in line.lower() or "APIForbiddenError" in line
        ]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalRay]:
    """This module's Ray head: gone when the module's tests are (the suite runs on 2 cores)."""
    with LocalRay() as head:
        yield head


@pytest.fixture(scope="session")
def op_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("operator-work")
    (d / "examples").symlink_to(EXAMPLES)
    return d


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster,
    ray_head: LocalRay,
    op_workdir: Path,
    release: Release,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Operator]:
    """The operator as the chart deploys it: authenticated as the chart's ServiceAccount."""
    logs = tmp_path_factory.mktemp("logs")
    op = Operator(
        cluster,
        op_workdir,
        logs / "operator.log",
        release.token_kubeconfig(logs / "sa.kubeconfig"),
        FORGELINE_BACKEND="address",
        FORGELINE_RAY_ADDRESS=ray_head.address,
        FORGELINE_RAY_TOKEN=ray_head.token,
        FORGELINE_MAX_RUNNING_JOBS="1",
        FORGELINE_WATCH_NAMESPACES="op-*",
        FORGELINE_PRICE_PER_GPU_HOUR="2.5",
    )  # only these tests' namespaces
    op.start()
    yield op
    op.stop()


@pytest.fixture(scope="module", autouse=True)
def prometheus(
    operator: Operator, ray_head: LocalRay, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """A real Prometheus scraping this module's operator(s) and Ray head every second, with the
    shipped alert rules loaded; the last test checks every dashboard panel against it."""
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"))
    prom.add_target("forgeline-operator", f"127.0.0.1:{operator.metrics_port}")
    prom.add_target("forgeline-ray", f"127.0.0.1:{ray_head.metrics_port}")
    gpu = None if shutil.which("nvidia-smi") else GpuStandIn()  # Ray exports GPU metrics only with GPUs
    if gpu:
        prom.add_target("forgeline-ray", f"127.0.0.1:{gpu.port}")
    prom.start()
    yield prom
    prom.stop()
    if gpu:
        gpu.stop()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """Operator tests get `op-*` namespaces: the session operator watches only those (jobs other
    test modules created in their `t-*` namespaces are not its business)."""
    with cluster.scratch_namespace("op") as name:
        yield name


def _get(cluster: Cluster, kind: str, name: str, ns: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", kind, name, "-n", ns, "-o", "json").stdout)


def _wait(predicate: Callable[[], Any], timeout: float, what: str, op: Operator | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.5)
    tail = "\n".join(
        line
        for line in (op.log_path.read_text().splitlines() if op else [])
        if "Timer 'reconcile' succeeded" not in line
    )[-4000:]
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def _apply(cluster: Cluster, ns: str, doc: dict[str, Any]) -> None:
    doc = {**doc, "metadata": {**doc["metadata"], "namespace": ns}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))


def _example(name: str, **spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    doc["spec"].update(spec)
    return doc


def _phase(cluster: Cluster, kind: str, name: str, ns: str) -> str | None:
    return (_get(cluster, kind, name, ns).get("status") or {}).get("phase")


def _watch_until_done(
    cluster: Cluster, kind: str, name: str, ns: str, op: Operator, timeout: float = 300
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll the job to a terminal phase; return the final object and every status seen."""
    seen: list[dict[str, Any]] = []

    def done() -> Any:
        obj = _get(cluster, kind, name, ns)
        status = obj.get("status") or {}
        seen.append(status)
        return obj if status.get("phase") in ("Succeeded", "Failed") else None

    try:
        return _wait(done, timeout, f"{kind}/{name} to finish", op), seen
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\nlast status: {json.dumps(seen[-1] if seen else None, indent=1)}"
        ) from None


# -- the happy path ------------------------------------------------------------------------------


def test_invalid_spec_fails_with_validation_failed_and_creates_nothing(
    cluster: Cluster, operator: Operator, namespace: str, ray_head: LocalRay
) -> None:
    doc = _example("pretrain-tiny-llama", deepspeed={"zeroStage": 2, "offloadParams": True})
    doc["metadata"]["name"] = "bad-offload"
    _apply(cluster, namespace, doc)
    status = _wait(
        lambda: (
            (_get(cluster, "tj", "bad-offload", namespace).get("status") or {})
            if _phase(cluster, "tj", "bad-offload", namespace) == "Failed"
            else None
        ),
        60,
        "ValidationFailed",
        operator,
    )
    assert status["reason"] == "ValidationFailed"
    assert "spec.deepspeed.offloadParams" in status["message"] and "zeroStage: 3" in status["message"]
    time.sleep(3)  # a few reconcile intervals: still nothing may appear
    assert "bad-offload" not in json.dumps(
        [j.metadata for j in RayJobs(ray_head.address, token=ray_head.token).client.list_jobs()]
    )
    assert (
        cluster.kubectl("get", "rayclusters,secrets", "-n", namespace, "-o", "name").stdout.count(
            "bad-offload"
        )
        == 0
    )


# -- failures, suspend, deletion, restarts ------------------------------------------------------


def _long_job(name: str, steps: int = 400) -> dict[str, Any]:
    doc = _example("pretrain-tiny-llama")
    doc["metadata"]["name"] = name
    doc["spec"]["output"]["uri"] = f"runs/{name}"
    doc["spec"]["training"]["maxSteps"] = steps
    doc["spec"]["checkpointing"] = {"intervalSteps": 20, "keep": 2}
    doc["spec"]["evaluation"] = {"holdoutFraction": 0.0}
    return doc


@pytest.mark.soak  # every suite: a real worker pod lost, resubmitted from its checkpoint (test_kube_faults)
def test_injected_trainer_failure_is_retried_and_recovers(
    cluster: Cluster, operator: Operator, namespace: str, op_workdir: Path
) -> None:
    doc = _long_job("flaky", steps=60)
    doc["metadata"]["annotations"] = {"forgeline.dev/fail-at-step": "20"}
    _apply(cluster, namespace, doc)
    final, _ = _watch_until_done(cluster, "tj", "flaky", namespace, operator)
    assert final["status"]["phase"] == "Succeeded" and final["status"]["restarts"] == 1
    assert final["status"]["ray"]["jobId"].endswith("-1")
    metrics = json.loads((op_workdir / "runs/flaky/metrics.json").read_text())
    assert metrics["resumed_from_step"] == 20
    events = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    assert any(
        e["reason"] == "RayJobFailed"
        and "(UserCodeError): " in e["message"]
        and "injected failure" in e["message"]
        for e in events
    )
    last = final["status"]["lastFailure"]  # the failed attempt, classified and kept after the recovery
    assert last["reason"] == "UserCodeError" and last["attempt"] == 0 and last["retried"] is True
    assert "injected failure" in last["message"] and "20" in last["message"] and last["step"] >= 1
    assert any("injected failure" in line for line in last["logLines"]) and last["fix"]
    assert 'forgeline_job_failures_total{kind="TrainingJob",reason="UserCodeError"} 1.0' in operator.metrics()
    # each attempt's Ray job log is archived next to the checkpoints; `forgeline logs` prints it
    logs = {e["attempt"]: Path(e["uri"]) for e in final["status"]["logs"]}
    assert sorted(logs) == [0, 1] and all(op_workdir in p.parents for p in logs.values())
    first = subprocess.run(
        [
            sys.executable,
            "-m",
            "forgeline_operator.cli.main",
            "logs",
            "flaky",
            "-n",
            namespace,
            "--attempt",
            "0",
        ]
        + ["--kubeconfig", str(cluster.kubeconfig)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 0 and "injected failure after step 20" in first.stdout, first.stderr
    assert "resumed from checkpoint" in logs[1].read_text()


def test_a_failure_retrying_cannot_fix_fails_at_once_with_its_reason(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    doc = _long_job("no-data", steps=20)
    doc["spec"]["data"]["sources"] = [{"uri": "examples/data/missing-corpus.jsonl"}]
    doc["spec"]["backoffLimit"] = 3
    _apply(cluster, namespace, doc)
    final, _ = _watch_until_done(cluster, "tj", "no-data", namespace, operator, timeout=240)
    status = final["status"]
    assert status["phase"] == "Failed" and status["reason"] == "DataError", status
    assert status["restarts"] == 0  # not retried: a missing file stays missing
    assert "missing-corpus.jsonl" in status["message"] and "fix:" in status["message"]
    last = status["lastFailure"]
    assert last["reason"] == "DataError" and last["retried"] is False and last["attempt"] == 0
    assert "missing-corpus.jsonl" in last["message"] and last["fix"]


@pytest.mark.parametrize("case", sorted(first_contact.CASES))
def test_a_job_that_cannot_run_says_the_same_line_as_forgeline_run(
    cluster: Cluster, operator: Operator, namespace: str, op_workdir: Path, case: str
) -> None:
    """tests/test_first_contact.py's cases through the operator: the Ray driver makes the same
    checks before anything else, and status.message is the line `forgeline run` prints for the
    same job in the same directory (one formatter); Failed at once, not retried, in seconds."""
    from forgeline_operator.api import parse_job
    from forgeline_operator.cli.runlocal import check_inputs

    name = f"fc-{case}"
    doc = first_contact.manifest(case, name)
    doc["spec"]["output"]["uri"] = f"runs/{name}"
    ((_, problem),) = check_inputs([parse_job(doc)], None, str(op_workdir))
    started = time.monotonic()
    _apply(cluster, namespace, doc)
    kind = "tj" if doc["kind"] == "TrainingJob" else "ftj"
    final, _ = _watch_until_done(cluster, kind, name, namespace, operator, timeout=120)
    took = time.monotonic() - started
    status = final["status"]
    start, says = first_contact.expected(case)
    assert status["phase"] == "Failed" and status["message"] == problem.line(), status
    assert status["message"].startswith(start) and says in status["message"]
    assert status["restarts"] == 0 and status["lastFailure"]["retried"] is False
    assert "Traceback" not in status["message"]
    print(f"\n{case}: Failed {took:.1f}s after the apply: {status['message']}")
    assert took < 60, took


def test_watchdog_restarts_a_hung_job_from_its_checkpoint(
    cluster: Cluster, operator: Operator, namespace: str, op_workdir: Path
) -> None:
    """Attempt 0 hangs after step 25 (alive, no more steps); the watchdog stops it after
    stallSeconds and resubmits it, and attempt 1 resumes from the step-20 checkpoint."""
    doc = _long_job("hung", steps=60)
    doc["metadata"]["annotations"] = {"forgeline.dev/hang-at-step": "25"}
    doc["spec"]["watchdog"] = {"stallSeconds": 15}
    _apply(cluster, namespace, doc)
    final, _ = _watch_until_done(cluster, "tj", "hung", namespace, operator, timeout=400)
    status = final["status"]
    assert status["phase"] == "Succeeded" and status["restarts"] == 1, status
    last = status["lastFailure"]
    assert last["reason"] == "Stalled" and last["retried"] is True and last["attempt"] == 0
    assert "spec.watchdog.stallSeconds" in last["message"] and 1 <= last["step"] <= 25
    metrics = json.loads((op_workdir / "runs/hung/metrics.json").read_text())
    assert metrics["resumed_from_step"] == 20
    assert 'forgeline_job_failures_total{kind="TrainingJob",reason="Stalled"} 1.0' in operator.metrics()
    _check_goodput_of_a_stall(final, stall_seconds=15, last_step=last["step"], checkpoint=20)
    text = subprocess.run(
        [sys.executable, "-m", "forgeline_operator.cli.main", "report", "hung", "-n", namespace]
        + ["--kubeconfig", str(cluster.kubeconfig)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert text.returncode == 0, text.stderr
    assert "attempt 0 ended Stalled" in text.stdout and "attempt 1 ended Succeeded" in text.stdout
    assert "resumed from step 20" in text.stdout and "stalled" in text.stdout, text.stdout


def _check_goodput_of_a_stall(
    final: dict[str, Any], stall_seconds: float, last_step: int, checkpoint: int
) -> None:
    """status.goodput of a job whose attempt 0 stalled after `last_step` and whose attempt 1
    resumed from the `checkpoint` step: every category accounted, the stall as stalled, the steps
    done again as redone, the restore timed, and the whole adding up to the job's wall time."""
    status = final["status"]
    g = status["goodput"]
    seconds = g["seconds"]
    assert set(seconds) == set(goodput.CATEGORIES), g
    wall = (
        parse_time(status["completionTime"]) - parse_time(final["metadata"]["creationTimestamp"])
    ).total_seconds()
    assert abs(g["totalSeconds"] - wall) <= 3.0, (wall, json.dumps(g, indent=1))  # both clocks, seconds apart
    assert g["heldSeconds"] == pytest.approx(g["totalSeconds"] - seconds["queued"], abs=0.2)
    a0, a1 = g["attempts"]
    assert (a0["attempt"], a0["endedBy"], a1["attempt"], a1["endedBy"]) == (0, "Stalled", 1, "Succeeded")
    assert a0["seconds"]["stalled"] >= stall_seconds - 1, a0  # from the last step seen to the stop
    assert a0["lastStep"] == last_step and a1["resumedFrom"] == checkpoint
    assert a1["redoneSteps"] == max(0, last_step - checkpoint) == g["redoneSteps"], (a0, a1)
    assert a1["seconds"]["checkpointRestore"] > 0 and a1["seconds"]["checkpointSave"] > 0
    assert a1["seconds"]["productive"] > 0 and a1["seconds"]["startup"] > 0
    if a1["redoneSteps"]:
        assert a1["seconds"]["redone"] == pytest.approx(a1["redoneSteps"] * a1["secondsPerStep"], rel=0.05)
    for a in (a0, a1):
        assert all(v >= 0 for v in a["seconds"].values())
    assert 0 < g["fraction"] < 1 and g["display"].startswith(f"{g['fraction']:.0%}")
    assert g["chipUnit"] == "CPU core" and g["chipHours"] == pytest.approx(
        g["heldSeconds"] * g["chips"] / 3600, rel=1e-3
    )


def test_suspend_stops_and_resume_continues_from_checkpoint(
    cluster: Cluster, operator: Operator, namespace: str, ray_head: LocalRay, op_workdir: Path
) -> None:
    _apply(cluster, namespace, _long_job("pausable", steps=100))  # suspended at step 25 or so
    _wait(
        lambda: (
            ((_get(cluster, "tj", "pausable", namespace).get("status") or {}).get("progress") or {}).get(
                "step", 0
            )
            >= 25
        ),
        180,
        "25 steps",
        operator,
    )
    first_sid = _get(cluster, "tj", "pausable", namespace)["status"]["ray"]["jobId"]
    cluster.kubectl(
        "patch", "tj", "pausable", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}'
    )
    status = _wait(
        lambda: (
            _get(cluster, "tj", "pausable", namespace)["status"]
            if _phase(cluster, "tj", "pausable", namespace) == "Suspended"
            else None
        ),
        90,
        "Suspended",
        operator,
    )
    assert "checkpoints kept" in status["message"]
    assert RayJobs(ray_head.address, token=ray_head.token).status(first_sid) == "STOPPED"
    time.sleep(2)
    assert _phase(cluster, "tj", "pausable", namespace) == "Suspended"
    cluster.kubectl(
        "patch", "tj", "pausable", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    final, _ = _watch_until_done(cluster, "tj", "pausable", namespace, operator, timeout=400)
    assert final["status"]["phase"] == "Succeeded"
    metrics = json.loads((op_workdir / "runs/pausable/metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 20 and metrics["resumed_from_step"] % 20 == 0


def test_deleting_a_running_job_stops_its_ray_job(
    cluster: Cluster, operator: Operator, namespace: str, ray_head: LocalRay
) -> None:
    _apply(cluster, namespace, _long_job("doomed", steps=2000))
    sid = _wait(
        lambda: (
            ((_get(cluster, "tj", "doomed", namespace).get("status") or {}).get("progress") or {}).get("step")
            and _get(cluster, "tj", "doomed", namespace)["status"]["ray"]["jobId"]
        ),
        180,
        "doomed running",
        operator,
    )
    cluster.kubectl("delete", "tj", "doomed", "-n", namespace, "--timeout=120s")
    assert RayJobs(ray_head.address, token=ray_head.token).status(sid) == "STOPPED"
    assert "doomed" not in cluster.kubectl("get", "tj", "-n", namespace).stdout


def test_active_deadline_stops_the_job_and_fails_it_with_budget_exceeded(
    cluster: Cluster, operator: Operator, namespace: str, ray_head: LocalRay
) -> None:
    doc = _long_job("deadline", steps=2000)
    doc["spec"]["budget"] = {"activeDeadlineSeconds": 25}
    _apply(cluster, namespace, doc)
    status = _wait(
        lambda: (lambda st: st if st.get("phase") == "Failed" else None)(
            _get(cluster, "tj", "deadline", namespace).get("status") or {}
        ),
        180,
        "deadline Failed",
        operator,
    )
    assert status["reason"] == "BudgetExceeded", status
    assert "over spec.budget.activeDeadlineSeconds (25s)" in status["message"]
    assert RayJobs(ray_head.address, token=ray_head.token).status(status["ray"]["jobId"]) == "STOPPED"
    reasons = {
        e["reason"]
        for e in json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    }
    assert "BudgetExceeded" in reasons


@pytest.mark.soak  # every suite: the real operator pod deleted 8 times through a job (test_kube_faults)
def test_operator_restart_neither_duplicates_nor_loses_the_job(
    cluster: Cluster, operator: Operator, namespace: str, ray_head: LocalRay
) -> None:
    _apply(cluster, namespace, _long_job("survivor", steps=120))
    _wait(lambda: _phase(cluster, "tj", "survivor", namespace) == "Running", 120, "Running", operator)
    operator.stop(kill=True)
    time.sleep(3)
    operator.start()
    final, _ = _watch_until_done(cluster, "tj", "survivor", namespace, operator, timeout=400)
    assert final["status"]["phase"] == "Succeeded" and final["status"]["restarts"] == 0
    submissions = [
        j
        for j in RayJobs(ray_head.address, token=ray_head.token).client.list_jobs()
        if (j.metadata or {}).get("forgeline.dev/job") == "survivor"
        and (j.metadata or {}).get("forgeline.dev/namespace") == namespace
    ]
    assert len(submissions) == 1, [j.submission_id for j in submissions]


def test_ttl_deletes_the_finished_job_when_asked(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    # a job that finishes in seconds (Failed: its data is missing; TTL counts from any end, and a
    # job run to Succeeded only to be deleted took 40 s more)
    doc = _long_job("ephemeral", steps=10)
    first_contact.CASES["data-missing"][1](doc)
    doc["spec"].update(ttlSecondsAfterFinished=2, deleteJobAfterTtl=True)
    _apply(cluster, namespace, doc)
    _wait(lambda: _phase(cluster, "tj", "ephemeral", namespace) == "Failed", 120, "Failed", operator)
    # The TTL timer deletes the job from inside itself. kopf removes the finalizer only once the
    # timer has stopped, and re-checked a still-running one every 60 s: such a job lingered a
    # minute. The operator now waits for the timer to finish (up to 1 s), then polls every 2 s.
    failed_at = time.monotonic()
    _wait(
        lambda: "ephemeral" not in cluster.kubectl("get", "tj", "-n", namespace).stdout,
        150,
        "TTL deletion",
        operator,
    )
    assert time.monotonic() - failed_at < 30, "the TTL-deleted job lingered (kopf's 60 s re-check)"


def test_operator_needs_nothing_beyond_the_charts_rbac(cluster: Cluster, operator: Operator) -> None:
    """Everything above ran as the chart's ServiceAccount: the apiserver refused it nothing, and
    that identity really is restricted (not an admin kubeconfig in disguise)."""
    assert operator.forbidden() == []
    as_sa = ["--kubeconfig", str(operator.kubeconfig)]
    assert (
        cluster.kubectl(
            *as_sa, "auth", "can-i", "patch", "trainingjobs.forgeline.dev/status", "-A"
        ).stdout.strip()
        == "yes"
    )
    assert (
        cluster.kubectl(*as_sa, "auth", "can-i", "list", "secrets", "-A", check=False).stdout.strip() == "no"
    )
    assert (
        cluster.kubectl(
            *as_sa, "auth", "can-i", "create", "pods", "-n", "default", check=False
        ).stdout.strip()
        == "no"
    )


@pytest.mark.soak  # the 40-job burst under the running-jobs cap runs in every suite (test_faults)
def test_a_thousand_jobs(cluster: Cluster, operator: Operator, namespace: str) -> None:
    """1,000 job objects: every one is admitted and parked (suspend: true, so no Ray work), the
    operator stays healthy, and its metrics count them all."""
    base = _long_job("bulk", steps=10)
    base["spec"]["suspend"] = True
    items = []
    for i in range(1000):
        doc = json.loads(json.dumps(base))
        doc["metadata"] = {"name": f"bulk-{i:04d}", "namespace": namespace}
        items.append(doc)
    started = time.monotonic()
    for chunk in range(0, 1000, 250):
        cluster.kubectl(
            "create",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items[chunk : chunk + 250]}),
            timeout=300,
        )

    def suspended() -> int:
        out = json.loads(cluster.kubectl("get", "tj", "-n", namespace, "-o", "json", timeout=120).stdout)
        phases = [(o.get("status") or {}).get("phase") for o in out["items"]]
        return len(phases) == 1000 and phases.count("Suspended") == 1000

    _wait(suspended, 900, "1,000 jobs Suspended", operator)
    elapsed = time.monotonic() - started
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.health_port}/healthz", timeout=5) as r:
        assert r.status == 200
    text = operator.metrics()
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith('forgeline_jobs{kind="TrainingJob",phase="Suspended"}')
    )
    assert float(line.split()[-1]) >= 1000
    print(f"1,000 jobs created and Suspended in {elapsed:.0f}s")


# -- the KubeRay path --------------------------------------------------------------------------


@pytest.fixture
def kr_namespace(cluster: Cluster) -> Iterator[str]:
    """A namespace only the KubeRay-backend operator watches."""
    with cluster.scratch_namespace("kr") as name:
        yield name


@pytest.fixture
def kuberay_operator(
    cluster: Cluster,
    kr_namespace: str,
    op_workdir: Path,
    release: Release,
    ray_head: LocalRay,
    tmp_path: Path,
    prometheus: Prometheus,
) -> Iterator[Operator]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    op = Operator(
        cluster,
        op_workdir,
        tmp_path / "kuberay-operator.log",
        release.token_kubeconfig(tmp_path / "sa.kubeconfig"),
        FORGELINE_BACKEND="kuberay",
        FORGELINE_DEFAULT_TRAINER_IMAGE="registry.local/forgeline/trainer:test",
        FORGELINE_NODE_POOLS=json.dumps(values["nodePools"]),  # as the chart sets it
        FORGELINE_WATCH_NAMESPACES=kr_namespace,
        FORGELINE_RAY_TOKEN=ray_head.token,
    )  # for jobs that name an existing cluster
    op.start()
    prometheus.add_target("forgeline-operator", f"127.0.0.1:{op.metrics_port}")
    yield op
    op.stop()


def _ray_clusters(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    return json.loads(cluster.kubectl("get", "rayclusters", "-n", ns, "-o", "json").stdout)["items"]


def test_kuberay_cluster_lands_on_the_gpu_pool(
    cluster: Cluster, kr_namespace: str, kuberay_operator: Operator
) -> None:
    """The RayCluster the operator creates is accepted by the apiserver (test copy of KubeRay's
    CRD) with the job's placement, GPUs, volumes, auth, owner and labels; deleting the job
    removes it (finalizer + owner reference)."""
    doc = _example("pretrain-tiny-llama")
    doc["metadata"]["name"] = "gpu"
    doc["metadata"]["labels"] = {"team": "research"}
    doc["spec"]["resources"].update(
        gpusPerWorker=4,
        cpu="32",
        memory="256Gi",
        nodePool="h100",
        nodeSelector={"nvidia.com/gpu.present": "true"},
    )
    doc["spec"]["training"]["globalBatchSize"] = 64
    doc["spec"]["checkpointing"] = {"storage": "pvc://ckpts/gpu"}
    _apply(cluster, kr_namespace, doc)
    rc = _wait(lambda: _ray_clusters(cluster, kr_namespace), 60, "RayCluster", kuberay_operator)[0]
    job = _get(cluster, "tj", "gpu", kr_namespace)
    assert rc["metadata"]["name"] == "gpu-tj"
    owner = rc["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "TrainingJob" and owner["uid"] == job["metadata"]["uid"] and owner["controller"]
    assert (
        rc["metadata"]["labels"]["forgeline.dev/job"] == "gpu"
        and rc["metadata"]["labels"]["team"] == "research"
    )
    assert rc["spec"]["rayVersion"] == "2.60.0"
    worker = rc["spec"]["workerGroupSpecs"][0]
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"] == 2
    pod = worker["template"]["spec"]
    # The chart's h100 preset (kind-config.yaml's GPU pool labels) merged with the job's own.
    assert pod["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "nvidia.com/gpu.present": "true",
    }
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    container = pod["containers"][0]
    assert container["image"] == "registry.local/forgeline/trainer:test"
    assert container["resources"]["limits"] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": 4}
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token" and env["OMP_NUM_THREADS"]["value"] == "8"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "gpu-tj-ray-token"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Mi"}
    assert volumes["pvc-ckpts"]["persistentVolumeClaim"]["claimName"] == "ckpts"
    assert {"name": "pvc-ckpts", "mountPath": "/mnt/pvc/ckpts"} in container["volumeMounts"]
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    secret = json.loads(
        cluster.kubectl("get", "secret", "gpu-tj-ray-token", "-n", kr_namespace, "-o", "json").stdout
    )
    assert secret["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    status = _get(cluster, "tj", "gpu", kr_namespace)["status"]
    assert (
        status["phase"] == "Provisioning"
        and "waiting for KubeRay" in status["message"]
        or "is starting" in status["message"]
    )
    assert status["ray"]["clusterName"] == "gpu-tj"
    cluster.kubectl("delete", "tj", "gpu", "-n", kr_namespace, "--timeout=60s")
    assert _ray_clusters(cluster, kr_namespace) == []
    assert (
        "gpu-tj-ray-token" not in cluster.kubectl("get", "secrets", "-n", kr_namespace, "-o", "name").stdout
    )


@pytest.mark.parametrize("held", [False, True], ids=["deleted", "deletion-held-by-a-finalizer"])
def test_a_raycluster_deleted_while_its_job_waits_for_it_fails_the_job_and_is_not_made_again(
    cluster: Cluster, kr_namespace: str, kuberay_operator: Operator, held: bool
) -> None:
    """The job's RayCluster (its uid in status.ray.clusterUid) deleted by a person while the job
    waits in Provisioning: Failed/ClusterLost naming it, no RayCluster of that name made again
    (it would race the old pods, still draining). Held by a finalizer (KubeRay then ignores it and
    its pods run on): the same, naming the finalizer; the RayCluster goes once the finalizer does."""
    name = "held" if held else "gone"
    doc = _example("pretrain-tiny-llama")
    doc["metadata"]["name"] = name
    _apply(cluster, kr_namespace, doc)

    def given() -> dict[str, Any] | None:
        ray = (_get(cluster, "tj", name, kr_namespace).get("status") or {}).get("ray") or {}
        return ray if ray.get("clusterUid") else None

    ray = _wait(given, 60, "status.ray.clusterUid", kuberay_operator)
    (rc,) = _ray_clusters(cluster, kr_namespace)
    assert ray["clusterUid"] == rc["metadata"]["uid"]
    rc_name = f"{name}-tj"
    if held:
        hold = '{"metadata":{"finalizers":["forgeline.dev/test-hold"]}}'
        cluster.kubectl("patch", "raycluster", rc_name, "-n", kr_namespace, "--type=merge", "-p", hold)
    cluster.kubectl("delete", "raycluster", rc_name, "-n", kr_namespace, "--wait=false")

    def failed() -> dict[str, Any] | None:
        status = _get(cluster, "tj", name, kr_namespace).get("status") or {}
        return status if status.get("phase") == "Failed" else None

    status = _wait(failed, 60, "Failed", kuberay_operator)
    assert status["reason"] == "ClusterLost", status
    assert f"RayCluster {rc_name} was deleted before its job finished, not by Forgeline" in status["message"]
    assert ("finalizers: forgeline.dev/test-hold" in status["message"]) is held, status["message"]
    assert status["lastFailure"]["retried"] is False
    left = _ray_clusters(cluster, kr_namespace)
    if held:  # still there, being deleted: the same object, not a new one
        assert [r["metadata"]["uid"] for r in left] == [rc["metadata"]["uid"]]
        cluster.kubectl(
            "patch", "raycluster", rc_name, "-n", kr_namespace, "--type=json",
            "-p", '[{"op":"remove","path":"/metadata/finalizers"}]',
        )  # fmt: skip
        _wait(lambda: not _ray_clusters(cluster, kr_namespace), 30, "the RayCluster gone")
    time.sleep(3)  # a few reconciles: nothing is made again
    assert _ray_clusters(cluster, kr_namespace) == []
    cluster.kubectl("delete", "tj", name, "-n", kr_namespace, "--timeout=60s")


def test_unknown_node_pool_fails_naming_the_field_and_the_pools(
    cluster: Cluster, kr_namespace: str, kuberay_operator: Operator
) -> None:
    doc = _example("pretrain-tiny-llama")
    doc["spec"]["resources"]["nodePool"] = "a100"
    _apply(cluster, kr_namespace, doc)
    status = _wait(
        lambda: (
            (_get(cluster, "tj", "tiny-llama", kr_namespace).get("status") or {}).get("phase") == "Failed"
            and _get(cluster, "tj", "tiny-llama", kr_namespace)["status"]
        ),
        60,
        "Failed",
        kuberay_operator,
    )
    assert status["reason"] == "ValidationFailed"
    assert "spec.resources.nodePool: this cluster has no node pool 'a100'" in status["message"]
    assert "cpu, h100" in status["message"]
    assert _ray_clusters(cluster, kr_namespace) == []


def test_credentials_reach_the_raycluster_by_reference_and_never_leak(
    cluster: Cluster, kr_namespace: str, kuberay_operator: Operator
) -> None:
    """A canary Secret value must appear nowhere the operator writes or logs: not in the
    RayCluster, the job's status, Events, the operator log or its metrics."""
    canary = "canary-" + uuid.uuid4().hex
    literal = f"--from-literal=AWS_SECRET_ACCESS_KEY={canary}"
    cluster.kubectl("create", "secret", "generic", "s3-creds", "-n", kr_namespace, literal)
    doc = _example("pretrain-tiny-llama")
    doc["metadata"]["name"] = "creds"
    doc["spec"]["credentials"] = [{"secretName": "s3-creds"}]
    _apply(cluster, kr_namespace, doc)
    (rc,) = _wait(lambda: _ray_clusters(cluster, kr_namespace), 60, "RayCluster", kuberay_operator)
    worker = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["envFrom"] == [{"secretRef": {"name": "s3-creds", "optional": False}}]
    time.sleep(3)  # a few reconciles
    everything = [
        json.dumps(rc),
        cluster.kubectl("get", "tj", "creds", "-n", kr_namespace, "-o", "json").stdout,
        cluster.kubectl("get", "events", "-n", kr_namespace, "-o", "json").stdout,
        kuberay_operator.log_path.read_text(errors="replace"),
        kuberay_operator.metrics(),
    ]
    assert not any(canary in text for text in everything)
    cluster.kubectl("delete", "tj", "creds", "-n", kr_namespace, "--wait=true", "--timeout=60s")


def test_credentials_on_an_existing_ray_cluster_are_refused(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    doc = _example("pretrain-tiny-llama")
    doc["metadata"]["name"] = "creds-elsewhere"
    doc["spec"]["credentials"] = [{"secretName": "s3-creds"}]
    _apply(cluster, namespace, doc)

    def _failed() -> dict[str, Any] | None:
        status = _get(cluster, "tj", "creds-elsewhere", namespace).get("status") or {}
        return status if status.get("phase") == "Failed" else None

    status = _wait(_failed, 60, "ValidationFailed", operator)
    assert status["reason"] == "ValidationFailed" and "spec.credentials" in status["message"]


def test_job_naming_an_existing_ray_cluster_creates_none(
    cluster: Cluster, kr_namespace: str, kuberay_operator: Operator, ray_head: LocalRay
) -> None:
    """spec.ray.address: the job runs on that Ray cluster even under the KubeRay backend."""
    doc = _long_job("existing", steps=10)
    doc["spec"]["ray"] = {"address": ray_head.address}
    _apply(cluster, kr_namespace, doc)
    final, _ = _watch_until_done(cluster, "tj", "existing", kr_namespace, kuberay_operator)
    assert final["status"]["phase"] == "Succeeded", final["status"]
    assert final["status"]["ray"]["address"] == ray_head.address
    assert _ray_clusters(cluster, kr_namespace) == []


# -- monitoring: what Prometheus scraped from all of the above ------------------------------------


def test_a_job_holding_gpus_shows_its_cost(cluster: Cluster, operator: Operator, namespace: str) -> None:
    """A 2-GPU job, run by the Ray Jobs API stand-in that does no training (spec.ray.address:
    nothing here has GPUs), priced at the operator's $2.50 per GPU-hour: status.cost at the end is
    what it held, and its gauges feed the dashboard's cost panels (the last test checks them)."""
    standin = RayJobsStandIn(seconds_per_step=0.05).start()
    try:
        doc = _example("pretrain-tiny-llama")
        doc["metadata"]["name"] = "gpu-cost"
        doc["spec"]["resources"].update(workers=1, gpusPerWorker=2)
        doc["spec"]["ray"] = {"address": standin.address}
        _apply(cluster, namespace, doc)

        def finished() -> dict[str, Any] | None:
            status = _get(cluster, "tj", "gpu-cost", namespace).get("status") or {}
            return status if status.get("phase") == "Succeeded" else None

        status = _wait(finished, 120, "the GPU job Succeeded", operator)
    finally:
        standin.stop()
    cost = status["cost"]
    assert cost["gpus"] == 2 and cost["pricePerGpuHour"] == 2.5 and cost["currency"] == "$", cost
    assert cost["cost"] == pytest.approx(cost["gpuHours"] * 2.5, rel=1e-3)
    assert cost["projectedGpuHours"] == cost["gpuHours"]  # finished: the projection is what it used
    held = (parse_time(status["completionTime"]) - parse_time(status["startTime"])).total_seconds()
    assert cost["gpuHours"] == pytest.approx(2 * held / 3600, abs=2 * 2 / 3600)  # timestamps: 1 s
    lines = [ln for ln in operator.metrics().splitlines() if ln.startswith("forgeline_job_cost{")]
    assert any('job="gpu-cost"' in ln and 'stage="used"' in ln for ln in lines), lines


def test_every_dashboard_panel_has_data_in_prometheus(prometheus: Prometheus) -> None:
    """Runs last in this module: every query of every panel of the shipped Grafana dashboard
    returns data from the Prometheus that scraped the operator(s) and Ray during these tests
    ($__rate_interval and the namespace variable filled in as Grafana would). The shipped alert
    rules evaluated without errors all along."""
    from forgeline_operator.monitoring.dashboard import panel_queries

    dashboard = json.loads((CHART / "files/dashboards/forgeline.json").read_text())
    queries = panel_queries(dashboard)
    assert len(queries) >= 10
    time.sleep(3)  # the last scrape of the finished jobs' gauges
    start, end = prometheus.started_at, time.time()
    empty = []
    for title, expr in queries:
        promql = expr.replace("$__rate_interval", "15s").replace("$namespace", ".*")
        if not any(series["values"] for series in prometheus.query_range(promql, start, end)):
            empty.append(f"{title}: {promql}")
    assert empty == [], "panels without data:\n" + "\n".join(empty)
    up = {t["labels"]["job"] for t in prometheus.active_targets() if t["health"] == "up"}
    assert {"forgeline-operator", "forgeline-ray"} <= up
    rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    assert len(rules) == 5 and all(r["health"] == "ok" for r in rules), rules
