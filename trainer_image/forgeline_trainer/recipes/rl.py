"""Online RL from a reward model: GRPO with TRL's GRPOTrainer inside Ray Train.

Launch (what the operator and `forgeline run` do):
    python -m forgeline_trainer --config job.json        # a FineTuneJob with method grpo

Reads top to bottom:
    prepare()     driver: check the policy and reward model load, read the prompts (prompt,
                  alpaca or chat records → prompt text), split off eval prompts
    train_loop()  each Ray Train worker, in named phases:
        _setup_data     the prompts as a dataset, the tokenizer (left padding, for generation)
        _setup_reward   the reward model and its tokenizer
        _setup_trainer  TRL GRPOTrainer — numGenerations completions per prompt, scored by the
                        reward model, group-relative advantages, KL to the reference (klCoef);
                        optional LoRA (adapters.py)
        _restore        Ray Train reporting, graceful preemption and resume from the newest
                        complete checkpoint (hf_trainer.attach, hf_trainer.restore); mean reward
                        before
        train           trainer.train(); progress records carry the mean reward; on SIGTERM a
                        checkpoint at the current step, then Preempted
        _finish         mean reward of greedy answers to the eval prompts after training; rank 0
                        publishes the policy (or adapter), tokenizer, metrics.json, loss.png
(method ppo is refused by the API's validation: TRL's PPO is experimental and not wired in.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgeline_operator.api.jobconfig import FineTuneJobConfig

from .. import adapters, hf_trainer, models, optim, outputs, progress, sft_data
from .. import data as D
from ..errors import ConfigError
from ..runtime import Worker

Job = Worker[FineTuneJobConfig]

# -- driver ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLData:
    """What `prepare` hands every worker."""

    train: list[dict[str, str]]
    """{"prompt": text} records."""
    eval: list[dict[str, str]]
    """Up to 32 held-out prompts: the mean reward before and after is measured on them."""
    base_dir: str
    """The policy to start from, as a local directory (or hub id)."""
    reward_dir: str
    """The reward model (a *ForSequenceClassification), as a local directory (or hub id)."""
    tokenizer_files: dict[str, bytes]
    examples: dict[str, int]

    def report(self) -> dict[str, Any]:
        return {"examples": self.examples}


def prepare(cfg: FineTuneJobConfig, staging: Path) -> RLData:
    from transformers import AutoConfig

    spec, work = cfg.spec, cfg.paths.work_dir
    if spec.method == "ppo":  # the API refuses it at validation; a hand-written job config stops here
        raise ConfigError(
            "spec.method: ppo runs through TRL's experimental PPOTrainer, which this "
            "trainer version does not drive yet; use method: grpo"
        )
    base_dir = models.model_location(cfg.paths.base_model or "", work)
    reward_dir = models.model_location(cfg.paths.reward_model or "", work)
    AutoConfig.from_pretrained(base_dir)
    rm_config = AutoConfig.from_pretrained(reward_dir)
    if not any(a.endswith("ForSequenceClassification") for a in (rm_config.architectures or [])):
        raise ConfigError(
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
    return RLData(
        train=train,
        eval=held[:32],
        base_dir=base_dir,
        reward_dir=reward_dir,
        tokenizer_files=D.tokenizer_files(tok_dir),
        examples={"train": len(train), "eval": len(held)},
    )


# -- worker ------------------------------------------------------------------------------------


def train_loop(loop_config: dict[str, Any]) -> None:
    job = Worker.start(loop_config, FineTuneJobConfig)
    with hf_trainer.scratch_dir() as scratch:
        _train(job, loop_config["prepared"], scratch)


def _train(job: Job, prep: RLData, scratch: Path) -> None:
    data = _setup_data(prep)
    reward = _setup_reward(prep)
    trainer, plan, steps = _setup_trainer(job, prep, data, reward, scratch)
    stats = models.finetune_stats(trainer.model, job.cfg.spec.dataset.max_sequence_length)
    reporter = progress.Reporter.for_run(
        job.cfg,
        job.rt,
        total_steps=steps,
        tokens_per_step=plan.global_batch * (job.cfg.spec.rl.max_new_tokens + 16),
        flops_per_token=stats.flops_per_token,
        extra={"trainable_fraction": round(stats.trainable_fraction, 6), "method": job.cfg.spec.method},
    )
    trainer, resume, before = _restore(job, trainer, data, reward, reporter, plan, stats, scratch)
    trainer.train(resume_from_checkpoint=resume.path)
    _finish(job, prep, data, reward, trainer, reporter, stats, before)


@dataclass(frozen=True)
class _Data:
    tokenizer: Any
    """The policy's tokenizer, padding on the left (generation)."""
    train: Any
    """datasets.Dataset of the training prompts."""
    eval: list[dict[str, str]]


