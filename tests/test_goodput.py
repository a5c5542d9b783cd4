"""Goodput: the pure accounting (controller/goodput.py), the trainer's ledger (progress.Reporter),
the log cursor that carries it to the operator, the metrics and `forgeline report`.

Real jobs' breakdowns are checked in test_operator.py (a stall the watchdog stops, with redone
steps after the resume) and test_faults.py; these tests pin the arithmetic on known timelines."""

from __future__ import annotations

import argparse
import io
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rich.console import Console

from forgeline_operator.api.jobconfig import PROGRESS_PREFIX
from forgeline_operator.cli import report
from forgeline_operator.controller import goodput, metrics
from forgeline_operator.rayclient.rayjobs import LogCursor, combine_ledgers

T0 = datetime(2026, 12, 6, 8, 0, 0, tzinfo=UTC)


def _ledger(
    steps: float,
    timed: int,
    evaluation: float = 0.0,
    save: float = 0.0,
    restore: float = 0.0,
    resumed: int | None = 0,
) -> dict[str, Any]:
    """A trainer's ledger; `resumed` None: the group never finished a checkpoint restore."""
    ledger: dict[str, Any] = {
        "steps": steps,
        "evaluation": evaluation,
        "checkpointSave": save,
        "checkpointRestore": restore,
        "stepsTimed": timed,
    }
    return ledger if resumed is None else {**ledger, "resumedFrom": resumed}


def test_an_attempt_splits_into_startup_steps_evals_checkpoints_and_the_rest() -> None:
    # submitted at 0; baseline eval 3 s, then the first step reported at 20 s; 99 more steps of
    # 0.5 s, 2 evals of 2 s more and 4 checkpoint writes of 1 s; the attempt ends at 90 s
    first = {"step": 1, "time": 1000.0 + 20, "ledger": _ledger(0.0, 0, evaluation=3.0)}
    last = {"step": 100, "time": 1000.0 + 85, "ledger": _ledger(49.5, 99, evaluation=7.0, save=4.0)}
    parts = goodput.split(goodput.Attempt(submitted=1000.0, ended=1090.0, first=first, last=last))
    s = parts["seconds"]
    assert s["startup"] == pytest.approx(17.0)  # 20 s to the first step, less the 3 s eval
    assert s["productive"] == pytest.approx(49.5) and s["redone"] == 0
    assert s["evaluation"] == pytest.approx(7.0) and s["checkpointSave"] == pytest.approx(4.0)
    assert s["other"] == pytest.approx(90 - 17 - 49.5 - 7 - 4)  # publishing, shutdown
    assert sum(s.values()) == pytest.approx(90.0)
    assert parts["firstStep"] == 1 and parts["lastStep"] == 100 and parts["secondsPerStep"] == 0.5


def test_steps_done_again_after_a_failure_are_redone_not_productive() -> None:
    # an earlier attempt reached step 27; this one resumed from the step-20 checkpoint (restore 2 s)
    # and ran to step 60 at 0.5 s a step: steps 21–27 again are 7 × 0.5 s of redone work
    first = {"step": 21, "time": 1015.0, "ledger": _ledger(0.0, 0, restore=2.0, resumed=20)}
    last = {"step": 60, "time": 1040.0, "ledger": _ledger(19.5, 39, restore=2.0, resumed=20)}
    a = goodput.Attempt(submitted=1000.0, ended=1045.0, first=first, last=last, furthest_before=27)
    parts = goodput.split(a)
    assert parts["redoneSteps"] == 7 and parts["resumedFrom"] == 20
    assert parts["seconds"]["redone"] == pytest.approx(3.5)
    assert parts["seconds"]["productive"] == pytest.approx(16.0)
    assert parts["seconds"]["checkpointRestore"] == pytest.approx(2.0)
    assert parts["seconds"]["startup"] == pytest.approx(13.0)
    # a preemption's checkpoint at the step it stopped: nothing is redone
    none_lost = goodput.split(goodput.Attempt(1000.0, 1045.0, first, last, furthest_before=20))
    assert none_lost["redoneSteps"] == 0 and none_lost["seconds"]["redone"] == 0
    # a checkpoint written after the attempt's last progress record: it got that far
    reached = goodput.split(goodput.Attempt(1000.0, 1045.0, first, last, reached=62))
    assert reached["lastStep"] == 62


