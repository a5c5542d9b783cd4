"""Optimizer, learning-rate schedule, batch arithmetic, the DeepSpeed config, and the one engine
set-up the step-loop recipes share (`setup_engine`: DeepSpeed, or Ray Train's DDP)."""

from __future__ import annotations

import copy
import math
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from . import deepspeed_ops
from .runtime import train_device


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


HF_OPTIM = {
    "adamw": "adamw_torch_fused",
    "adamw-8bit": "adamw_bnb_8bit",
    "paged-adamw": "paged_adamw_32bit",
    "paged-adamw-8bit": "paged_adamw_8bit",
    "adafactor": "adafactor",
}
"""spec.training.optimizer → transformers' `optim` name, for the TRL recipes: the Trainer builds the
same optimizers `build_optimizer` builds for the step-loop recipes."""


def build_optimizer(model: Any, opt_spec: Any, name: str):  # noqa: ANN201 - a torch optimizer
    """The job's optimizer (its spec's `optimizer()`) over the model's trained weights, built as
    transformers' Trainer builds it for the same `optim` (HF_OPTIM): torch's fused AdamW (CPUs and
    GPUs both have the kernel); bitsandbytes' 8-bit and paged AdamW; transformers' Adafactor with
    the spec's learning rate and schedule instead of its relative step size."""
    import torch

    groups = param_groups(model, opt_spec.weight_decay)
    lr, betas = opt_spec.learning_rate, (opt_spec.adam_beta1, opt_spec.adam_beta2)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    import bitsandbytes as bnb

    bits = 32 if name == "paged-adamw" else 8
    return bnb.optim.AdamW(groups, lr=lr, betas=betas, optim_bits=bits, is_paged=name.startswith("paged"))


def state_bytes(optimizer: Any) -> int | None:
    """Bytes of the optimizer's state tensors in this process (a storage that parameters share,
    such as bitsandbytes' quantisation map, counted once); None where the state is not visible."""
    import torch

    try:
        states = list(optimizer.state.values())
    except AttributeError:
        return None
    seen: dict[int, int] = {}
    for state in states:
        for value in state.values():
            if torch.is_tensor(value) and value.numel() > 1:
                seen[value.untyped_storage().data_ptr()] = value.numel() * value.element_size()
    return sum(seen.values())


def class_name(optimizer: Any) -> str:
    """The optimizer's class as module.name (accelerate's wrapper looked through)."""
    inner = type(getattr(optimizer, "optimizer", optimizer))
    return f"{inner.__module__}.{inner.__name__}"


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


@dataclass
class TrainEngine:
    """What a hand-written step loop trains with, set up once by `setup_engine`.

    DeepSpeed: `engine` is the DeepSpeed engine, `net` is the engine (forward, backward and step go
    through it), `model` the bare module. Otherwise: `engine` is None and `model` = `net` = the
    model as Ray Train's `prepare_model` left it (moved to the device; DDP-wrapped with >1 worker).
    """

    engine: Any | None
    model: Any
    net: Any
    optimizer: Any
    scheduler: Any
    device: Any
    plan: BatchPlan
    total_steps: int
    bf16: bool
    trainable: list[Any] = field(default_factory=list)
    """The parameters that train (what the gradient norm covers and clipping scales)."""

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast for plain torch (DeepSpeed casts itself)."""
        import torch

        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16 and self.engine is None
        )

    def backward(self, loss: Any) -> None:
        """Backward for one micro batch (DeepSpeed accumulates and steps at the boundary)."""
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            (loss / self.plan.accumulation).backward()

    def optimizer_step(self, grad_clip: float) -> Any:
        """End an optimizer step: clip (0 = no clipping), step, schedule; the global grad norm."""
        import torch

        if self.engine is not None:
            return self.engine.get_global_grad_norm()
        if grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, grad_clip)
        else:
            grad_norm = _grad_norm(self.trainable)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


def setup_engine(
    model: Any,
    opt_spec: Any,
    ds_spec: Any | None,
    plan: BatchPlan,
    total_steps: int,
    bf16: bool,
    on_gpu: bool,
    optimizer: str = "adamw",
) -> TrainEngine:
    """DeepSpeed (when the spec has a `deepspeed` section: AdamW, the spec refuses others) or DDP
    through Ray Train's `prepare_model` with the job's optimizer, and the spec's LR schedule."""
    import torch

    if ds_spec is not None:
        import deepspeed

        ds_cfg = deepspeed_config(ds_spec, opt_spec, plan, bf16, on_gpu)
        for lock in deepspeed_ops.prepare(ds_cfg):
            print(f"forgeline: removed {lock}, a DeepSpeed build lock a killed build left", file=sys.stderr)
        client_opt = None if "optimizer" in ds_cfg else build_optimizer(model, opt_spec, "adamw")
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=client_opt,
            config=ds_cfg,
            model_parameters=param_groups(model, opt_spec.weight_decay) if client_opt is None else None,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(opt_spec, total_steps)),
        )
        return TrainEngine(
            engine, model, engine, optimizer, scheduler, engine.device, plan, total_steps, bf16
        )
    import ray.train.torch

    device = train_device()
    model = ray.train.torch.prepare_model(model, move_to_device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, opt_spec, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opt_spec, total_steps))
    return TrainEngine(None, model, model, optimizer, scheduler, device, plan, total_steps, bf16, trainable)


def _grad_norm(params: list[Any]) -> Any:
    import torch

    norms = [p.grad.detach().norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
