"""Every operator decision as a pure function, pinned without a cluster
(forgeline_operator.controller.decisions). The end-to-end tests in test_operator.py only prove the
wiring."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from forgeline_operator.api.common import Budget
from forgeline_operator.controller import decisions, failures
from forgeline_operator.controller.failures import Failure, classify

# -- which step --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "suspend", "action"),
    [
        (None, False, "admit"),
        ("Pending", False, "admit"),
        ("Waiting", False, "admit"),
        ("Provisioning", False, "provision"),
        ("Running", False, "track"),
        ("Running", True, "suspend"),
        ("Pending", True, "suspend"),
        ("Suspended", True, None),
        ("Suspended", False, "resume"),
        ("Succeeded", False, None),
        ("Failed", True, None),
    ],
)
def test_next_action(phase: str | None, suspend: bool, action: str | None) -> None:
    assert decisions.next_action(phase, suspend) == action


def test_only_live_or_resuming_jobs_get_a_reconcile_timer() -> None:
    assert decisions.needs_reconcile("Running", False)
    assert decisions.needs_reconcile("Suspended", False)  # resume
    assert not decisions.needs_reconcile("Suspended", True)
    assert not decisions.needs_reconcile("Succeeded", False)
    assert not decisions.needs_reconcile("Failed", False)


# -- dependencies --------------------------------------------------------------------------------


def test_dependencies_wait_fail_or_go() -> None:
    up = decisions.Upstream
    assert decisions.dependencies([]) == decisions.DependenciesMet()
    done = up("TrainingJob", "pre", "Succeeded", "Completed")
    assert decisions.dependencies([done]) == decisions.DependenciesMet()
    missing = decisions.dependencies([done, up("FineTuneJob", "rm", None)])
    assert isinstance(missing, decisions.WaitForJob)
    assert missing.message == "waiting for FineTuneJob/rm to succeed (does not exist yet)"
    running = decisions.dependencies([up("TrainingJob", "pre", "Running", "Submitted")])
    assert isinstance(running, decisions.WaitForJob) and "(is Running)" in running.message
    failed = decisions.dependencies([up("TrainingJob", "pre", "Failed", "BackoffLimitExceeded")])
    assert failed == decisions.UpstreamFailed("TrainingJob", "pre", "BackoffLimitExceeded")
    assert failed.message == "TrainingJob/pre failed (BackoffLimitExceeded); this job uses its output"
    # the first unmet dependency decides, in the order given
    first = decisions.dependencies([up("TrainingJob", "a", "Running"), up("TrainingJob", "b", "Failed", "X")])
    assert isinstance(first, decisions.WaitForJob) and first.name == "a"


def test_an_unpromoted_upstream_is_refused_unless_the_reference_allows_it() -> None:
    why = "Regressed: eval_loss 2.1 → 2.3: worse than before training: not promoted"
    sft = decisions.Upstream("FineTuneJob", "sft", "Succeeded", "Completed", "False", why)
    refused = decisions.dependencies([sft])
    assert isinstance(refused, decisions.UpstreamNotPromoted)
    assert refused.message == (
        f"FineTuneJob/sft succeeded but its output was not promoted ({why}); this job trains from "
        "it: set spec.baseModel.fromJob.allowUnpromoted: true to use it anyway"
    )
    allowed = decisions.Upstream(
        "FineTuneJob", "sft", "Succeeded", "Completed", "False", why, allow_unpromoted=True
    )
    assert decisions.dependencies([allowed]) == decisions.DependenciesMet()
    promoted = decisions.Upstream("FineTuneJob", "sft", "Succeeded", "Completed", "True", "Improved: …")
    assert decisions.dependencies([promoted]) == decisions.DependenciesMet()


# -- the running-jobs cap ------------------------------------------------------------------------


def _jobs(*rows: tuple[str, str, str]) -> dict[str, tuple[str, str]]:
    return {name: (phase, created) for name, phase, created in rows}


def test_no_cap_admits_everyone() -> None:
    jobs = _jobs(("a", "Running", "1"), ("b", "Pending", "2"))
    assert decisions.admission(jobs, set(), "b", 0) == decisions.Admitted()


def test_cap_admits_first_come_first_served() -> None:
    jobs = _jobs(("a", "Running", "1"), ("b", "Pending", "2"), ("c", "Pending", "3"), ("d", "Pending", "4"))
    assert decisions.admission(jobs, set(), "b", 2) == decisions.Admitted()
    # c is behind b: with one free slot, it waits as second in the queue
    queued = decisions.admission(jobs, set(), "c", 2)
    assert queued == decisions.Queued(position=1, active=1, cap=2)
    assert queued.message == "waiting for one of 2 slots; position 1 in the queue"
    assert decisions.admission(jobs, set(), "d", 2) == decisions.Queued(position=2, active=1, cap=2)


def test_admitted_jobs_hold_their_slot_before_they_show_an_active_phase() -> None:
    jobs = _jobs(("a", "Pending", "1"), ("b", "Pending", "2"))
    assert decisions.admission(jobs, {"a"}, "a", 1) == decisions.Admitted()  # already in
    assert decisions.admission(jobs, {"a"}, "b", 1) == decisions.Queued(position=1, active=1, cap=1)


def test_a_full_cluster_queues_even_the_oldest() -> None:
    jobs = _jobs(("a", "Running", "1"), ("b", "Provisioning", "2"), ("c", "Pending", "0"))
    assert decisions.admission(jobs, set(), "c", 2) == decisions.Queued(position=1, active=2, cap=2)


def test_waiting_jobs_are_not_in_the_queue() -> None:
    """A pipeline applied at once: its later stages (Waiting) never block its first."""
    jobs = _jobs(("sft", "Waiting", "0"), ("dpo", "Waiting", "0"), ("pre", "Pending", "1"))
    assert decisions.admission(jobs, set(), "pre", 1) == decisions.Admitted()
    # a Waiting job whose dependencies are met queues behind every Pending job
    jobs = _jobs(("x", "Running", "0"), ("sft", "Waiting", "0"), ("other", "Pending", "5"))
    assert decisions.admission(jobs, set(), "sft", 2) == decisions.Queued(position=1, active=1, cap=2)


# -- failures, clusters, time ---------------------------------------------------------------------


def _failure(reason: str) -> Failure:
    return classify({"type": "error", "reason": reason, "message": "boom"}, "", "")


def test_after_failure_resubmits_until_the_backoff_limit() -> None:
    crash = _failure("UserCodeError")
    assert decisions.after_failure(0, 2, crash) == decisions.Resubmit(counted=True)
    assert decisions.after_failure(1, 2, crash) == decisions.Resubmit(counted=True)
    assert decisions.after_failure(2, 2, crash) == decisions.GiveUp(
        "UserCodeError", "spec.backoffLimit (2) resubmissions used"
    )
    assert isinstance(decisions.after_failure(0, 0, crash), decisions.GiveUp)


@pytest.mark.parametrize("reason", ["OOMKilled", "DataError", "ModelUnavailable", "ConfigError"])
def test_what_retrying_cannot_fix_fails_at_once(reason: str) -> None:
    verdict = decisions.after_failure(0, 5, _failure(reason))
    assert verdict == decisions.GiveUp(reason, "retrying cannot fix it")


def test_preemption_never_uses_up_the_backoff_limit() -> None:
    assert decisions.after_failure(3, 3, _failure("Preempted")) == decisions.Resubmit(counted=False)
    for reason in ("NCCLTimeout", "WorkerLost", "NodeLost"):
        assert decisions.after_failure(0, 1, _failure(reason)) == decisions.Resubmit(counted=True)


def test_only_clusters_the_operator_created_are_recreated() -> None:
    assert decisions.cluster_overdue(901, 900, recreatable=True)
    assert not decisions.cluster_overdue(899, 900, recreatable=True)
    assert not decisions.cluster_overdue(10_000, 900, recreatable=False)  # an existing Ray cluster


def test_seconds_since_cluster_ready_changed() -> None:
    at = datetime(2026, 1, 1, 0, 10, tzinfo=UTC)
    status = {
        "conditions": [
            {"type": "ClusterReady", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"}
        ]
    }
    assert decisions.seconds_since_cluster_ready_changed(status, at) == 600
    assert decisions.seconds_since_cluster_ready_changed({}, at) == 0


def test_ttl_expired() -> None:
    done = datetime(2026, 1, 1, tzinfo=UTC)
    assert not decisions.ttl_expired(None, 0, done)
    assert not decisions.ttl_expired("2026-01-01T00:00:00Z", 60, done + timedelta(seconds=59))
    assert decisions.ttl_expired("2026-01-01T00:00:00Z", 60, done + timedelta(seconds=60))


def test_fault_injection_only_where_the_operator_allows_it() -> None:
    note = {decisions.FAULT_INJECTION_ANNOTATION: "20"}
    assert decisions.injected_failure_step(note, allowed=True) == 20
    assert decisions.injected_failure_step(note, allowed=False) is None  # production default
    assert decisions.injected_failure_step({decisions.FAULT_INJECTION_ANNOTATION: "x"}, allowed=True) is None
    assert decisions.injected_failure_step({}, allowed=True) is None


def test_fault_injection_is_off_by_default() -> None:
    from forgeline_operator.controller.settings import OperatorSettings

    assert OperatorSettings().allow_fault_injection is False


def test_budget_is_wall_clock_since_start_and_gpu_hours() -> None:
    at = datetime(2026, 1, 1, 2, 0, 0, tzinfo=UTC)
    start = "2026-01-01T00:00:00Z"  # two hours before `at`
    assert decisions.budget_exceeded(None, 2, 8, start, at) is None
    assert decisions.budget_exceeded(Budget(activeDeadlineSeconds=7200), 2, 8, start, at) is None
    assert (
        decisions.budget_exceeded(Budget(activeDeadlineSeconds=3600), 2, 8, None, at) is None
    )  # not started
    msg = decisions.budget_exceeded(Budget(activeDeadlineSeconds=3600), 2, 8, start, at)
    assert msg == "ran 7200s since it started, over spec.budget.activeDeadlineSeconds (3600s)"
    assert decisions.budget_exceeded(Budget(maxGpuHours=32), 2, 8, start, at) is None  # exactly 32 GPU-hours
    msg = decisions.budget_exceeded(Budget(maxGpuHours=31.5), 2, 8, start, at)
    assert msg is not None and "used 32.00 GPU-hours (2 workers × 8 GPUs × 2.00 h)" in msg
    assert "spec.budget.maxGpuHours (31.5)" in msg
    assert (
        decisions.budget_exceeded(Budget(maxGpuHours=0.1), 4, 0, start, at) is None
    )  # CPU jobs use no GPU-hours


# -- the watchdog ---------------------------------------------------------------------------------


def _watchdog(**fields: object):
    from forgeline_operator.api.common import Watchdog

    return Watchdog(**fields)


def test_watchdog_startup_deadline_counts_from_this_submission() -> None:
    dog = _watchdog(startupDeadlineSeconds=600)
    submitted = "2026-01-01T00:00:00Z"
    at = datetime(2026, 1, 1, 0, 10, 1, tzinfo=UTC)
    why = decisions.stall(dog, submitted, None, at)
    assert why is not None and "spec.watchdog.startupDeadlineSeconds (600s)" in why
    assert decisions.stall(dog, submitted, None, at - timedelta(seconds=2)) is None
    # a step from an earlier attempt does not count as this attempt's first step
    earlier = {"step": 40, "stepAdvancedAt": "2025-12-31T23:00:00Z", "secondsPerStep": 0.1}
    assert decisions.stall(dog, submitted, earlier, at) is not None


def test_watchdog_stall_never_shorter_than_ten_steps() -> None:
    dog = _watchdog(stallSeconds=60)
    submitted, advanced = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
    fast = {"stepAdvancedAt": advanced, "secondsPerStep": 0.5}
    assert decisions.stall(dog, submitted, fast, datetime(2026, 1, 1, 0, 5, 59, tzinfo=UTC)) is None
    why = decisions.stall(dog, submitted, fast, datetime(2026, 1, 1, 0, 6, 1, tzinfo=UTC))
    assert why is not None and "spec.watchdog.stallSeconds" in why
    slow = {"stepAdvancedAt": advanced, "secondsPerStep": 30.0}  # a slow model: 10 × 30 s = 300 s
    assert decisions.stall(dog, submitted, slow, datetime(2026, 1, 1, 0, 9, 59, tzinfo=UTC)) is None
    assert decisions.stall(dog, submitted, slow, datetime(2026, 1, 1, 0, 10, 1, tzinfo=UTC)) is not None


def test_watchdog_off_or_not_submitted() -> None:
    at = datetime(2027, 1, 1, tzinfo=UTC)
    assert decisions.stall(_watchdog(enabled=False), "2026-01-01T00:00:00Z", None, at) is None
    assert decisions.stall(_watchdog(), None, None, at) is None


def test_stalled_is_retried_and_counted() -> None:
    from forgeline_operator.controller.failures import stalled

    failure = stalled("no optimizer step for 700s")
    assert failure.reason == "Stalled" and failure.fix
    assert decisions.after_failure(0, 1, failure) == decisions.Resubmit(counted=True)
    assert isinstance(decisions.after_failure(1, 1, failure), decisions.GiveUp)


def test_provisioning_time_counts_from_the_cluster_request_not_the_job() -> None:
    at = datetime(2026, 1, 1, 1, 0, tzinfo=UTC)
    created = {"type": "ClusterReady", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"}
    queued_an_hour = {"conditions": [created], "ray": {"clusterRequestedAt": "2026-01-01T00:59:00Z"}}
    assert decisions.seconds_provisioning(queued_an_hour, at) == 60  # not 3,600: queue time never counts
    assert decisions.seconds_provisioning({"conditions": [created]}, at) == 3600  # older status


# -- a Ray head that does not answer --------------------------------------------------------------


def test_a_ray_head_is_lost_only_after_the_bound() -> None:
    at = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)
    assert not decisions.cluster_lost(None, at, 60)  # it answers
    assert not decisions.cluster_lost("2026-01-01T12:00:00Z", at, 60)  # 30 s: waited out
    assert decisions.cluster_lost("2026-01-01T12:00:00Z", at, 30)
    assert decisions.ray_unreachable_for("2026-01-01T12:00:00Z", at) == 30
    assert decisions.ray_unreachable_for(None, at) == 0


def test_a_lost_cluster_is_retried_within_the_backoff_limit_then_given_up() -> None:
    lost = failures.cluster_lost("the Ray head at http://10.0.0.1:8265 does not answer for 61s")
    assert lost.reason == "ClusterLost" and lost.retryable and lost.counts_against_backoff
    assert decisions.after_failure(0, 1, lost) == decisions.Resubmit(counted=True)
    verdict = decisions.after_failure(1, 1, lost)
    assert isinstance(verdict, decisions.GiveUp) and verdict.reason == "ClusterLost"


def test_a_recreated_head_pod_means_the_ray_job_is_gone() -> None:
    assert decisions.head_replaced("tj-head-abcde", "tj-head-abcde") is None
    assert decisions.head_replaced(None, "tj-head-abcde") is None  # submitted before heads were kept
    assert decisions.head_replaced("tj-head-abcde", None) is None  # KubeRay has not said yet
    message = decisions.head_replaced("tj-head-abcde", "tj-head-fghij")
    assert message and "tj-head-abcde was replaced by tj-head-fghij" in message
    lost = failures.cluster_lost(message)
    assert lost.reason == "ClusterLost" and lost.retryable and lost.counts_against_backoff


def test_an_unreachable_ray_address_is_named_as_such() -> None:
    from forgeline_operator.rayclient.ports import free_port
    from forgeline_operator.rayclient.rayjobs import RayJobs, RayUnreachable

    address = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RayUnreachable, match="does not answer") as err:
        RayJobs(address, request_timeout=2)
    assert err.value.address == address and isinstance(err.value, ConnectionError)


def test_a_ray_head_that_accepts_but_never_answers_times_out_in_the_version_check() -> None:
    """A head that holds the connection and says nothing (a wedged dashboard; in a cluster, a
    deleted pod's address waits for the kernel's TCP timeout instead) costs the operator one
    timeout, not a reconcile held for minutes: the SDK's own version check sends no timeout."""
    import socket

    from forgeline_operator.rayclient.rayjobs import RayJobs, RayUnreachable

    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(RayUnreachable, match="does not answer") as err:
            RayJobs(address, request_timeout=1, connect_timeout=1)
        took = time.monotonic() - started
    assert took < 5, took
    assert "Timeout" in str(err.value) and str(err.value).count("does not answer") == 1, err.value


