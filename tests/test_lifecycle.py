"""The status table (phases → conditions, timestamps) and progress records → status.progress."""

from __future__ import annotations

import copy

from forgeline_operator.controller import lifecycle


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
    p = lifecycle.progress_from(
        {
            "step": 30,
            "total_steps": 60,
            "loss": 2.5,
            "tokens_per_second": 100.0,
            "mfu": 0.2,
            "eta_seconds": 12.0,
        },
        {"type": "eval", "step": 20, "eval_loss": 3.0, "time": 1795562977.7},
    )
    assert p["summary"] == "30/60" and p["percent"] == 50 and p["tokensPerSecond"] == 100.0
    assert p["evalMetrics"] == {"eval_loss": 3.0} and "evalWarning" not in p  # unsized: no warning
    small = lifecycle.progress_from(
        {"step": 1}, {"eval_loss": 3.0, "eval_loss_ci95": 0.25, "eval_tokens": 166}
    )
    assert small["evalWarning"].startswith("eval too small to trust: 166 held-out tokens")
    assert "±0.25" in small["evalWarning"]
    assert "evalWarning" not in lifecycle.progress_from({"step": 1}, {"eval_loss": 3.0, "eval_tokens": 4096})


def test_eval_gain_names_each_kinds_headline_metric() -> None:
    assert (
        lifecycle.eval_gain({"eval_loss": 6.7, "perplexity": 812.4}, {"perplexity": 143.2}) == "ppl 812→143"
    )
    sft = {"eval_loss": 2.3, "perplexity": 10.0, "accuracy": 0.12}
    assert lifecycle.eval_gain(sft, {**sft, "accuracy": 0.614}) == "acc 12%→61%"
    pref = {"preference_accuracy": 0.48, "reward_margin": 0.0, "eval_loss": 0.69}
    assert lifecycle.eval_gain(pref, {**pref, "preference_accuracy": 0.83}) == "pref acc 48%→83%"
    # DPO before training: policy = reference, every margin 0 — a tie on every pair, said so
    ties = {"preference_accuracy": 0.5, "preference_ties": 1.0, "reward_margin": 0.0}
    trained = {"preference_accuracy": 0.81, "reward_margin": 0.4}
    assert lifecycle.eval_gain(ties, trained) == "pref acc tie→81%"
    assert lifecycle.eval_gain(ties, None) == "pref acc tie"
    assert lifecycle.eval_gain({"mean_reward": 0.12}, {"mean_reward": 0.8}) == "reward 0.12→0.8"
    assert lifecycle.eval_gain({"perplexity": 812.4}, None) == "ppl 812"  # no eval after training yet
    assert lifecycle.eval_gain({"eval_tokens": 10.0}, None) is None


def test_the_eval_baseline_is_kept_across_records_and_attempts() -> None:
    """The step-0 eval is the baseline: status keeps it (a resumed attempt sends none) and the
    printer column shows it against the latest eval."""
    base = {"type": "eval", "step": 0, "perplexity": 812.4, "eval_loss": 6.7}
    first = lifecycle.progress_from({"step": 0}, base, None, base)
    assert first["evalBaseline"] == {"perplexity": 812.4, "eval_loss": 6.7}
    assert first["display"]["eval"] == "ppl 812"
    later = {"type": "eval", "step": 40, "perplexity": 143.2, "eval_loss": 4.96}
    resumed = lifecycle.progress_from({"step": 40}, later, first, None)  # a new attempt's cursor
    assert resumed["evalBaseline"] == first["evalBaseline"]
    assert resumed["display"]["eval"] == "ppl 812→143"
    assert "evalBaseline" not in lifecycle.progress_from({"step": 3}, later, None, None)


def test_step_advanced_at_moves_only_when_the_step_does() -> None:
    rec = {"step": 30, "total_steps": 60, "eta_seconds": 15.0}
    first = lifecycle.progress_from(rec, None, None)
    assert first["stepAdvancedAt"] == first["updatedAt"] and first["secondsPerStep"] == 0.5
    old = {**first, "stepAdvancedAt": "2026-01-01T00:00:00Z"}
    assert lifecycle.progress_from(rec, None, old)["stepAdvancedAt"] == "2026-01-01T00:00:00Z"
    moved = lifecycle.progress_from({**rec, "step": 31}, None, old)
    assert moved["stepAdvancedAt"] != "2026-01-01T00:00:00Z"


def test_progress_is_shown_as_people_read_it() -> None:
    shown = lifecycle.display(1.752364, 46150.21, 0.30329)
    assert shown == {"loss": "1.75", "tokensPerSecond": "46.2k", "mfu": "30%"}
    assert lifecycle.display(0.012345, 812.4, 0.004)["loss"] == "0.0123"
    assert lifecycle.display(None, 812.4, 0.004) == {"tokensPerSecond": "812", "mfu": "0.4%"}
    assert lifecycle.display(12.0, 2_345_678.0, None) == {"loss": "12", "tokensPerSecond": "2.3M"}
    assert lifecycle.display(None, 999.7, None) == {"tokensPerSecond": "1.0k"}
    record = {"type": "progress", "step": 3, "total_steps": 6, "loss": 2.5, "tokens_per_second": 1234.0}
    assert lifecycle.progress_from(record, None)["display"] == {"loss": "2.5", "tokensPerSecond": "1.2k"}
