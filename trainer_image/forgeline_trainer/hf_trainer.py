"""Running TRL's trainers (transformers `Trainer` subclasses) inside Ray Train.

Ray Train sets up torch.distributed; `ray.train.huggingface.transformers.prepare_trainer` and
`RayTrainReportCallback` make the Trainer report its checkpoints to Ray Train (kept per
CheckpointConfig, restored on retries and resubmissions). `ProgressCallback` turns the Trainer's
logs into Forgeline progress records.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from . import progress
from .optim import BatchPlan


def common_args(spec: Any, on_gpu: bool, bf16: bool, plan: BatchPlan, total_steps: int) -> dict[str, Any]:
    """TrainingArguments fields every TRL recipe shares, from the spec (the Trainer's own
    output_dir is a scratch directory: checkpoints go to Ray Train, the model to `outputs`)."""
    t = spec.training
    return dict(
        output_dir=tempfile.mkdtemp(prefix="forgeline-hf-"),
        max_steps=total_steps,
        gradient_accumulation_steps=plan.accumulation,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        max_grad_norm=t.grad_clip if t.grad_clip > 0 else 1e9,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type={
            "cosine": "cosine",
            "linear": "linear",
            "constant": "constant_with_warmup",
            "wsd": "warmup_stable_decay",
        }[t.schedule],
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        use_cpu=not on_gpu,
        logging_steps=1,
        save_strategy="steps",
        save_steps=spec.checkpointing.interval_steps,
        save_total_limit=spec.checkpointing.keep,
        report_to="none",
        disable_tqdm=True,
        gradient_checkpointing=getattr(t, "gradient_checkpointing", False),
        ddp_backend="nccl" if on_gpu else "gloo",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def total_steps(spec: Any, n_examples: int, global_batch: int) -> int:
    t = spec.training
    return t.max_steps or max(1, math.ceil(t.epochs * n_examples / global_batch))


def attach(trainer: Any, reporter: progress.Reporter, global_batch: int) -> Any:
    """The trainer, reporting progress records and checkpoints to Ray Train (which also resumes
    it: see resume_dir)."""
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    trainer.add_callback(ProgressCallback(reporter, global_batch))
    trainer.add_callback(RayTrainReportCallback())
    return prepare_trainer(trainer)


def resume_dir() -> str | None:
    """The HF checkpoint inside the newest Ray Train checkpoint of this run, if any."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    local = checkpoint.to_directory()
    path = Path(local) / "checkpoint"
    return str(path) if path.exists() else None


class ProgressCallback(TrainerCallback):
    """Trainer logs → FORGELINE_PROGRESS records (rank 0), with throughput and MFU."""

    def __init__(self, reporter: progress.Reporter, tokens_per_step: int) -> None:
        self.reporter = reporter
        self.tokens_per_step = tokens_per_step
        self._last_step = -1

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        logs = logs or {}
        if "loss" in logs and state.global_step <= state.max_steps and state.global_step != self._last_step:
            self._last_step = state.global_step
            more = {
                k.replace("/", "_"): v
                for k, v in logs.items()
                if k.startswith(("rewards/", "reward", "kl", "logps", "accuracy", "margin", "entropy"))
                and isinstance(v, (int, float))
            }
            self.reporter.step(
                state.global_step,
                float(logs["loss"]),
                float(logs.get("learning_rate", 0.0)),
                grad_norm=logs.get("grad_norm"),
                samples=args.per_device_train_batch_size,
                epoch=round(float(logs.get("epoch", 0.0)), 4),
                **more,
            )
        keep = (
            "eval_loss",
            "eval_rewards/accuracies",
            "eval_rewards/margins",
            "eval_accuracy",
            "eval_margin",
            "eval_kl",
        )
        eval_metrics = {
            k[len("eval_") :]: v
            for k, v in logs.items()
            if k.startswith(keep) and isinstance(v, (int, float))
        }
        if eval_metrics:
            eval_metrics = {
                ("eval_loss" if k == "loss" else k.replace("/", "_")): v for k, v in eval_metrics.items()
            }
            self.reporter.evaluation(state.global_step, eval_metrics)
