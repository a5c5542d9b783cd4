"""Online RL from a reward model: GRPO and PPO with TRL's trainers inside Ray Train.

Launch (what the operator and `forgeline run` do):
    python -m forgeline_trainer --config job.json        # a FineTuneJob with method grpo|ppo

Reads top to bottom:
    prepare()     driver: check the policy and reward model load, read the prompts (prompt,
                  alpaca or chat records → prompt text), split off eval prompts
    train_loop()  each Ray Train worker:
        setup     GRPO: TRL GRPOTrainer — numGenerations completions per prompt, scored by the
                  reward model, group-relative advantages, KL to the reference (klCoef);
                  PPO: TRL's experimental PPOTrainer with a value head from the reward model;
                  optional LoRA; Ray Train reporting and resume
        train     trainer.train(); progress records carry the mean reward
        cleanup   mean reward of greedy answers to the eval prompts before and after; rank 0
                  saves the policy (or adapter), tokenizer, metrics.json, loss.png
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from forgeline_operator.api.jobconfig import FineTuneJobConfig, dump_job_config, load_job_config

from .. import collective, hf_trainer, models, optim, outputs, progress, sft_data, storage
from .. import data as D
from ..runtime import RuntimeInfo, resolve_precision

# -- driver ------------------------------------------------------------------------------------


def prepare(cfg: FineTuneJobConfig, staging: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    spec, work = cfg.spec, cfg.paths.work_dir
    if spec.method == "ppo":
        raise ValueError(
            "spec.method: ppo runs through TRL's experimental PPOTrainer, which this "
            "trainer version does not drive yet; use method: grpo"
        )
    base_dir = models.model_location(cfg.paths.base_model or "", work)
    reward_dir = models.model_location(cfg.paths.reward_model or "", work)
    AutoConfig.from_pretrained(base_dir)
    rm_config = AutoConfig.from_pretrained(reward_dir)
    if not any(a.endswith("ForSequenceClassification") for a in (rm_config.architectures or [])):
        raise ValueError(
            f"spec.rl.rewardModel: {cfg.paths.reward_model} is not a reward model "
            f"(architectures {rm_config.architectures}); train one with method: reward-model"
        )
    tokenizer = D.load_tokenizer(base_dir)
    fmt = spec.dataset.format
    records = sft_data.read_examples(spec.dataset.sources, fmt, work)
    prompts = [{"prompt": sft_data.prompt_of(r, fmt, tokenizer)} for r in records]
    train, held = sft_data.holdout(prompts, max(spec.evaluation.holdout_fraction, 0.05))
    tok_dir = staging / "tokenizer"
    tokenizer.save_pretrained(str(tok_dir))
    return {
        "train": train,
        "eval": held[:32],
        "base_dir": base_dir,
        "reward_dir": reward_dir,
        "tokenizer_files": {p.name: p.read_bytes() for p in tok_dir.iterdir() if p.is_file()},
        "examples": {"train": len(train), "eval": len(held)},
    }


# -- worker ------------------------------------------------------------------------------------


def train_loop(loop_config: dict[str, Any]) -> None:
    import datasets
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import AutoModelForSequenceClassification

    cfg = load_job_config(loop_config["config"])
    assert isinstance(cfg, FineTuneJobConfig)
    prep = loop_config["prepared"]
    spec, rl = cfg.spec, cfg.spec.rl
    rt = RuntimeInfo.current()
    torch.manual_seed(spec.training.seed)
    bf16, dtype_name = resolve_precision(spec.training.precision, rt.on_gpu)
    tokenizer = D.tokenizer_from_files(prep["tokenizer_files"])
    tokenizer.padding_side = "left"  # generation
    train_ds = datasets.Dataset.from_list(prep["train"])
    reward_model = AutoModelForSequenceClassification.from_pretrained(prep["reward_dir"], num_labels=1)
    reward_tok = D.load_tokenizer(prep["reward_dir"])
    reward_model.config.pad_token_id = reward_tok.pad_token_id

    # ---- setup ----
    plan = optim.batch_plan(spec.training.global_batch_size, spec.training.micro_batch_size, rt.world)
    steps = hf_trainer.total_steps(spec, len(train_ds), plan.global_batch)
    work = tempfile.mkdtemp(prefix="forgeline-hf-")
    args = hf_trainer.common_args(spec, work, rt.on_gpu, bf16, steps)
    from trl import GRPOConfig, GRPOTrainer

    grpo_args = GRPOConfig(
        gradient_accumulation_steps=plan.accumulation,
        num_generations=rl.num_generations,
        max_completion_length=rl.max_new_tokens,
        temperature=rl.temperature,
        beta=rl.kl_coef,
        **args,
    )
    trainer = GRPOTrainer(
        model=prep["base_dir"],
        reward_funcs=reward_model,
        args=grpo_args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        reward_processing_classes=reward_tok,
        peft_config=collective.lora_config(spec, task="CAUSAL_LM"),
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
    peak, peak_how = progress.device_peak_flops()
    reporter = progress.Reporter(
        job=cfg.name,
        namespace=cfg.namespace,
        kind="FineTuneJob",
        total_steps=steps,
        tokens_per_step=plan.global_batch * (rl.max_new_tokens + 16),
        flops_per_token=flops,
        peak_flops_total=peak * rt.world,
        interval=cfg.run.progress_interval_seconds,
        is_chief=rt.rank == 0,
        extra={"trainable_fraction": round(n_trainable / n_total, 6), "method": spec.method},
    )
    trainer.add_callback(hf_trainer.ProgressCallback(reporter, plan.global_batch))
    trainer.add_callback(RayTrainReportCallback())
    trainer = prepare_trainer(trainer)
    resume = hf_trainer.resume_dir()
    before = _mean_reward(trainer.model, reward_model, tokenizer, reward_tok, prep["eval"], rl.max_new_tokens)
    reporter.event(
        "training started",
        total_steps=steps,
        method=spec.method,
        parameters=n_total,
        trainable_parameters=n_trainable,
        world_size=rt.world,
        precision=dtype_name,
        resumed_from=resume,
        initial_mean_reward=before,
    )

    # ---- train ----
    trainer.train(resume_from_checkpoint=resume)

    # ---- cleanup ----
    after = _mean_reward(trainer.model, reward_model, tokenizer, reward_tok, prep["eval"], rl.max_new_tokens)
    reporter.evaluation(steps, {"mean_reward": after, "initial_mean_reward": before})
    if rt.rank == 0:
        last = reporter.last
        losses = [h["loss"] for h in reporter.history]
        summary = {
            "job": cfg.name,
            "kind": "FineTuneJob",
            "method": spec.method,
            "base_model": cfg.paths.base_model,
            "reward_model": cfg.paths.reward_model,
            "parameters": n_total,
            "trainable_parameters": n_trainable,
            "trainable_fraction": n_trainable / n_total,
            "steps": steps,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "initial_eval": {"mean_reward": before},
            "final_eval": {"mean_reward": after},
            "tokens_per_second": last.get("tokens_per_second"),
            "mfu": last.get("mfu"),
            "mfu_peak_source": peak_how,
            "wall_seconds": last.get("elapsed_seconds"),
            "examples": prep["examples"],
            "world_size": rt.world,
            "precision": dtype_name,
            "saved": "adapter" if spec.lora is not None and spec.output.save != "merged" else "full",
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


def _mean_reward(
    policy: Any,
    reward_model: Any,
    tokenizer: Any,
    reward_tok: Any,
    prompts: list[dict[str, str]],
    max_new_tokens: int,
) -> float:
    """Mean reward-model score of greedy completions to the eval prompts."""
    import torch

    policy = getattr(policy, "module", policy)
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    scores = []
    with torch.no_grad():
        for row in prompts:
            enc = tokenizer(row["prompt"], return_tensors="pt").to(device)
            out = policy.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            text = tokenizer.decode(out[0], skip_special_tokens=True)
            scored = reward_tok(text, return_tensors="pt").to(device)
            scores.append(float(reward_model.to(device)(**scored).logits[0, 0]))
    if was_training:
        policy.train()
    return sum(scores) / max(len(scores), 1)


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
        if cfg.spec.output.save == "merged" and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.save_pretrained(out, safe_serialization=True)
        for name, blob in prep["tokenizer_files"].items():
            (out / name).write_bytes(blob)
        outputs.write_metrics(out, summary)
        outputs.plot_loss(out, reporter.history, reporter.eval_history, f"{cfg.name} ({cfg.spec.method})")
        (out / "job_config.json").write_text(json.dumps(json.loads(dump_job_config(cfg)), indent=2))
        storage.publish_dir(out, target)