@dataclass(frozen=True)
class _Reward:
    model: Any
    tokenizer: Any

    def mean(self, policy: Any, data: _Data, max_new_tokens: int) -> float:
        return _mean_reward(policy, self.model, data.tokenizer, self.tokenizer, data.eval, max_new_tokens)


def _setup_data(prep: RLData) -> _Data:
    import datasets

    tokenizer = D.tokenizer_from_files(prep.tokenizer_files)
    tokenizer.padding_side = "left"  # generation
    return _Data(tokenizer, datasets.Dataset.from_list(prep.train), prep.eval)


def _setup_reward(prep: RLData) -> _Reward:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(prep.reward_dir, num_labels=1)
    tokenizer = D.load_tokenizer(prep.reward_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    return _Reward(model, tokenizer)


def _setup_trainer(
    job: Job, prep: RLData, data: _Data, reward: _Reward, scratch: Path
) -> tuple[Any, optim.BatchPlan, int]:
    """(TRL GRPOTrainer with policy and optimizer, batch plan, total steps)."""
    from trl import GRPOConfig, GRPOTrainer

    spec, rl = job.cfg.spec, job.cfg.spec.rl
    plan = optim.batch_plan(spec.training.global_batch_size, spec.training.micro_batch_size, job.rt.world)
    steps = hf_trainer.total_steps(spec, len(data.train), plan.global_batch)
    grpo_args = GRPOConfig(
        num_generations=rl.num_generations,
        max_completion_length=rl.max_new_tokens,
        temperature=rl.temperature,
        beta=rl.kl_coef,
        **hf_trainer.common_args(spec, job.rt.on_gpu, job.bf16, plan, steps, scratch),
    )
    trainer = GRPOTrainer(
        model=prep.base_dir,
        reward_funcs=reward.model,
        args=grpo_args,
        train_dataset=data.train,
        processing_class=data.tokenizer,
        reward_processing_classes=reward.tokenizer,
        peft_config=adapters.lora_config(spec.lora, task="CAUSAL_LM"),
    )
    return trainer, plan, steps


def _restore(
    job: Job,
    trainer: Any,
    data: _Data,
    reward: _Reward,
    reporter: progress.Reporter,
    plan: optim.BatchPlan,
    stats: models.ModelStats,
    scratch: Path,
) -> tuple[Any, hf_trainer.Resume, float]:
    """Hook the trainer to Ray Train; (trainer, checkpoint to resume from, mean reward before);
    announces the start."""
    trainer = hf_trainer.attach(trainer, job, reporter, plan.global_batch)
    resume = hf_trainer.restore(trainer, job, reporter, scratch)
    with reporter.timed("evaluation"):
        before = reward.mean(trainer.model, data, job.cfg.spec.rl.max_new_tokens)
    if resume.path is None:  # the baseline: the mean reward before training
        reporter.evaluation(0, {"mean_reward": before})
    reporter.event(
        "training started",
        total_steps=reporter.total_steps,
        method=job.cfg.spec.method,
        parameters=stats.parameters,
        trainable_parameters=stats.trainable,
        world_size=job.rt.world,
        precision=job.precision,
        optimizer=job.cfg.spec.optimizer(),
        start_step=resume.step,
        resumed_from=resume.checkpoint,
        initial_mean_reward=before,
    )
    return trainer, resume, before


def _finish(
    job: Job,
    prep: RLData,
    data: _Data,
    reward: _Reward,
    trainer: Any,
    reporter: progress.Reporter,
    stats: models.ModelStats,
    before: float,
) -> None:
    """Mean reward after training; rank 0 publishes the policy."""
    import torch

    cfg, steps = job.cfg, reporter.total_steps
    with reporter.timed("evaluation"):
        after = reward.mean(trainer.model, data, cfg.spec.rl.max_new_tokens)
    reporter.evaluation(steps, {"mean_reward": after, "initial_mean_reward": before})
    if job.rt.rank == 0:
        merged = cfg.spec.output.save == "merged"
        saved = "adapter" if cfg.spec.lora is not None and not merged else "full"
        summary = outputs.summary(
            job,
            reporter,
            stats,
            {"mean_reward": after},
            **outputs.finetune_fields(cfg, stats, prep.examples, saved),
            reward_model=cfg.paths.reward_model,
            optimizer_state_bytes=optim.state_bytes(trainer.optimizer),
            optimizer_class=optim.class_name(trainer.optimizer),
        )
        model = getattr(trainer.model, "module", trainer.model)

        def save_model(out: Path) -> None:
            to_save = model.merge_and_unload() if merged and hasattr(model, "merge_and_unload") else model
            to_save.save_pretrained(out, safe_serialization=True)

        title = f"{cfg.name} ({cfg.spec.method})"
        outputs.publish(cfg, save_model, prep.tokenizer_files, summary, reporter, title)
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
