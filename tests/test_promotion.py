"""Eval-gated promotion: the verdict (api/promotion.py) on known evals, the spec's validation
naming the field and the fix, and `forgeline run` refusing an unpromoted upstream as the operator
does. The operator's Promoted condition on real jobs: test_kube_e2e.py (the pipeline, in pods) and
test_faults.py (a refused downstream, against the real apiserver)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from forgeline_operator.api import InvalidJobError, parse_job
from forgeline_operator.api.promotion import Promotion, decide
from forgeline_operator.cli import runlocal

from .conftest import EXAMPLES


def _loss(value: float, ci: float) -> dict[str, float]:
    return {"eval_loss": value, "eval_loss_ci95": ci, "perplexity": 2.718281828**value, "eval_tokens": 4000.0}


def test_an_improvement_beyond_the_interval_and_the_margin_is_promoted() -> None:
    v = decide(Promotion(metric="eval_loss", min_improvement=0.05), _loss(3.2, 0.03), _loss(2.9, 0.04))
    assert v.promoted and v.reason == "Improved"
    assert v.improvement == pytest.approx(0.3) and v.interval == pytest.approx(0.05)
    assert v.required == pytest.approx(0.05)
    assert v.message == (
        "eval_loss 3.2 → 2.9: eval_loss improved by 0.3, needs more than 0.05 (the 95% interval of "
        "the difference ±0.05, minImprovement 0.05); promoted"
    )
    assert v.status()["interval95"] == pytest.approx(0.05) and v.status()["promoted"] is True


def test_an_improvement_inside_the_interval_is_not_significant() -> None:
    v = decide(Promotion(metric="eval_loss"), _loss(3.2, 0.12), _loss(3.1, 0.1))
    assert not v.promoted and v.reason == "NotSignificant"
    assert v.required == pytest.approx((0.12**2 + 0.1**2) ** 0.5)
    assert "not promoted" in v.message and "±0.156" in v.message


def test_a_worse_model_is_regressed() -> None:
    v = decide(
        Promotion(metric="accuracy"),
        {"accuracy": 0.61, "accuracy_ci95": 0.02},
        {"accuracy": 0.55, "accuracy_ci95": 0.02},
    )
    assert not v.promoted and v.reason == "Regressed" and v.improvement == pytest.approx(-0.06)
    assert "worse than before training" in v.message


def test_perplexity_is_judged_on_the_loss_interval_it_comes_from() -> None:
    v = decide(Promotion(metric="perplexity"), _loss(3.2, 0.03), _loss(2.9, 0.04))
    assert v.promoted and v.improvement == pytest.approx(0.3)  # in loss units: the interval's
    assert v.message.startswith("perplexity 24.53 → 18.17: eval_loss improved by 0.3")


def test_a_threshold_decides_alone_and_a_missing_metric_says_what_there_is() -> None:
    met = decide(
        Promotion(metric="mean_reward", threshold=0.5, significance="none"),
        {"mean_reward": 0.1},
        {"mean_reward": 0.6},
    )
    assert met.promoted and met.reason == "ThresholdMet"
    missed = decide(Promotion(metric="eval_loss", threshold=1.0), None, _loss(2.0, 0.1))
    assert not missed.promoted and missed.reason == "ThresholdNotMet" and "at most 1" in missed.message
    none = decide(Promotion(metric="accuracy"), None, _loss(2.0, 0.1))
    assert (
        none.reason == "NoEvaluation"
        and none.message == "no accuracy in the eval after training (it has: eval_loss, perplexity)"
    )
    no_base = decide(Promotion(metric="eval_loss"), None, _loss(2.0, 0.1))
    assert no_base.reason == "NoEvaluation" and "before training" in no_base.message


def test_margin_alone_where_a_metric_has_no_interval() -> None:
    gate = Promotion(metric="preference_accuracy", significance="none", min_improvement=0.1)
    assert decide(gate, {"preference_accuracy": 0.5}, {"preference_accuracy": 0.65}).promoted
    assert (
        decide(gate, {"preference_accuracy": 0.5}, {"preference_accuracy": 0.55}).reason == "NotSignificant"
    )


def _example(name: str, index: int = 0) -> dict[str, Any]:
    return list(yaml.safe_load_all((EXAMPLES / name).read_text()))[index]


@pytest.mark.parametrize(
    "doc_gate,error",
    [
        (
            ("pretrain-tiny-llama.yaml", {"metric": "accuracy"}),
            "spec.promotion.metric: TrainingJob evals do not report accuracy — fix: use eval_loss or "
            "perplexity",
        ),
        (
            ("dpo-tiny.yaml", {"metric": "preference_accuracy"}),
            "spec.promotion.significance: preference_accuracy has no 95% interval here to test the "
            "improvement against — fix: set significance: none with a minImprovement",
        ),
        (
            ("grpo-tiny.yaml", {"metric": "eval_loss"}),
            "spec.promotion.metric: GRPO evals do not report eval_loss — fix: use mean_reward",
        ),
    ],
)
def test_a_gate_the_job_cannot_judge_is_refused_naming_the_field(
    doc_gate: tuple[str, dict[str, Any]], error: str
) -> None:
    name, gate = doc_gate
    doc = _example(name)
    doc["spec"]["promotion"] = gate
    with pytest.raises(InvalidJobError) as exc:
        parse_job(doc)
    assert error in str(exc.value)


def test_a_gate_without_an_eval_is_refused() -> None:
    doc = _example("pretrain-tiny-llama.yaml")
    doc["spec"]["evaluation"] = {"holdoutFraction": 0.0}
    doc["spec"]["promotion"] = {"metric": "eval_loss"}
    with pytest.raises(InvalidJobError) as exc:
        parse_job(doc)
    assert "spec.promotion: promotion needs a held-out evaluation, and evaluation is off" in str(exc.value)


def test_the_pipeline_example_gates_every_stage() -> None:
    jobs = runlocal.load_jobs(str(EXAMPLES / "pipeline-pretrain-sft-dpo.yaml"))
    assert [j.spec.promotion is not None for j in jobs] == [True, True, True]


def _result(name: str, before: float, after: float, gate: Promotion) -> runlocal.RunResult:
    records = [
        {"type": "eval", "step": 0, "eval_loss": before, "eval_loss_ci95": 0.01},
        {"type": "eval", "step": 30, "eval_loss": after, "eval_loss_ci95": 0.01},
    ]
    result = runlocal.RunResult(name, "FineTuneJob", "SUCCEEDED", f"runs/{name}", "sid", records)
    result.verdict = decide(gate, *result.evals())
    return result


def test_forgeline_run_refuses_an_unpromoted_upstream_unless_allowed() -> None:
    jobs = runlocal.load_jobs(str(EXAMPLES / "pipeline-pretrain-sft-dpo.yaml"))
    dpo = jobs[2]
    ref = dpo.spec.base_model.from_job
    assert ref is not None
    worse = {"pipe-sft": _result("pipe-sft", 2.0, 2.5, Promotion(metric="eval_loss"))}
    with pytest.raises(RuntimeError) as exc:
        runlocal._resolve_from_job(ref, worse, "spec.baseModel.fromJob")
    assert str(exc.value).startswith(
        "FineTuneJob/pipe-sft succeeded but its output was not promoted (Regressed: eval_loss 2 → 2.5"
    )
    assert str(exc.value).endswith("set spec.baseModel.fromJob.allowUnpromoted: true to use it anyway")
    allowed = ref.model_copy(update={"allow_unpromoted": True})
    assert runlocal._resolve_from_job(allowed, worse, "spec.baseModel.fromJob") == "runs/pipe-sft"
    better = {"pipe-sft": _result("pipe-sft", 2.5, 2.0, Promotion(metric="eval_loss"))}
    assert runlocal._resolve_from_job(ref, better, "spec.baseModel.fromJob") == "runs/pipe-sft"