def test_a_stall_the_watchdog_stopped_counts_from_the_last_step() -> None:
    first = {"step": 1, "time": 1010.0, "ledger": _ledger(0.0, 0)}
    last = {"step": 25, "time": 1022.0, "ledger": _ledger(12.0, 24)}
    parts = goodput.split(goodput.Attempt(1000.0, 1045.0, first, last, stalled_since=1022.0))
    assert parts["seconds"]["stalled"] == pytest.approx(23.0)
    assert parts["seconds"]["productive"] == pytest.approx(12.0)
    assert sum(parts["seconds"].values()) == pytest.approx(45.0)


def test_an_attempt_that_never_stepped_is_startup_with_what_it_timed() -> None:
    ledger_only = {"type": "ledger", "step": None, "ledger": _ledger(0.0, 0, restore=4.0)}
    parts = goodput.split(goodput.Attempt(1000.0, 1030.0, first=None, last=ledger_only))
    assert parts["seconds"]["checkpointRestore"] == 4.0 and parts["seconds"]["startup"] == 26.0
    assert "lastStep" not in parts


def test_clock_disagreement_never_makes_more_time_than_the_wall() -> None:
    first = {"step": 1, "time": 1005.0, "ledger": _ledger(0.0, 0)}
    last = {"step": 50, "time": 1031.0, "ledger": _ledger(30.0, 49)}  # the trainer's clock runs ahead
    parts = goodput.split(goodput.Attempt(1000.0, 1030.0, first, last))
    assert sum(parts["seconds"].values()) == pytest.approx(30.0, abs=0.01)
    assert all(v >= 0 for v in parts["seconds"].values())


def test_the_clock_times_queued_and_provisioning_across_transitions() -> None:
    g = goodput.on_transition(None, "Pending", "Accepted", T0)
    assert g == {"clock": {"category": "queued", "since": "2026-12-06T08:00:00.000000Z"}}
    g = goodput.on_transition(g, "Waiting", "Queued", T0 + timedelta(seconds=5)) or g  # still queued
    g = goodput.on_transition(g, "Provisioning", "QueuedByKueue", T0 + timedelta(seconds=8)) or g
    g = goodput.on_transition(g, "Provisioning", "ClusterStarting", T0 + timedelta(seconds=30))
    assert g is not None and g["closed"] == {"queued": 30.0}
    g = goodput.on_transition(g, "Running", "Submitted", T0 + timedelta(seconds=42))
    assert g is not None and g["closed"] == {"queued": 30.0, "provisioning": 12.0} and g["clock"] is None
    assert goodput.on_transition(g, "Running", "Reconnected", T0 + timedelta(seconds=50)) is None
    # a job's first transition counts from its creation: admitted at once by the create handler
    # 3 s after it was created, it was queued those 3 s
    g = goodput.on_transition(None, "Provisioning", "ClusterStarting", T0, created="2026-12-06T07:59:57Z")
    assert g is not None and g["closed"] == {"queued": 3.0} and g["clock"]["category"] == "provisioning"
    g = goodput.on_transition(None, "Pending", "Accepted", T0, created="2026-12-06T07:59:57Z")
    assert g == {"clock": {"category": "queued", "since": "2026-12-06T07:59:57Z"}}


