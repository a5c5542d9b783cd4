"""`fit.py`'s estimate against memory measured in real CPU training steps of small models.

Peak RSS is no test of the estimate (the Python, torch and Ray runtime dominate it; see
docs/planning.md), so this measures the tensors themselves in one real training step of a
llama built from its config.json, as the estimate models them:
- weights: every parameter's bytes (for LoRA: the frozen base + the adapters);
- gradients: the bytes of every `.grad` after backward;
- optimizer states: the bytes of the optimizer's state after its step (each of the optimizers that
  run on a CPU: AdamW, bitsandbytes' 8-bit AdamW, Adafactor; storages shared between parameters,
  such as bitsandbytes' quantisation map, counted once);
- activations: the bytes autograd saves for backward (a saved-tensors hook on the forward pass;
  parameters and tensors saved twice counted once).

Stated tolerances: weights, gradients and optimizer states are arithmetic on known shapes, so
within 2%; activations come from Korthikanti et al.'s per-layer formula (for GPT's GELU MLP, not
llama's SwiGLU) plus the logits, so within ±40%.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from forgeline_operator.api import parse_job
from forgeline_operator.sizing import fit

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
SEQ, BATCH = 128, 4


def _job(method: str, base: Path, optimizer: str = "adamw", **spec: Any) -> Any:
    body: dict[str, Any] = {
        "baseModel": {"path": str(base)},
        "method": method,
        "dataset": {"sources": [{"uri": "d.jsonl"}], "format": "alpaca", "maxSequenceLength": SEQ},
        "training": {"maxSteps": 1, "microBatchSize": BATCH, "precision": "fp32", "optimizer": optimizer},
        "resources": {"gpusPerWorker": 0},
        "output": {"uri": "out"},
        **spec,
    }
    return parse_job(
        {
            "apiVersion": "forgeline.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "m"},
            "spec": body,
        }
    )


def _measure(model: Any, spec: Any) -> dict[str, int]:
    """One real step of the job's optimizer (built as the trainer builds it) on random tokens; the
    bytes of each kind of tensor."""
    import torch

    from forgeline_trainer.optim import build_optimizer

    params = [p for p in model.parameters()]
    trained = [p for p in params if p.requires_grad]
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    opt = build_optimizer(model, spec.training, spec.optimizer())
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()

    def nbytes(ts: Any) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    states = {
        v.untyped_storage().data_ptr(): v
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.numel() > 1
    }
    return {
        "weights": nbytes(params),
        "gradients": nbytes(p.grad for p in trained if p.grad is not None),
        "optimizer_states": nbytes(states.values()),
        "activations": sum(saved.values()),
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fit-base")
    (d / "config.json").write_text(json.dumps(CONFIG))
    return d


def _model(method: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", lora_dropout=0.0))
    elif method == "prompt-tuning":
        from peft import PromptTuningConfig, get_peft_model

        model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))
    return model


@pytest.mark.parametrize("optimizer", ["adamw", "adamw-8bit", "adafactor"])
@pytest.mark.parametrize(
    "method,spec",
    [
        ("full", {}),
        ("lora", {"lora": {"r": 16, "targetModules": ["all-linear"], "dropout": 0.0}}),
        ("prompt-tuning", {"promptTuning": {"numVirtualTokens": 20}}),
    ],
)
def test_the_estimate_matches_the_tensors_of_a_real_training_step(
    base: Path, method: str, spec: dict[str, Any], optimizer: str
) -> None:
    job = _job(method, base, optimizer, **spec)
    e = fit.estimate(job, None, model_config=CONFIG)
    measured = _measure(_model(method), job.spec)
    estimated = {k: getattr(e, k) for k in measured}
    report = {
        k: f"{measured[k] / 2**20:.2f} MiB measured, {estimated[k] / 2**20:.2f} estimated" for k in measured
    }
    for part in ("weights", "gradients", "optimizer_states"):
        assert measured[part] == pytest.approx(estimated[part], rel=0.02, abs=64 * 1024), (part, report)
    ratio = measured["activations"] / estimated["activations"]
    assert 0.6 <= ratio <= 1.4, ("activations", round(ratio, 2), report)
