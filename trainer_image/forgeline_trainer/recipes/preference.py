"""Preference tuning: reward models and DPO, with TRL's trainers inside Ray Train.

Launch (what the operator and `forgeline run` do):
    python -m forgeline_trainer --config job.json        # a FineTuneJob with method reward-model|dpo

Reads top to bottom:
    prepare()     driver: check the base model, read prompt/chosen/rejected pairs, cut prompts to
                  preference.maxPromptLength tokens, split off the eval pairs
    train_loop()  each Ray Train worker:
        setup     TRL RewardTrainer (scalar head, Bradley-Terry loss) or DPOTrainer (reference =
                  the starting model; with LoRA the adapter-disabled base), optional LoRA,
                  Ray Train reporting and resume (prepare_trainer, RayTrainReportCallback)
        train     trainer.train(); progress records from the Trainer's logs
        cleanup   preference accuracy and reward margin on the eval pairs before and after
                  training; rank 0 saves the model (or adapter/merged), tokenizer, metrics.json,
                  loss.png
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from forgeline_operator.api.finetune_job import PreferenceSettings
from forgeline_operator.api.jobconfig import FineTuneJobConfig, dump_job_config, load_job_config

from .. import collective, hf_trainer, models, optim, outputs, progress, sft_data, storage
from .. import data as D
from ..runtime import RuntimeInfo, resolve_precision

# -- driver ------------------------------------------------------------------------------------


def prepare(cfg: FineTuneJobConfig, staging: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    spec, work = cfg.spec, cfg.paths.work_dir
    base_dir = models.model_location(cfg.paths.base_model or "", work)
    AutoConfig.from_pretrained(base_dir)
    tokenizer = D.load_tokenizer(base_dir)
    pref = spec.preference or PreferenceSettings()
    records = sft_data.read_examples(spec.dataset.sources, "preference", work)

    def cut(rec: dict[str, Any]) -> dict[str, str]:
        ids = tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"][-pref.max_prompt_length :]
        return {"prompt": tokenizer.decode(ids), "chosen": rec["chosen"], "rejected": rec["rejected"]}

    records = [cut(r) for r in records]
    if spec.evaluation.sources:
        train, held = (
            records,
            [cut(r) for r in sft_data.read_examples(spec.evaluation.sources, "preference", work)],
        )
    else:
        train, held = sft_data.holdout(records, max(spec.evaluation.holdout_fraction, 0.05))
    tok_dir = staging / "tokenizer"
    tokenizer.save_pretrained(str(tok_dir))
    return {
        "train": train,
        "eval": held,
        "base_dir": base_dir,
        "tokenizer_files": {p.name: p.read_bytes() for p in tok_dir.iterdir() if p.is_file()},
        "examples": {"train": len(train), "eval": len(held)},
    }


# -- worker ------------------------------------------------------------------------------------


def train_loop(loop_config: dict[str, Any]) -> None:
    import datasets
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    cfg = load_job_config(loop_config["config"])
    assert isinstance(cfg, FineTuneJobConfig)
    prep = loop_config["prepared"]
    spec, method = cfg.spec, cfg.spec.method
    rt = RuntimeInfo.current()
    torch.manual_seed(spec.training.seed)
    bf16, dtype_name = resolve_precision(spec.training.precision, rt.on_gpu)
    tokenizer = D.tokenizer_from_files(prep["tokenizer_files"])
    train_ds = datasets.Dataset.from_list(prep["train"])
    eval_ds = datasets.Dataset.from_list(prep["eval"]) if prep["eval"] else None

    # ---- setup ----
    plan = optim.batch_plan(spec.training.global_batch_size, spec.training.micro_batch_size, rt.world)
    steps = hf_trainer.total_steps(spec, len(train_ds), plan.global_batch)
    peft_config = collective.lora_config(spec, task="SEQ_CLS" if method == "reward-model" else "CAUSAL_LM")
    work = tempfile.mkdtemp(prefix="forgeline-hf-")
    args = hf_trainer.common_args(spec, work, rt.on_gpu, bf16, steps)
    args.update(gradient_accumulation_steps=plan.accumulation, max_length=spec.dataset.max_sequence_length)
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        pref = spec.preference or PreferenceSettings()
        trainer = DPOTrainer(
            model=prep["base_dir"],
            args=DPOConfig(beta=pref.beta, loss_type=[pref.loss_type], **args),
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    else:
        from transformers import AutoModelForSequenceClassification
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(prep["base_dir"], num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(
            model=model,
            args=RewardConfig(**args),
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    model = trainer.model
    n_total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers, hidden = models.shape(getattr(model, "base_model", model))
    flops = (
        4.0 * models.active_params(model)
        + 2.0 * n_trainable
        + 12.0 * layers * hidden * spec.dataset.max_sequence_length
    )
    factor = 2 if method == "reward-model" else 4  # chosen+rejected; DPO also runs the reference
    peak, peak_how = progress.device_peak_flops()
    reporter = progress.Reporter(
        job=cfg.name,
        namespace=cfg.namespace,
        kind="FineTuneJob",
        total_steps=steps,
        tokens_per_step=plan.global_batch * spec.dataset.max_sequence_length * 2,
        flops_per_token=flops * factor / 2,
        peak_flops_total=peak * rt.world,
        interval=cfg.run.progress_interval_seconds,
        is_chief=rt.rank == 0,
        extra={"trainable_fraction": round(n_trainable / n_total, 6), "method": method},
    )
    trainer.add_callback(hf_trainer.ProgressCallback(reporter, plan.global_batch))
    trainer.add_callback(RayTrainReportCallback())
    trainer = prepare_trainer(trainer)
    resume = hf_trainer.resume_dir()
    before = (
        _preference_metrics(trainer, method, eval_ds, tokenizer)
        if eval_ds is not None and resume is None
        else {}
    )
    reporter.event(
        "training started",
        total_steps=steps,
        method=method,
        parameters=n_total,
        trainable_parameters=n_trainable,
        world_size=rt.world,
        precision=dtype_name,
        resumed_from=resume,
        peak_source=peak_how,
        **{f"initial_{k}": v for k, v in before.items()},
    )

    # ---- train ----
    trainer.train(resume_from_checkpoint=resume)

    # ---- cleanup ----
    after = _preference_metrics(trainer, method, eval_ds, tokenizer) if eval_ds is not None else {}
    if after:
        reporter.evaluation(steps, after)
    if rt.rank == 0:
        last = reporter.last
        losses = [h["loss"] for h in reporter.history]
        summary = {
            "job": cfg.name,
            "kind": "FineTuneJob",
            "method": method,
            "base_model": cfg.paths.base_model,
            "parameters": n_total,
            "trainable_parameters": n_trainable,
            "trainable_fraction": n_trainable / n_total,
            "steps": steps,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "initial_eval": before,
            "final_eval": after,
            "tokens_per_second": last.get("tokens_per_second"),
            "mfu": last.get("mfu"),
            "mfu_peak_source": peak_how,
            "wall_seconds": last.get("elapsed_seconds"),
            "examples": prep["examples"],
            "world_size": rt.world,
            "precision": dtype_name,
            "saved": spec.output.save or ("adapter" if peft_config is not None else "full"),
        }
        _write_output(cfg, trainer.model, prep, summary, reporter)
        progress.emit(
            {
                "type": "done",
                "output": cfg.paths.output,
                "final_loss": summary["final_loss"],
                "step": steps,
                "total_steps": steps,
            }
        )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# -- helpers -----------------------------------------------------------------------------------


def _preference_metrics(trainer: Any, method: str, eval_ds: Any, tokenizer: Any) -> dict[str, float]:
    """Preference accuracy and mean reward margin on the eval pairs, through the trainer's own
    evaluation (same tokenisation as training; every rank takes part, all get the same numbers).
    DPO's margin is beta·(policy − reference) log-ratio difference; a reward model's is
    r(chosen) − r(rejected)."""
    metrics = trainer.evaluate(eval_dataset=eval_ds)
    trainer.model.train()
    if method == "dpo":
        return {
            "preference_accuracy": float(metrics.get("eval_rewards/accuracies", float("nan"))),
            "reward_margin": float(metrics.get("eval_rewards/margins", float("nan"))),
            "eval_loss": float(metrics.get("eval_loss", float("nan"))),
        }
    return {
        "preference_accuracy": float(metrics.get("eval_accuracy", float("nan"))),
        "reward_margin": float(metrics.get("eval_margin", float("nan"))),
        "eval_loss": float(metrics.get("eval_loss", float("nan"))),
    }


def _write_output(
    cfg: FineTuneJobConfig,
    model: Any,
    prep: dict[str, Any],
    summary: dict[str, Any],
    reporter: progress.Reporter,
) -> None:
    target = storage.resolve(cfg.paths.output, cfg.paths.work_dir)
    model = getattr(model, "module", model)
    with tempfile.TemporaryDirectory(prefix="forgeline-out-") as tmp:
        out = Path(tmp)
        if summary["saved"] == "merged" and hasattr(model, "merge_and_unload"):
            model.merge_and_unload().save_pretrained(out, safe_serialization=True)
        else:
            model.save_pretrained(out, safe_serialization=True)
        for name, blob in prep["tokenizer_files"].items():
            (out / name).write_bytes(blob)
        outputs.write_metrics(out, summary)
        outputs.plot_loss(out, reporter.history, reporter.eval_history, f"{cfg.name} ({cfg.spec.method})")
        (out / "job_config.json").write_text(json.dumps(json.loads(dump_job_config(cfg)), indent=2))
        storage.publish_dir(out, target)