def test_summary_chip_hours_fraction_and_display() -> None:
    g: dict[str, Any] = {"closed": {"queued": 600.0, "provisioning": 60.0}}
    attempt = {"seconds": {"startup": 40.0, "productive": 400.0, "evaluation": 20.0, "other": 20.0}}
    g = goodput.close_attempt(g, 0, {**attempt, "lastStep": 100, "redoneSteps": 0}, "Preempted")
    running = {"seconds": {"startup": 30.0, "productive": 300.0, "redone": 30.0, "checkpointRestore": 10.0}}
    out = goodput.summary(g, T0, 8.0, "GPU", running=running)
    assert out["totalSeconds"] == 1510.0 and out["heldSeconds"] == 910.0
    assert out["fraction"] == pytest.approx(700 / 910, abs=1e-4)
    assert out["chipHours"] == pytest.approx(910 * 8 / 3600, abs=1e-6)
    assert out["productiveChipHours"] == pytest.approx(700 * 8 / 3600, abs=1e-6)
    assert out["display"] == "77%"  # no badput reaches a tenth of the held time
    assert out["furthestStep"] == 100 and out["attempts"][0]["endedBy"] == "Preempted"
    # a closed clock is written as null (a merge patch deletes the open segment only so)
    closed = goodput.on_transition(
        {"clock": {"category": "provisioning", "since": "2026-12-06T07:59:00Z"}}, "Running", "Submitted", T0
    )
    assert closed is not None and "clock" in goodput.summary(closed, T0, 1.0, "GPU")
    assert goodput.summary(closed, T0, 1.0, "GPU")["clock"] is None
    slow = goodput.summary({"closed": {"provisioning": 300.0, "productive": 100.0}}, T0, 1.0, "GPU")
    assert slow["display"] == "25% (provisioning 75%)"
    assert goodput.chips_of(2, 4, 8.0) == (8.0, "GPU") and goodput.chips_of(2, 0, 1.5) == (3.0, "CPU core")


def test_a_pipeline_sums_its_stages() -> None:
    a = {
        "seconds": {"productive": 100.0, "startup": 50.0, "queued": 10.0},
        "chipHours": 1.0,
        "productiveChipHours": 0.6,
    }
    b = {"seconds": {"productive": 50.0, "provisioning": 50.0}, "chipHours": 0.5, "productiveChipHours": 0.2}
    total = goodput.pipeline([a, b])
    assert total["heldSeconds"] == 250.0 and total["fraction"] == 0.6 and total["stages"] == 2
    assert total["chipHours"] == 1.5 and total["seconds"]["queued"] == 10.0


def test_the_reporter_ledger_keeps_timed_sections_and_the_first_step_out_of_step_time() -> None:
    from forgeline_trainer import progress

    r = progress.Reporter("j", "ns", "TrainingJob", 10, 1, 1.0, 0.0, is_chief=False)
    time.sleep(0.05)
    r.step(1, 1.0, 0.1)  # the first step: start-up, not counted
    assert r.ledger["steps"] == 0 and r.steps_timed == 0
    time.sleep(0.05)
    with r.timed("checkpointSave"):
        time.sleep(0.1)
        with r.timed("evaluation"):  # nested: already counted by the outer section
            time.sleep(0.01)
    r.step(2, 1.0, 0.1)
    assert 0.1 <= r.ledger["checkpointSave"] < 0.2 and r.ledger["evaluation"] == 0
    assert 0.04 <= r.ledger["steps"] < 0.1  # the 0.05 s around the save, not the save
    r.spent("evaluation", 2.0)  # e.g. the HF Trainer's eval_runtime
    r.step(3, 1.0, 0.1)
    assert r.steps_timed == 2 and r.ledger["steps"] < 0.15 and r.ledger["evaluation"] == 2.0
    assert set(r.ledger_record()) == {*progress.LEDGER, "stepsTimed", "group"}  # no restore yet
    r.resumed_from = 0  # the checkpoint restore finished: nothing to resume, a start from step 0
    assert r.ledger_record()["resumedFrom"] == 0


