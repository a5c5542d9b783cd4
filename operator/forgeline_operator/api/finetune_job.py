"""FineTuneJob: supervised fine-tuning (full, LoRA, QLoRA, prompt tuning) and RLHF (RM, DPO, PPO/GRPO)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ._base import ApiModel, FieldIssue, StorageURI, raise_issues, sub
from .common import (
    Checkpointing,
    DataSource,
    DeepSpeed,
    Evaluation,
    Lifecycle,
    ModelSource,
    Optimization,
    Resources,
    batch_issues,
    precision_issues,
)

Method = Literal["full", "lora", "qlora", "prompt-tuning", "reward-model", "dpo", "ppo", "grpo"]
DatasetFormat = Literal["alpaca", "chat", "preference", "prompt"]

PEFT_METHODS = frozenset({"lora", "qlora", "prompt-tuning"})
PREFERENCE_METHODS = frozenset({"reward-model", "dpo"})
RL_METHODS = frozenset({"ppo", "grpo"})
SFT_METHODS = frozenset({"full", "lora", "qlora", "prompt-tuning"})

# Which dataset formats each method can learn from.
METHOD_FORMATS: dict[str, frozenset[str]] = {
    **{m: frozenset({"alpaca", "chat"}) for m in SFT_METHODS},
    **{m: frozenset({"preference"}) for m in PREFERENCE_METHODS},
    **{m: frozenset({"prompt", "alpaca", "chat"}) for m in RL_METHODS},
}


class LoraSettings(ApiModel):
    """Low-rank adapters (PEFT LoRA). Used by lora and qlora; optional for reward-model, dpo, ppo, grpo."""

    r: int = Field(default=16, ge=1, le=1024)
    """Adapter rank: higher = more capacity and memory. 8–64 is usual."""
    alpha: float = Field(default=32, gt=0)
    """Scaling numerator (update scale = alpha / r); usually 2 × r."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1, max_length=64)
    """Module names to adapt (e.g. q_proj, v_proj), or `all-linear` for every linear layer but the output head."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train alongside the adapters."""


