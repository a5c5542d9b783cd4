"""`fit.py`'s memory estimate against published figures, and `forgeline validate --fit`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from forgeline_operator.api import parse_job
from forgeline_operator.cli import main as cli
from forgeline_operator.sizing import fit

from .conftest import EXAMPLES

LLAMA2_7B = 6_738_415_616  # meta-llama/Llama-2-7b-hf, as transformers counts it
GB = 10**9


def _finetune(method: str, gpus: int = 1, workers: int = 1, **spec: Any) -> Any:
    body: dict[str, Any] = {
        "baseModel": {"hubId": "meta-llama/Llama-2-7b-hf"},
        "method": method,
        "dataset": {"sources": [{"uri": "d.jsonl"}], "format": "alpaca", "maxSequenceLength": 512},
        "training": {"maxSteps": 10, "microBatchSize": 1, "gradientCheckpointing": True},
        "resources": {"gpusPerWorker": gpus, "workers": workers},
        "output": {"uri": "out"},
    }
    body.update(spec)
    return parse_job(
        {
            "apiVersion": "forgeline.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "j"},
            "spec": body,
        }
    )


def _lora(r: int = 64) -> dict[str, Any]:
    return {"lora": {"r": r, "targetModules": ["all-linear"]}}


def test_llama2_7b_shape_has_its_published_parameter_count() -> None:
    assert fit.KNOWN_MODELS["meta-llama/llama-2-7b-hf"].params == LLAMA2_7B


def test_7b_qlora_is_5_to_7_gb() -> None:
    """QLoRA paper / common reports: a 7B QLoRA fine-tune needs about 5-6 GB (r 64 all-linear
    adapters, trained in fp32 with AdamW, add about 2.5 GB of state to a 3.9 GB NF4 base)."""
    e = fit.estimate(_finetune("qlora", **_lora(), quantization={}), 80 * GB)
    assert 5 * GB <= e.tensors <= 7 * GB
    assert e.trainable_params == 159_907_840  # 64·(in + out) over q,k,v,o,gate,up,down × 32 layers


def test_7b_16_bit_lora_is_15_to_20_gb() -> None:
    e = fit.estimate(_finetune("lora", **_lora()), 80 * GB)
    assert 15 * GB <= e.tensors <= 20 * GB
    assert e.fits is True


def test_full_finetune_with_adam_is_16_bytes_per_parameter() -> None:
    e = fit.estimate(_finetune("full"), 80 * GB)
    assert e.weights + e.gradients + e.optimizer_states == pytest.approx(16 * LLAMA2_7B, rel=0.01)


def test_zero_3_over_8_gpus_divides_the_model_states_by_8() -> None:
    alone = fit.estimate(_finetune("full"), 80 * GB)
    sharded = fit.estimate(_finetune("full", gpus=8, deepspeed={"zeroStage": 3}), 80 * GB)
    for part in ("weights", "gradients", "optimizer_states"):
        assert getattr(sharded, part) == pytest.approx(getattr(alone, part) / 8, rel=1e-6)
    assert sharded.activations == alone.activations


def test_zero_offload_moves_the_optimizer_states_off_the_gpu() -> None:
    e = fit.estimate(_finetune("full", gpus=8, deepspeed={"zeroStage": 2, "offloadOptimizer": True}), 80 * GB)
    assert e.optimizer_states == 0 and e.offloaded == pytest.approx(12 * LLAMA2_7B / 8, rel=1e-6)


def test_checkpointing_reduces_activations() -> None:
    on = fit.estimate(_finetune("lora", **_lora()), None)
    off_spec = {"maxSteps": 10, "microBatchSize": 1, "gradientCheckpointing": False}
    off = fit.estimate(_finetune("lora", training=off_spec, **_lora()), None)
    assert on.activations < off.activations / 3


def test_full_7b_on_one_24_gb_gpu_does_not_fit_and_says_what_to_change() -> None:
    e = fit.estimate(_finetune("full"), fit.gpu_memory_for("l4"))
    assert e.fits is False
    text = "\n".join(e.advice)
    assert "method: qlora" in text and "method: lora" in text
    assert "spec.resources.workers:" in text and "spec.deepspeed.zeroStage: 3" in text


def test_advice_names_micro_batch_and_checkpointing_fields() -> None:
    training = {"maxSteps": 10, "microBatchSize": 16, "gradientCheckpointing": False}
    e = fit.estimate(_finetune("lora", training=training, **_lora()), fit.gpu_memory_for("a100-40gb"))
    assert e.fits is False
    text = "\n".join(e.advice)
    assert "spec.training.gradientCheckpointing: true" in text
    assert "spec.training.microBatchSize: " in text


def test_unknown_base_model_says_how_to_give_its_size() -> None:
    e = fit.estimate(_finetune("full", baseModel={"path": "s3://bucket/my-model"}), 80 * GB)
    assert e.fits is None and e.params is None
    assert "--model-config" in e.model


def test_config_json_gives_the_size() -> None:
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config |= {"num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512}
    e = fit.estimate(_finetune("full", baseModel={"path": "s3://bucket/m"}), 80 * GB, model_config=config)
    assert e.params == 2 * 512 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64


def test_cpu_jobs_are_not_compared_with_a_gpu() -> None:
    e = fit.estimate(_finetune("full", gpus=0), 80 * GB)
    assert e.gpu_memory is None and e.fits is None and "per worker process" in e.gpu_source


@pytest.mark.parametrize(
    ("name", "gib"),
    [
        ("h100", 79.6),
        ("NVIDIA-H100-80GB-HBM3", 79.6),
        ("NVIDIA-A100-SXM4-40GB", 40),
        ("a100", 80),
        ("t4", 15),
    ],
)
def test_gpu_memory_for_known_types(name: str, gib: float) -> None:
    assert fit.gpu_memory_for(name) == pytest.approx(gib * 2**30, rel=0.01)


def test_gpu_memory_for_unknown_type_is_none() -> None:
    assert fit.gpu_memory_for("mi300x") is None


def test_validate_fit_exit_codes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    production = str(EXAMPLES / "production/qlora-llama-8b.yaml")
    assert cli.main(["validate", "--fit", production]) == 0
    assert "FITS" in capsys.readouterr().out
    assert cli.main(["validate", "--fit", "--gpu", "t4", production]) == 3
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "try: spec.training.microBatchSize:" in out


def test_validate_fit_json(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(EXAMPLES / "production/pretrain-llama-1b-8xh100-zero3.yaml")
    assert cli.main(["validate", "--fit", "-o", "json", path]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["ok"] and row["fit"]["fits"] is True and row["fit"]["total"] < row["fit"]["gpu_memory"]


def test_merge_holds_only_the_16_bit_base() -> None:
    """A merge trains nothing: weights only (7B in 16 bits: 13.5 GB), no gradients or optimizer."""
    adapters = [{"fromJob": {"kind": "FineTuneJob", "name": n}} for n in ("a", "b")]
    e = fit.estimate(
        _finetune("merge", training={"microBatchSize": 1}, merge={"adapters": adapters}, dataset=None),
        80 * GB,
    )
    assert e.weights == 2 * LLAMA2_7B and e.gradients == e.optimizer_states == 0
    assert e.trainable_params == 0 and e.fits is True
    assert any("method merge" in a for a in e.assumptions)