def test_a_failing_attempt_emits_its_ledger(capsys: pytest.CaptureFixture[str]) -> None:
    from forgeline_trainer import progress

    def loop(config: dict[str, Any]) -> None:
        r = progress.Reporter("j", "ns", "TrainingJob", 10, 1, 1.0, 0.0, interval=1e9)
        r.step(1, 1.0, 0.1)
        with r.timed("checkpointSave"):
            pass
        raise RuntimeError("preempted")

    with pytest.raises(RuntimeError):
        progress.ledger_on_failure(loop, {})
    lines = [json.loads(x.split(PROGRESS_PREFIX, 1)[1]) for x in capsys.readouterr().out.splitlines()]
    assert (
        lines[-1]["type"] == "ledger" and lines[-1]["step"] == 1 and "checkpointSave" in lines[-1]["ledger"]
    )


def test_the_cursor_keeps_the_first_progress_record_and_the_latest_ledger() -> None:
    cursor = LogCursor()
    lines = [
        {"type": "event", "message": "training started"},
        {"type": "progress", "step": 1, "time": 5.0, "ledger": _ledger(0, 0)},
        {"type": "progress", "step": 9, "time": 9.0, "ledger": _ledger(4, 8)},
        {"type": "ledger", "step": 10, "ledger": _ledger(4.5, 9, save=1.0)},
    ]
    cursor.feed("".join(f"{PROGRESS_PREFIX}{json.dumps(x)}\n" for x in lines))
    assert cursor.first_progress is not None and cursor.first_progress["step"] == 1
    assert cursor.last_ledger is not None and cursor.last_ledger["type"] == "ledger"
    assert cursor.last_ledger["ledger"]["checkpointSave"] == 1.0


def test_worker_groups_restarted_within_an_attempt_keep_their_own_ledgers() -> None:
    # Ray Train restarted the worker group after a SIGTERM at step 40 (forgeline run allows
    # that): the first group's ledger ended with its checkpoint at 40, the second resumed there
    cursor = LogCursor()
    first = {**_ledger(19.5, 39, save=1.2), "group": 100.0}
    second = {**_ledger(10.0, 20, restore=0.8, resumed=40), "group": 160.0}
    lines = [
        {"type": "progress", "step": 1, "time": 5.0, "ledger": {**_ledger(0, 0), "group": 100.0}},
        {"type": "ledger", "step": 40, "ledger": first},
        {"type": "progress", "step": 61, "time": 70.0, "ledger": second},
    ]
    cursor.feed("".join(f"{PROGRESS_PREFIX}{json.dumps(x)}\n" for x in lines))
    combined = cursor.last_ledger
    assert combined is not None and combined["groups"] == 2 and combined["step"] == 61
    assert combined["ledger"]["steps"] == 29.5 and combined["ledger"]["stepsTimed"] == 59
    assert combined["ledger"]["checkpointSave"] == 1.2 and combined["ledger"]["checkpointRestore"] == 0.8
    assert combined["ledger"]["resumedFrom"] == 0  # the attempt started from scratch
    assert combined["ledger"]["redoneSteps"] == 0  # the second group resumed where the first stopped


def test_steps_a_restarted_worker_group_did_again_are_redone() -> None:
    # SIGKILL after step 47: the first group's last record says 47, the newest checkpoint was 40;
    # the second group redid steps 41-47 at its 0.5 s a step
    first = {"type": "ledger", "step": 47, "ledger": {**_ledger(23.0, 46, save=2.0), "group": 1.0}}
    second = {
        "type": "progress",
        "step": 100,
        "ledger": {**_ledger(29.5, 59, restore=1.0, resumed=40), "group": 2.0},
    }
    combined = combine_ledgers([second, first])
    assert combined is not None
    assert combined["ledger"]["redoneSteps"] == 7 and combined["ledger"]["redoneSeconds"] == 3.5
    parts = goodput.split(
        goodput.Attempt(0.0, 80.0, {"step": 1, "time": 10.0, "ledger": _ledger(0, 0)}, combined)
    )
    assert parts["redoneSteps"] == 7 and parts["seconds"]["redone"] == pytest.approx(3.5)
    assert parts["seconds"]["productive"] == pytest.approx(23.0 + 29.5 - 3.5)


