"""The planner's arithmetic against the published numbers, and `forgeline plan` as a user runs it."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import pytest
import yaml

from forgeline_operator.api import parse_job
from forgeline_operator.cli.main import main
from forgeline_operator.sizing import planning

FIT = planning.CHINCHILLA


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b


# ------------------------------------------------------------------------------ Chinchilla


@pytest.mark.parametrize("flops", [1e18, 1.21e20, 1.424e21, 5.76e23, 1e26])
def test_closed_form_is_the_numerical_optimum(flops: float) -> None:
    closed, searched = planning.compute_optimal(flops), planning.compute_optimal_numeric(flops)
    assert _rel(searched.params, closed.params) < 1e-4
    assert _rel(closed.training_flops, flops) < 1e-12
    # Nothing nearby on the 6ND = C curve has a lower loss.
    for factor in (0.9, 1.1):
        n = closed.params * factor
        assert FIT.loss(n, flops / 6 / n) > FIT.loss(closed.params, closed.tokens)


@pytest.mark.parametrize(
    ("flops", "params", "tokens"),
    [(1.21e20, 1e9, 20.2e9), (5.76e23, 67e9, 1.5e12)],
)
def test_approach_1_reproduces_table_3(flops: float, params: float, tokens: float) -> None:
    plan = planning.approach_1_optimal(flops)
    assert _rel(plan.params, params) < 0.10
    assert _rel(plan.tokens, tokens) < 0.10


def test_approach_1_is_within_6_percent_of_every_table_3_row() -> None:
    for params, flops, tokens in planning.TABLE_3:
        plan = planning.approach_1_optimal(flops)
        assert _rel(plan.params, params) < 0.06 and _rel(plan.tokens, tokens) < 0.06


def test_approach_3_from_its_published_constants() -> None:
    # eq. 10's rounded constants: N_opt = G (C/6)^(β/(α+β)), G = (αA/βB)^(1/(α+β)).
    a, b = FIT.beta / (FIT.alpha + FIT.beta), FIT.alpha / (FIT.alpha + FIT.beta)
    g = (FIT.alpha * FIT.a / (FIT.beta * FIT.b)) ** (1 / (FIT.alpha + FIT.beta))
    assert a == pytest.approx(0.4516, abs=1e-4) and b == pytest.approx(0.5484, abs=1e-4)
    gopher = planning.compute_optimal(5.76e23)
    assert gopher.params == pytest.approx(g * (5.76e23 / 6) ** a, rel=1e-12)
    # Well under approach 1's 67B at Gopher's compute: about 32B parameters on about 3T tokens.
    assert 30e9 < gopher.params < 34e9 and 2.8e12 < gopher.tokens < 3.2e12
    assert FIT.loss(gopher.params, gopher.tokens) == pytest.approx(1.931, abs=1e-3)
    assert gopher.params < planning.approach_1_optimal(5.76e23).params / 2


# -------------------------------------------------------------------------- inference-aware


def _chinchilla_loss(flops: float) -> float:
    plan = planning.compute_optimal(flops)
    return FIT.loss(plan.params, plan.tokens)


def test_without_inference_the_inference_aware_plan_is_chinchilla() -> None:
    plan = planning.inference_optimal(_chinchilla_loss(1.424e21), 0)
    assert _rel(plan.allocation.params, planning.compute_optimal(1.424e21).params) < 1e-4


@pytest.mark.parametrize("flops", [1e20, 1.424e21, 5.76e23])
def test_more_inference_never_makes_the_model_bigger(flops: float) -> None:
    target = _chinchilla_loss(flops)
    chinchilla = planning.compute_optimal(flops)
    served = (0, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14)
    plans = [planning.inference_optimal(target, t) for t in served]
    sizes = [p.allocation.params for p in plans]
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(sizes, sizes[1:], strict=False))
    assert sizes[-1] < sizes[0] / 2
    for t, p in zip(served, plans, strict=True):
        assert p.allocation.tokens_per_param >= chinchilla.tokens_per_param * (1 - 1e-6)
        assert FIT.loss(p.allocation.params, p.allocation.tokens) == pytest.approx(target, abs=1e-9)
        # Never more total compute than serving the same tokens with the Chinchilla model.
        chinchilla_total = chinchilla.training_flops + planning.inference_flops(chinchilla.params, t)
        assert p.total_flops <= chinchilla_total * (1 + 1e-9)


def test_train_to_test_with_one_sample_is_the_inference_aware_plan() -> None:
    aware = planning.inference_optimal(_chinchilla_loss(1.424e21), 1e11)
    best, plans = planning.train_to_test_optimal(aware.total_flops, 1e11, 1)
    assert [p.samples for p in plans] == [1]
    assert _rel(best.allocation.params, aware.allocation.params) < 1e-3


def test_train_to_test_over_trains_and_never_loses_to_one_sample() -> None:
    aware = planning.inference_optimal(_chinchilla_loss(1.424e21), 1e11)
    best, plans = planning.train_to_test_optimal(aware.total_flops, 1e11, 16)
    assert [p.samples for p in plans] == [1, 2, 4, 8, 16]
    assert best.samples > 1 and best.effective_loss < aware.effective_loss
    assert best.allocation.tokens_per_param > 100
    for p in plans:
        assert p.total_flops == pytest.approx(aware.total_flops, rel=1e-9)
    # At a fixed k, more inference volume never makes the model bigger either.
    for k in (2, 8):
        sizes = [
            planning.best_at_budget(aware.total_flops, t, k).allocation.params
            for t in (1e9, 1e10, 1e11, 1e12)
        ]
        assert sizes == sorted(sizes, reverse=True)


def test_sample_counts() -> None:
    assert planning.sample_counts(1) == [1]
    assert planning.sample_counts(12) == [1, 2, 4, 8, 12]


# ------------------------------------------------------------------------- hardware, shapes


def test_measured_mfu_reads_the_newest_matching_section() -> None:
    text = (
        "# Benchmarks\n\n## CPU run\n\nMachine: AMD EPYC, 2 cores, no GPU.\n\n"
        "| run | tokens/s | MFU (vs peak) |\n| --- | ---: | ---: |\n| a | 1 | 87.2% |\n\n"
        "## GPU run, old\n\nMachine: 8× NVIDIA H100 80GB HBM3.\n\n"
        "| run | MFU |\n| --- | ---: |\n| recipe | 38.0% |\n\n"
        "## GPU run, new\n\nMachine: 8× NVIDIA H100 80GB HBM3.\n\n"
        "| run | tokens/s | MFU |\n| --- | ---: | ---: |\n| recipe | 1,000 | 44.5% |\n| plain | 1 | 50% |\n"
    )
    assert planning.measured_mfu(text, "h100") == (pytest.approx(0.445), "GPU run, new")
    assert planning.measured_mfu(text, "a100") is None
    assert planning.measured_mfu("## x\n\nMachine: 2 cores, no GPU\n", "h100") is None


@pytest.mark.parametrize("params", [1e8, 5e8, 1e9, 2.14e9, 7e9, 32e9, 70e9])
def test_llama_shape_lands_near_the_target(params: float) -> None:
    shape = planning.llama_shape_for(params)
    assert _rel(shape.params, params) < 0.10
    assert shape.hidden_size % shape.num_heads == 0 and shape.num_heads % shape.num_kv_heads == 0
    assert 30 <= shape.hidden_size / shape.num_layers <= 200


def test_llama_parameter_count_matches_transformers_arithmetic() -> None:
    # Llama 2 7B (hidden 4096, 32 layers, MLP 11008, 32 heads, vocab 32000) has 6,738,415,616.
    shape = planning.LlamaShape(4096, 32, 32, 32, 11008, 32000)
    assert shape.params == 6_738_415_616


def test_manifest_parses_and_trains_on_the_planned_tokens() -> None:
    plan = planning.compute_optimal(1.424e21)
    shape = planning.llama_shape_for(plan.params)
    gpu = planning.GPUS["h100"]
    manifest = planning.training_job_manifest("llama-2b", shape, plan, gpu, 16, 1000, "s3://b/d", "s3://b/o")
    job = parse_job(manifest)
    t = job.spec.training
    tokens = t.max_steps * t.global_batch_size * job.spec.data.sequence_length
    assert 0 <= tokens - plan.tokens < t.global_batch_size * job.spec.data.sequence_length
    assert job.spec.resources.workers == 2 and job.spec.resources.gpus_per_worker == 8


# ------------------------------------------------------------------------------------ CLI


def test_plan_prints_a_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--gpu-hours", "1000", "--gpu", "h100", "--bench-results", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    for needle in ("2.14B", "111B", "2.295", "5.2 days", "$2,500", "ASSUMPTION", "approach 3"):
        assert needle in out, needle


def test_plan_with_inference_and_samples(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--flops", "1.424e21", "--inference-tokens", "1e11", "--samples-per-query", "16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "inference-" in out and "train-to-" in out and "each k at" in out


def test_plan_refuses_samples_without_inference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--gpu-hours", "10", "--samples-per-query", "4"]) == 2
    assert "needs --inference-tokens" in capsys.readouterr().err


def test_emitted_manifest_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["plan", "--gpu-hours", "1000", "--gpu", "h100", "--emit"]) == 0
    captured = capsys.readouterr()
    assert "approach 3" in captured.err  # the table goes to stderr, the YAML alone to stdout
    parse_job(yaml.safe_load(captured.out))
    path = tmp_path / "plan.yaml"
    path.write_text(captured.out)
    assert main(["validate", str(path)]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(captured.out))
    assert main(["validate", "-"]) == 0


@pytest.mark.parametrize(
    "extra", [["--inference-tokens", "1e12"], ["--inference-tokens", "1e11", "--samples-per-query", "16"]]
)
def test_emitted_inference_aware_manifests_validate(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", "--gpu-hours", "1000", "--gpus", "16", "--emit", *extra]) == 0
    job = parse_job(yaml.safe_load(capsys.readouterr().out))
    assert job.spec.model.hidden_size is not None
    assert math.isfinite(job.spec.budget.max_gpu_hours or 0)