def test_a_long_queue_rewrites_few_statuses_as_it_moves() -> None:
    def place(p: int) -> str:
        return decisions.Queued(position=p, active=3, cap=4).place

    assert place(10) == "position 10 in the queue"
    assert place(11) == place(20) == "over 10 jobs ahead in the queue"
    assert place(21) == place(40) == "over 20 jobs ahead in the queue"
    assert place(999) == "over 640 jobs ahead in the queue"
    # a job at the back of 1,000 sees its message change about 16 times, not 1,000
    assert len({place(p) for p in range(1, 1001)}) <= 17


def test_time_to_first_step_is_split_into_queue_provisioning_and_startup() -> None:
    first = datetime(2026, 1, 1, 12, 0, 19, 500000, tzinfo=UTC)
    split = decisions.startup_timings(
        "2026-01-01T12:00:00Z", "2026-01-01T12:00:04.250Z", "2026-01-01T12:00:07Z", first
    )
    assert split == {
        "firstStepAt": "2026-01-01T12:00:19.500Z",
        "timeToFirstStepSeconds": 19.5,
        "queuedSeconds": 4.25,
        "provisioningSeconds": 2.75,
        "startupSeconds": 12.5,
    }
    # status written before admission was recorded: everything before the submission is provisioning
    old = decisions.startup_timings("2026-01-01T12:00:00Z", None, "2026-01-01T12:00:07Z", first)
    assert old["queuedSeconds"] == 0 and old["provisioningSeconds"] == 7
    same_second = decisions.startup_timings(
        "2026-01-01T12:00:00Z", "2026-01-01T12:00:04.250Z", "2026-01-01T12:00:04Z", first
    )
    assert same_second["provisioningSeconds"] == 0 and same_second["startupSeconds"] == 15.25