def test_a_worker_group_that_failed_before_its_restore_ended_does_not_hide_the_resume_step() -> None:
    # the resubmission after an eviction: Ray Train's first worker group failed while the evicted
    # pod came back, one before its restore and one inside it (2 s spent, nothing restored); the
    # next group resumed from step 560 and trained on: the attempt resumed from 560, nothing redone,
    # and the failed restore's 2 s still count as checkpoint restore
    early = {"type": "ledger", "ledger": {**_ledger(0, 0, resumed=None), "group": 1.0}}
    inside = {"type": "ledger", "ledger": {**_ledger(0, 0, restore=2.0, resumed=None), "group": 2.0}}
    later = {
        "type": "done",
        "step": 600,
        "ledger": {**_ledger(10.0, 40, restore=1.0, resumed=560), "group": 3.0},
    }
    combined = combine_ledgers([later, inside, early])
    assert combined is not None and combined["groups"] == 3 and combined["step"] == 600
    assert combined["ledger"]["resumedFrom"] == 560 and combined["ledger"]["redoneSteps"] == 0
    assert combined["ledger"]["checkpointRestore"] == 3.0 and combined["ledger"]["steps"] == 10.0


def test_redone_steps_count_from_the_furthest_step_before_past_a_group_that_never_restored() -> None:
    # group 1 trained from scratch to step 500 (newest checkpoint 480) and died; group 2 died inside
    # its restore; group 3 resumed at 480 and redid 481-500 at its 0.5 s a step
    first = {"type": "ledger", "step": 500, "ledger": {**_ledger(250.0, 499), "group": 1.0}}
    failed = {"type": "ledger", "ledger": {**_ledger(0, 0, restore=1.5, resumed=None), "group": 2.0}}
    third = {
        "type": "progress",
        "step": 560,
        "ledger": {**_ledger(40.0, 80, restore=1.0, resumed=480), "group": 3.0},
    }
    combined = combine_ledgers([third, failed, first])
    assert combined is not None
    assert combined["ledger"]["resumedFrom"] == 0  # the attempt itself started from scratch
    assert combined["ledger"]["redoneSteps"] == 20 and combined["ledger"]["redoneSeconds"] == 10.0


def test_an_attempt_closed_before_its_log_was_read_keeps_the_split_last_written() -> None:
    # attempt 2 runs: the operator writes its split (resumed from 470) with status; the operator
    # restarts, and the attempt's Ray cluster is deleted before the new one reads the log: it
    # closes the attempt from the record, the 12 s since it as `other`
    split = {
        "seconds": {"startup": 30.0, "productive": 100.0, "checkpointRestore": 2.0, "other": 1.0},
        "firstStep": 471,
        "lastStep": 690,
        "resumedFrom": 470,
        "redoneSteps": 0,
    }
    g = goodput.summary({"closed": {"productive": 50.0}}, T0, 2.0, "CPU core", running=None)
    assert "running" not in g or g["running"] is None
    g = goodput.summary(g, T0, 2.0, "CPU core", running=goodput.running_record(2, split, T0))
    assert g["seconds"]["productive"] == 150.0 and g["running"]["attempt"] == 2
    g = json.loads(json.dumps(g))  # as status stores it
    later = T0 + timedelta(seconds=12)
    parts = goodput.carried(g["running"], 2, later)
    assert parts is not None and parts["resumedFrom"] == 470 and parts["lastStep"] == 690
    assert parts["seconds"]["other"] == 13.0 and parts["seconds"]["productive"] == 100.0
    assert goodput.carried(g["running"], 3, later) is None  # another attempt's record: not this one
    assert goodput.carried(None, 2, later) is None
    closed = goodput.close_attempt(g, 2, parts, "ClusterLost")
    assert closed["attempts"][-1]["resumedFrom"] == 470 and closed["closed"]["productive"] == 150.0
    assert closed["running"] is None  # the merge patch deletes the record with the attempt closed
    assert goodput.summary(closed, later, 2.0, "CPU core")["running"] is None


