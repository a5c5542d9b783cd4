"""FineTuneJob: supervised fine-tuning (full, LoRA, QLoRA, prompt tuning), RLHF (RM, DPO, PPO/GRPO)
and merging trained LoRA adapters into one (merge)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from ._base import ApiModel, FieldIssue, K8sName, StorageURI, raise_issues, sub
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
    optimizer_issues,
    precision_issues,
)

Method = Literal["full", "lora", "qlora", "prompt-tuning", "reward-model", "dpo", "ppo", "grpo", "merge"]
DatasetFormat = Literal["alpaca", "chat", "preference", "prompt"]

PEFT_METHODS = frozenset({"lora", "qlora", "prompt-tuning"})
PREFERENCE_METHODS = frozenset({"reward-model", "dpo"})
RL_METHODS = frozenset({"ppo", "grpo"})
SFT_METHODS = frozenset({"full", "lora", "qlora", "prompt-tuning"})
MERGE_METHOD = "merge"

# Which dataset formats each method can learn from.
METHOD_FORMATS: dict[str, frozenset[str]] = {
    **{m: frozenset({"alpaca", "chat"}) for m in SFT_METHODS},
    **{m: frozenset({"preference"}) for m in PREFERENCE_METHODS},
    **{m: frozenset({"prompt", "alpaca", "chat"}) for m in RL_METHODS},
    MERGE_METHOD: frozenset({"alpaca", "chat"}),  # held-out evaluation data only
}

# PEFT's `LoraModel.add_weighted_adapter` combination types, and which of its arguments each reads.
Combination = Literal[
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]
DENSITY_COMBINATIONS = frozenset(get_args(Combination)) - {"linear", "cat", "svd"}
"""Every combination but linear, cat and svd prunes each adapter to `density` first."""
SIGN_COMBINATIONS = frozenset({"ties", "ties_svd", "dare_ties", "dare_ties_svd"})
SAME_RANK_COMBINATIONS = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
"""Combinations that add the adapters' A and B matrices factor by factor: PEFT needs equal ranks."""


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
    adapter_dtype: Literal["compute", "float32"] = "compute"
    """compute: the LoRA adapters in computeDtype, as the QLoRA paper's training script casts them (half the memory of float32 adapters and their gradients; float16 compute keeps float32 adapters, which have no loss scaling otherwise); float32: PEFT's default."""
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


class MergeInput(ModelSource):
    """One trained LoRA adapter to mix (set exactly one of path, hubId, fromJob) and its weight."""

    weight: float = Field(default=1.0, ge=-10, le=10)
    """Its weight in the mix: 1.0 adds the adapter's full update, 0.5 half of it; negative subtracts it (task negation)."""
    name: K8sName | None = None
    """Its name in metrics.json's evaluation table (`adapter:<name>`); unset: the fromJob name, else `adapter-<index>`."""

    def label(self, index: int) -> str:
        return self.name or (self.from_job.name if self.from_job is not None else f"adapter-{index}")


