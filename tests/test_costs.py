"""Live cost (`costs.py`), the Fits condition (`fitcheck.py`) and conditions kept across phases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from forgeline_operator.api import parse_job
from forgeline_operator.api.common import Budget
from forgeline_operator.controller import costs, fitcheck, lifecycle
from forgeline_operator.controller.settings import OperatorSettings, memory_bytes

START = "2026-11-25T10:00:00Z"
AT = datetime(2026, 11, 25, 11, 0, tzinfo=UTC)  # one hour after START


def test_gpu_hours_are_gpus_times_hours_since_start_and_the_projection_adds_the_eta() -> None:
    cost = costs.live(16, 2.5, "$", START, eta_seconds=1800, at=AT)
    assert cost is not None
    assert cost.gpu_hours == pytest.approx(16.0)
    assert cost.projected_gpu_hours == pytest.approx(24.0)  # 16 GPUs × (1 h + 0.5 h)
    assert cost.cost == pytest.approx(40.0)
    assert cost.projected_cost == pytest.approx(60.0)
    assert cost.display() == "$40→$60"
    status = cost.status("t")
    assert status["gpuHours"] == 16.0 and status["projectedCost"] == 60.0 and status["currency"] == "$"


def test_without_a_price_cost_is_shown_in_gpu_hours() -> None:
    cost = costs.live(8, None, "$", START, eta_seconds=None, at=AT + timedelta(minutes=15))
    assert cost is not None and cost.cost is None and cost.projected_gpu_hours is None
    assert cost.gpu_hours == pytest.approx(10.0) and cost.display() == "10 GPU-h"
    assert "cost" not in cost.status("t") and "currency" not in cost.status("t")


def test_a_finished_job_projects_what_it_used_and_cpu_or_unstarted_jobs_cost_nothing() -> None:
    done = costs.live(4, 3.0, "€", START, eta_seconds=999, at=AT, finished=True)
    assert done is not None and done.projected_gpu_hours == done.gpu_hours == pytest.approx(4.0)
    assert done.display() == "€12"  # spent; no projection once finished
    assert costs.live(0, 3.0, "$", START, 10, AT) is None
    assert costs.live(4, 3.0, "$", None, 10, AT) is None


def test_small_and_large_amounts_read_well() -> None:
    assert costs.live(1, 0.5, "$", START, 0, AT).display() == "$0.50→$0.50"
    big = costs.live(512, 2.0, "$", START, 0, AT + timedelta(hours=99))
    assert big.display() == "$102k→$102k"


def test_budget_at_risk_when_the_projection_exceeds_max_gpu_hours() -> None:
    budget = Budget(max_gpu_hours=20)
    ahead = costs.live(16, None, "$", START, eta_seconds=1800, at=AT)  # projected 24
    why = costs.budget_at_risk(budget, ahead, START, 1800, AT)
    assert why is not None and "spec.budget.maxGpuHours (20)" in why and "projected 24" in why
    within = costs.live(16, None, "$", START, eta_seconds=600, at=AT)  # projected 18.7
    assert costs.budget_at_risk(budget, within, START, 600, AT) is None
    assert costs.budget_at_risk(budget, ahead, START, None, AT) is None  # no ETA yet: no verdict


def test_budget_at_risk_when_the_projected_finish_is_past_the_deadline() -> None:
    budget = Budget(active_deadline_seconds=5400)  # 1.5 h
    why = costs.budget_at_risk(budget, None, START, 3600, AT)  # finishes at 2 h
    assert why is not None and "spec.budget.activeDeadlineSeconds (5400s)" in why
    assert costs.budget_at_risk(budget, None, START, 1200, AT) is None


def test_memory_quantities() -> None:
    assert memory_bytes("80Gi") == 80 * 2**30
    assert memory_bytes("81559Mi") == 81559 * 2**20
    assert memory_bytes("24G") == 24 * 10**9
    with pytest.raises(ValueError, match="80Gi"):
        memory_bytes("80 gigs")


def test_the_price_comes_from_the_pool_then_the_operator() -> None:
    settings = OperatorSettings(
        price_per_gpu_hour=2.5, node_pools={"spot": {"pricePerGpuHour": 1.0}, "plain": {}}
    )
    assert settings.price_for("spot") == 1.0
    assert settings.price_for("plain") == 2.5
    assert settings.price_for(None) == 2.5


# -- conditions outside the phase table -------------------------------------------------------


def test_extra_conditions_survive_phase_transitions_and_move_their_time_only_on_a_flip() -> None:
    conds = lifecycle.set_condition([], "Fits", "False", "ExceedsGpuMemory", "too big", 1)
    assert conds is not None and conds[0]["status"] == "False"
    assert lifecycle.set_condition(conds, "Fits", "False", "ExceedsGpuMemory", "too big", 1) is None
    status: dict[str, Any] = {"conditions": conds}
    patch = lifecycle.status_patch(status, "Running", "Submitted", "go", 1)
    types = [c["type"] for c in patch["conditions"]]
    assert types.count("Fits") == 1 and "Running" in types
    same = lifecycle.set_condition(patch["conditions"], "Fits", "False", "ExceedsGpuMemory", "still", 2)
    assert same is not None
    fits = next(c for c in same if c["type"] == "Fits")
    assert fits["lastTransitionTime"] == conds[0]["lastTransitionTime"] and fits["observedGeneration"] == 2


# -- the Fits condition -------------------------------------------------------------------------


def _finetune(method: str, pool: str | None = None, gpus: int = 1, **spec: Any) -> Any:
    body: dict[str, Any] = {
        "baseModel": {"hubId": "meta-llama/Llama-2-7b-hf"},
        "method": method,
        "dataset": {"sources": [{"uri": "d.jsonl"}], "format": "alpaca", "maxSequenceLength": 512},
        "training": {"maxSteps": 10, "microBatchSize": 1, "gradientCheckpointing": True},
        "resources": {"gpusPerWorker": gpus, **({"nodePool": pool} if pool else {})},
        "output": {"uri": "out"},
        **spec,
    }
    return parse_job(
        {
            "apiVersion": "forgeline.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "j"},
            "spec": body,
        }
    )


def test_fits_compares_with_the_pools_gpu_memory() -> None:
    settings = OperatorSettings(node_pools={"big": {"gpuMemory": "80Gi"}, "small": {"gpuMemory": "24Gi"}})
    lora = _finetune("lora", "big", lora={"r": 16})
    found = fitcheck.verdict(lora, settings)
    assert (found.status, found.reason) == ("True", "FitsInGpuMemory")
    assert "node pool big: gpuMemory 80Gi" in found.message
    full = fitcheck.verdict(_finetune("full", "small"), settings)
    assert (full.status, full.reason) == ("False", "ExceedsGpuMemory")
    assert "try:" in full.message and "method: qlora" in full.message  # says what to change


def test_fits_knows_gpu_types_by_name_and_is_unknown_otherwise() -> None:
    settings = OperatorSettings()
    assert fitcheck.verdict(_finetune("full", "h100"), settings).status == "False"  # 7B × 16 B > 80 GB
    unknown = fitcheck.verdict(_finetune("lora", "gpu-pool-a"), settings)
    assert (unknown.status, unknown.reason) == ("Unknown", "NotEstimated")
    assert "gpuMemory" in unknown.message
    cpu = fitcheck.verdict(_finetune("lora", gpus=0), settings)
    assert cpu.status == "Unknown" and "CPU" in cpu.message