def test_metrics_expose_seconds_chip_hours_and_the_ratio() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    g = goodput.summary(
        {"closed": {"queued": 10.0, "productive": 30.0, "startup": 10.0}}, T0, 2.0, "CPU core"
    )
    metrics.relay_goodput("ns-g", "job-g", "TrainingJob", g)

    def samples() -> dict[tuple[str, str, str], float]:
        text = generate_latest(metrics.REGISTRY).decode()
        return {
            (s.name, s.labels.get("category", ""), s.labels.get("unit", "")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.labels.get("job") == "job-g"
        }

    got = samples()
    assert got[("forgeline_job_seconds_total", "productive", "")] == 30.0
    assert got[("forgeline_job_seconds_total", "queued", "")] == 10.0
    assert got[("forgeline_job_chip_hours_total", "startup", "CPU core")] == pytest.approx(10 * 2 / 3600)
    assert ("forgeline_job_chip_hours_total", "queued", "CPU core") not in got  # queued holds nothing
    assert got[("forgeline_job_goodput_ratio", "", "")] == 0.75
    metrics.forget_job("ns-g", "job-g", "TrainingJob")
    assert samples() == {}


def _job(name: str, g: dict[str, Any], base: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "method": "lora",
        "baseModel": {"fromJob": {"kind": "FineTuneJob", "name": base}}
        if base
        else {"path": "runs/tiny-llama"},
        "dataset": {"format": "alpaca", "sources": [{"uri": "examples/data/sft.jsonl"}]},
        "output": {"uri": f"runs/{name}"},
        "training": {"maxSteps": 60},
    }
    return {
        "apiVersion": "forgeline.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": spec,
        "status": {"phase": "Succeeded", "goodput": g},
    }


def test_report_prints_categories_attempts_and_the_pipeline_sum() -> None:
    g1 = goodput.summary({"closed": {"productive": 60.0, "startup": 40.0}}, T0, 1.0, "CPU core")
    attempt = {
        "seconds": {"startup": 10.0, "productive": 50.0, "redone": 5.0},
        "firstStep": 21,
        "lastStep": 60,
        "resumedFrom": 20,
        "redoneSteps": 5,
        "secondsPerStep": 1.0,
    }
    g2 = goodput.summary(goodput.close_attempt({}, 1, attempt, "Succeeded"), T0, 2.0, "CPU core")
    stage1, stage2 = _job("sft", g1), _job("dpo", g2, base="sft")
    stages = report.chain(stage2, lambda kind, name: stage1 if name == "sft" else None)
    assert [s["metadata"]["name"] for s in stages] == ["sft", "dpo"]
    out = io.StringIO()
    report.render(stage2, stages, Console(file=out, width=160, highlight=False))
    text = out.getvalue()
    assert "redone work" in text and "goodput 76.9%" in text  # 50 of 65 s held
    assert "attempt 1 ended Succeeded: steps 21–60, resumed from step 20, 5 redone" in text
    assert "pipeline sft → dpo: goodput 66.7%" in text  # (60 + 50) / (100 + 65)


def test_report_names_a_job_that_is_not_there(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from forgeline_operator.cli import joblogs

    def missing(args: argparse.Namespace) -> dict[str, Any]:
        raise joblogs.LogsError(
            f"no trainingjob or finetunejob {args.name!r} in namespace {args.namespace!r}"
        )

    monkeypatch.setattr(report, "fetch_job", missing)
    args = argparse.Namespace(name="nope", namespace="ns", kind=None, kubeconfig=None, output="text")
    assert report.main(args) == 1
    assert "no trainingjob or finetunejob 'nope' in namespace 'ns'" in capsys.readouterr().err