class Quantization(ApiModel):
    """4-bit base weights for QLoRA (bitsandbytes)."""

    bits: Literal[4] = 4
    """Bits per base weight (QLoRA uses 4)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """nf4 (NormalFloat, the QLoRA paper's choice) or fp4."""
    double_quant: bool = True
    """Quantise the quantisation constants too (saves about 0.4 bits per weight)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the matmuls over dequantised weights."""
    allow_cpu: bool = False
    """Allow training with no GPUs (bitsandbytes' CPU path; slow, for tests and laptops)."""


class PromptTuningSettings(ApiModel):
    """Soft prompt tuning (PEFT): only a few virtual token embeddings train."""

    num_virtual_tokens: int = Field(default=20, ge=1, le=1024)
    """Number of trained virtual tokens prepended to every input."""
    init_text: str | None = Field(default=None, max_length=4096)
    """Initialise the virtual tokens from this text's embeddings (unset: random)."""


class PreferenceSettings(ApiModel):
    """DPO and reward-model settings."""

    beta: float = Field(default=0.1, gt=0, le=10)
    """DPO temperature: higher keeps the policy closer to the reference model."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """DPO loss variant."""
    max_prompt_length: int = Field(default=512, ge=8)
    """Prompt tokens kept (from the left) per pair."""


class RlSettings(ApiModel):
    """PPO / GRPO: online generation scored by a reward model."""

    reward_model: ModelSource
    """Reward model (e.g. fromJob a FineTuneJob with method reward-model)."""
    num_generations: int = Field(default=4, ge=2, le=256)
    """Completions sampled per prompt (GRPO's group size)."""
    max_new_tokens: int = Field(default=64, ge=1, le=32768)
    """Tokens generated per completion."""
    temperature: float = Field(default=1.0, gt=0, le=10)
    """Sampling temperature for generation."""
    kl_coef: float = Field(default=0.05, ge=0, le=10)
    """Weight of the KL penalty to the reference policy."""


class FineTuneDataset(ApiModel):
    """Fine-tuning records and how to read them."""

    sources: list[DataSource] = Field(min_length=1, max_length=256)
    """One or more inputs (jsonl, parquet or saved-dataset records)."""
    format: DatasetFormat
    """alpaca: instruction/input/output; chat: messages [{role, content}]; preference: prompt/chosen/rejected; prompt: prompt only (ppo/grpo)."""
    max_sequence_length: int = Field(default=1024, ge=8, le=1_048_576)
    """Longest tokenised example; longer ones are truncated from the end of the prompt side."""
    loss_on_prompt: bool = False
    """Also learn the prompt tokens (default: loss only on response tokens)."""
    chat_template: str | None = Field(default=None, max_length=65536)
    """Jinja chat template to use when the tokenizer has none."""


class FineTuneOptimization(Optimization):
    """Optimizer and schedule. Say how long with exactly one of maxSteps or epochs."""

    epochs: float | None = Field(default=None, gt=0, le=1000)
    """Passes over the dataset (may be fractional)."""
    learning_rate: float = Field(default=2e-4, gt=0, lt=1)
    """Peak learning rate (2e-4 suits LoRA; use about 1e-5 for full fine-tuning and 5e-7 for DPO)."""
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    """AdamW beta2."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more compute)."""


class FineTuneOutput(ApiModel):
    """Where the fine-tuned model goes, and in what form."""

    uri: StorageURI
    """Directory for the adapter or model, tokenizer, metrics.json and loss curve."""
    save: Literal["adapter", "merged"] | None = None
    """adapter: the PEFT adapter only (small, needs the base model); merged: adapter folded into full weights. Unset: adapter for PEFT methods, full weights otherwise."""


class FineTuneJobSpec(Lifecycle):
    """Desired state of a FineTuneJob: post-training a model on a Ray cluster."""

    base_model: ModelSource
    """The model to fine-tune: path, hubId, or fromJob (another job's output)."""
    method: Method
    """full, lora, qlora, prompt-tuning, reward-model, dpo, ppo or grpo (ppo is refused with a pointer to grpo in this release)."""
    lora: LoraSettings | None = None
    """LoRA settings (defaults apply for lora and qlora when unset)."""
    quantization: Quantization | None = None
    """4-bit quantisation of the base model; required for qlora."""
    prompt_tuning: PromptTuningSettings | None = None
    """Prompt-tuning settings (defaults apply for prompt-tuning when unset)."""
    preference: PreferenceSettings | None = None
    """DPO / reward-model settings (defaults apply when unset)."""
    rl: RlSettings | None = None
    """PPO / GRPO settings; required for ppo and grpo."""
    dataset: FineTuneDataset
    """Training records."""
    evaluation: Evaluation = sub(Evaluation)
    """Held-out evaluation."""
    training: FineTuneOptimization = sub(FineTuneOptimization)
    """Optimizer, schedule, batch sizes and precision."""
    deepspeed: DeepSpeed | None = None
    """DeepSpeed ZeRO settings; absent: plain distributed data parallel."""
    resources: Resources = sub(Resources)
    """Workers, GPUs and placement."""
    checkpointing: Checkpointing = sub(Checkpointing)
    """Checkpoint interval, retention and resume."""
    output: FineTuneOutput
    """Where the fine-tuned model goes."""

    @model_validator(mode="after")
    def _check_rules(self) -> FineTuneJobSpec:
        raise_issues(self.issues())
        return self

    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora") or self.lora is not None

    def issues(self) -> list[FieldIssue]:
        out = self.base_model.issues(("baseModel",))
        out += self._adapter_issues() + self._post_training_issues() + self._data_and_output_issues()
        out += self._training_issues()
        out += self.resources.issues(("resources",))
        out += precision_issues(self.training.precision, self.resources)
        out += self.checkpointing.issues(("checkpointing",))
        return out

    def _adapter_issues(self) -> list[FieldIssue]:
        """LoRA, QLoRA's quantisation and prompt-tuning settings only where the method uses them."""
        out: list[FieldIssue] = []
        m = self.method
        if self.lora is not None and m in ("full", "prompt-tuning"):
            out.append(
                FieldIssue(
                    ("lora",),
                    f"LoRA settings do not apply to method {m}",
                    "remove spec.lora, or use method: lora",
                )
            )
        if m == "qlora":
            if self.quantization is None:
                out.append(
                    FieldIssue(
                        ("quantization",),
                        "method qlora needs 4-bit quantisation settings",
                        "add `quantization: {bits: 4, quantType: nf4}` (or use method: lora)",
                    )
                )
            elif self.resources.gpus_per_worker == 0 and not self.quantization.allow_cpu:
                out.append(
                    FieldIssue(
                        ("resources", "gpusPerWorker"),
                        "method qlora needs GPUs",
                        "set resources.gpusPerWorker >= 1 (or quantization.allowCpu: true "
                        "for bitsandbytes' slow CPU path)",
                    )
                )
        elif self.quantization is not None and not self.uses_lora():
            out.append(
                FieldIssue(
                    ("quantization",),
                    f"4-bit base weights cannot be trained directly (method {m})",
                    "use method: qlora, or remove spec.quantization",
                )
            )
        if self.prompt_tuning is not None and m != "prompt-tuning":
            out.append(
                FieldIssue(
                    ("promptTuning",),
                    f"prompt tuning settings do not apply to method {m}",
                    "remove spec.promptTuning, or use method: prompt-tuning",
                )
            )
        return out

    def _post_training_issues(self) -> list[FieldIssue]:
        """Preference and RL settings only for their methods; RL needs a reward model; no ppo yet."""
        out: list[FieldIssue] = []
        m = self.method
        if self.preference is not None and m not in PREFERENCE_METHODS:
            out.append(
                FieldIssue(
                    ("preference",),
                    f"preference settings do not apply to method {m}",
                    "remove spec.preference, or use method: dpo or reward-model",
                )
            )
        if m == "ppo":  # refused here, not after a GPU cluster was provisioned for it
            out.append(
                FieldIssue(
                    ("method",),
                    "ppo is not available in this release (TRL's PPOTrainer is "
                    "experimental and the trainer does not drive it yet)",
                    "use method: grpo with the same rl settings (group-relative advantages, no value model)",
                )
            )
        if m in RL_METHODS and self.rl is None:
            out.append(
                FieldIssue(
                    ("rl",),
                    f"method {m} needs a reward model",
                    "add `rl: {rewardModel: {fromJob: {kind: FineTuneJob, name: my-rm}}}`",
                )
            )
        if self.rl is not None:
            if m not in RL_METHODS:
                out.append(
                    FieldIssue(
                        ("rl",),
                        f"rl settings do not apply to method {m}",
                        "remove spec.rl, or use method: ppo or grpo",
                    )
                )
            out += self.rl.reward_model.issues(("rl", "rewardModel"))
        return out

    def _data_and_output_issues(self) -> list[FieldIssue]:
        """A dataset format the method learns from; an output it can save."""
        out: list[FieldIssue] = []
        m = self.method
        allowed = METHOD_FORMATS[m]
        if self.dataset.format not in allowed:
            out.append(
                FieldIssue(
                    ("dataset", "format"),
                    f"method {m} cannot learn from {self.dataset.format} records",
                    f"use dataset.format {' or '.join(sorted(allowed))}",
                )
            )
        save = self.output.save
        if save is not None and not self.uses_lora() and m != "prompt-tuning":
            out.append(
                FieldIssue(
                    ("output", "save"),
                    f"method {m} trains full weights and has no adapter",
                    "remove output.save (full weights are saved)",
                )
            )
        if save == "merged" and m == "prompt-tuning":
            out.append(
                FieldIssue(
                    ("output", "save"),
                    "a prompt-tuning adapter cannot be merged into weights",
                    "use output.save: adapter",
                )
            )
        return out

    def _training_issues(self) -> list[FieldIssue]:
        """Steps or epochs, a divisible batch, and DeepSpeed settings that fit the method."""
        out: list[FieldIssue] = []
        m, t = self.method, self.training
        if (t.max_steps is None) == (t.epochs is None):
            out.append(
                FieldIssue(
                    ("training",),
                    "set exactly one of training.maxSteps or training.epochs",
                    "e.g. `epochs: 3` or `maxSteps: 500`",
                )
            )
        out += batch_issues(t.global_batch_size, t.micro_batch_size, self.resources)
        if self.deepspeed is not None:
            out += self.deepspeed.issues(("deepspeed",))
            if m == "qlora" and self.deepspeed.zero_stage == 3:
                out.append(
                    FieldIssue(
                        ("deepspeed", "zeroStage"),
                        "ZeRO-3 cannot shard 4-bit bitsandbytes weights",
                        "use deepspeed.zeroStage: 2 (or 0) with qlora",
                    )
                )
        return out
