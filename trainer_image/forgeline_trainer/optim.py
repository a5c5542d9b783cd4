"""Optimizer, learning-rate schedule, batch arithmetic and the DeepSpeed config."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch splits: world × micro × accumulation = global."""

    world: int
    micro: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.world * self.micro * self.accumulation


def batch_plan(global_batch: int | None, micro: int, world: int) -> BatchPlan:
    """The spec's rules guarantee divisibility; None means one micro batch per worker per step."""
    if global_batch is None:
        return BatchPlan(world, micro, 1)
    accumulation, rest = divmod(global_batch, world * micro)
    if rest or accumulation < 1:
        raise ValueError(
            f"global batch {global_batch} is not a multiple of {world} workers × micro batch {micro}"
        )
    return BatchPlan(world, micro, accumulation)


def lr_lambda(opt_spec: Any, total_steps: int):  # noqa: ANN201 - Callable[[int], float]
    """Multiplier on the peak LR at a step: linear warmup, then the spec's schedule down to
    minLearningRateRatio (wsd: stable, then linear decay over the last 20%)."""
    warmup, floor, kind = opt_spec.warmup_steps, opt_spec.min_learning_rate_ratio, opt_spec.schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        span = max(total_steps - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        if kind == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - (1 - floor) * progress
        decay_from = 0.8  # wsd
        if progress < decay_from:
            return 1.0
        return 1.0 - (1 - floor) * (progress - decay_from) / (1 - decay_from)

    return factor


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norms (the usual AdamW practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: Any, opt_spec: Any):  # noqa: ANN201
    import torch

    return torch.optim.AdamW(
        param_groups(model, opt_spec.weight_decay),
        lr=opt_spec.learning_rate,
        betas=(opt_spec.adam_beta1, opt_spec.adam_beta2),
    )


def deepspeed_config(
    ds_spec: Any, opt_spec: Any, plan: BatchPlan, bf16: bool, on_gpu: bool
) -> dict[str, Any]:
    """The DeepSpeed config the spec implies, with the raw `deepspeed.config` merged over it."""
    zero: dict[str, Any] = {"stage": ds_spec.zero_stage}
    if ds_spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds_spec.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds_spec.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": opt_spec.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # A torch AdamW runs ZeRO fine on CPU without offload (DeepSpeed's FusedAdam needs CUDA).
        "zero_allow_untested_optimizer": True,
    }
    if on_gpu or ds_spec.offload_optimizer:
        # DeepSpeed builds its own optimizer: FusedAdam on GPUs, DeepSpeedCPUAdam when offloading.
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": opt_spec.learning_rate,
                "betas": [opt_spec.adam_beta1, opt_spec.adam_beta2],
                "weight_decay": opt_spec.weight_decay,
            },
        }
    return _deep_merge(cfg, copy.deepcopy(ds_spec.config))


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _deep_merge(base[key], value)
        else:
            base[key] = value
    return base