class MergeSettings(ApiModel):
    """Mixing trained LoRA adapters on the same base into one adapter (PEFT's `add_weighted_adapter`)."""

    adapters: list[MergeInput] = Field(min_length=2, max_length=16)
    """The adapters to mix (2–16), all trained on spec.baseModel with the same target modules."""
    combination: Combination = "cat"
    """How updates combine. cat: exact weighted sum of the updates (rank = sum of ranks); linear: weighted sum of the A and B factors (equal ranks; exact only where the adapters share A); svd: exact sum truncated to svdRank by SVD; ties / dare_linear / dare_ties / magnitude_prune (and their _svd forms): prune each adapter to `density` before summing, TIES also resolves sign conflicts."""
    density: float | None = Field(default=None, gt=0, le=1)
    """Fraction of each adapter's values kept (TIES, DARE, magnitude_prune); unset: 0.5 where the combination uses it."""
    majority_sign_method: Literal["total", "frequency"] | None = None
    """TIES sign election: total (sum of values; the default where the combination elects signs) or frequency (count of signs)."""
    svd_rank: int | None = Field(default=None, ge=1, le=4096)
    """Rank of the merged adapter for the _svd combinations; unset: the largest input rank."""
    merge_into_base: bool = False
    """Also write the full model with the merged adapter folded into the base weights (in `<output uri>/merged`)."""

    def labels(self) -> list[str]:
        return [a.label(i) for i, a in enumerate(self.adapters)]

    def issues(self, prefix: tuple[str, ...]) -> list[FieldIssue]:
        out: list[FieldIssue] = []
        for i, adapter in enumerate(self.adapters):
            out += adapter.issues(prefix + ("adapters", i))
            if adapter.weight == 0:
                out.append(
                    FieldIssue(
                        prefix + ("adapters", i, "weight"),
                        "a weight of 0 leaves the adapter out of the mix",
                        "give it a non-zero weight, or remove it from spec.merge.adapters",
                    )
                )
        labels = self.labels()
        for i, label in enumerate(labels):
            if label in labels[:i]:
                out.append(
                    FieldIssue(
                        prefix + ("adapters", i, "name"),
                        f"two adapters are named {label!r}",
                        "give each adapter its own name (or fromJob)",
                    )
                )
        if self.density is not None and self.combination not in DENSITY_COMBINATIONS:
            out.append(
                FieldIssue(
                    prefix + ("density",),
                    f"combination {self.combination} does not prune, so density has no effect",
                    "remove density, or use combination ties, dare_linear or dare_ties",
                )
            )
        if self.svd_rank is not None and not self.combination.endswith("svd"):
            out.append(
                FieldIssue(
                    prefix + ("svdRank",),
                    f"combination {self.combination} does not truncate by SVD",
                    "remove svdRank, or use combination svd (or ties_svd, dare_ties_svd, ...)",
                )
            )
        if self.majority_sign_method is not None and self.combination not in SIGN_COMBINATIONS:
            out.append(
                FieldIssue(
                    prefix + ("majoritySignMethod",),
                    f"combination {self.combination} has no sign election",
                    "remove majoritySignMethod, or use combination ties or dare_ties",
                )
            )
        return out


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
    """The model to fine-tune (for merge: the base the adapters were trained on): path, hubId, or fromJob (another job's output)."""
    method: Method
    """full, lora, qlora, prompt-tuning, reward-model, dpo, ppo, grpo (ppo is refused with a pointer to grpo in this release), or merge (mix trained LoRA adapters, spec.merge; trains nothing)."""
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
    merge: MergeSettings | None = None
    """The adapters to mix and how; required for method merge (and only for it)."""
    dataset: FineTuneDataset | None = None
    """Training records; required except for merge, where they are optional held-out data (each source one task) on which the base, each adapter and the mix are evaluated."""
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

    def recipe_family(self) -> str:
        """sft, preference, rl or merge: which recipe trains this method (and what its evals report)."""
        if self.method in PREFERENCE_METHODS:
            return "preference"
        if self.method in RL_METHODS:
            return "rl"
        return "merge" if self.method == MERGE_METHOD else "sft"

    def optimizer(self) -> str:
        """The optimizer the job trains with: spec.training.optimizer, or the default: QLoRA's paged
        32-bit AdamW on GPUs without DeepSpeed (the paper's recipe), AdamW otherwise."""
        if self.training.optimizer is not None:
            return self.training.optimizer
        published = self.method == "qlora" and self.resources.gpus_per_worker > 0 and self.deepspeed is None
        return "paged-adamw" if published else "adamw"

    def adapter_dtype(self) -> str | None:
        """The dtype QLoRA's adapters are trained in (None: not qlora, they follow precision)."""
        q = self.quantization
        if self.method != "qlora" or q is None:
            return None
        if q.adapter_dtype == "compute" and q.compute_dtype != "float16":
            return q.compute_dtype
        return "float32"

    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora") or self.lora is not None

    def issues(self) -> list[FieldIssue]:
        out = self.base_model.issues(("baseModel",))
        out += self._adapter_issues() + self._post_training_issues() + self._data_and_output_issues()
        out += self._merge_issues()
        if self.method != MERGE_METHOD:
            out += self._training_issues()
        out += self.resources.issues(("resources",))
        out += precision_issues(self.training.precision, self.resources)
        if self.method == MERGE_METHOD and self.training.optimizer is not None:
            out.append(
                FieldIssue(
                    ("training", "optimizer"),
                    "method merge trains nothing, so it has no optimizer",
                    "remove spec.training.optimizer",
                )
            )
        else:
            out += optimizer_issues(self.training.optimizer, self.resources, self.deepspeed)
        out += self.checkpointing.issues(("checkpointing",))
        if self.promotion is not None:
            evaluates = self.dataset is not None if self.method == MERGE_METHOD else self.evaluation.enabled()
            out += self.promotion.issues(("promotion",), self.recipe_family(), evaluates)
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
        elif self.quantization is not None and not self.uses_lora() and m != MERGE_METHOD:
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
        if self.dataset is None:
            if m != MERGE_METHOD:
                out.append(
                    FieldIssue(
                        ("dataset",),
                        f"method {m} needs training records",
                        f"add `dataset: {{sources: [{{uri: data.jsonl}}], format: {min(allowed)}}}`",
                    )
                )
        elif self.dataset.format not in allowed:
            out.append(
                FieldIssue(
                    ("dataset", "format"),
                    f"method {m} cannot learn from {self.dataset.format} records",
                    f"use dataset.format {' or '.join(sorted(allowed))}",
                )
            )
        save = self.output.save
        if save is not None and m == MERGE_METHOD:
            out.append(
                FieldIssue(
                    ("output", "save"),
                    "a merge always writes the mixed adapter",
                    "remove output.save; set merge.mergeIntoBase: true to also write the full model",
                )
            )
        elif save is not None and not self.uses_lora() and m != "prompt-tuning":
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

    def _merge_issues(self) -> list[FieldIssue]:
        """merge needs spec.merge and nothing that trains; spec.merge only with merge. A merge
        trains nothing, so the steps-or-epochs rule does not apply to it."""
        m = self.method
        if m != MERGE_METHOD and self.merge is None:
            return []
        if m != MERGE_METHOD:
            return [
                FieldIssue(
                    ("merge",),
                    f"merge settings do not apply to method {m}",
                    "remove spec.merge, or use method: merge",
                )
            ]
        if self.merge is None:
            return [
                FieldIssue(
                    ("merge",),
                    "method merge needs the adapters to mix",
                    "add `merge: {adapters: [{fromJob: {kind: FineTuneJob, name: sft-a}}, "
                    "{fromJob: {kind: FineTuneJob, name: sft-b}}], combination: cat}`",
                )
            ]
        out = self.merge.issues(("merge",))
        for field, value in (("lora", self.lora), ("quantization", self.quantization)):
            if value is not None:
                out.append(
                    FieldIssue(
                        (field,),
                        "a merge trains nothing: the adapters bring their own LoRA settings",
                        f"remove spec.{field}",
                    )
                )
        if self.deepspeed is not None:
            out.append(
                FieldIssue(
                    ("deepspeed",), "a merge trains nothing and runs in one process", "remove spec.deepspeed"
                )
            )
        res = self.resources
        if res.workers != 1 or res.gpus_per_worker > 1:
            out.append(
                FieldIssue(
                    ("resources",),
                    f"a merge runs in one process (got workers {res.workers}, gpusPerWorker "
                    f"{res.gpus_per_worker})",
                    "set resources.workers: 1 and gpusPerWorker: 0 or 1",
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
