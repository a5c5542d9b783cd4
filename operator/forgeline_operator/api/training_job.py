"""TrainingJob: pretraining and continued pretraining of a language model, optionally with ZeRO."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ._base import ApiModel, FieldIssue, HubId, StorageURI, raise_issues, sub
from .common import (
    Checkpointing,
    DataSource,
    DeepSpeed,
    Evaluation,
    Lifecycle,
    ModelSource,
    Optimization,
    Output,
    QualityFilters,
    Resources,
    batch_issues,
    camel,
    optimizer_issues,
    precision_issues,
)

Architecture = Literal["llama", "gpt2", "mistral", "mixtral", "bert"]
ENCODER_ARCHITECTURES = frozenset({"bert"})
MOE_ARCHITECTURES = frozenset({"mixtral"})
_SIZE_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "vocab_size",
    "num_experts",
    "experts_per_token",
)


class ModelSpec(ApiModel):
    """The model to train: a fresh transformers architecture, or initFrom an existing model."""

    architecture: Architecture | None = None
    """Fresh model of this transformers architecture (mixtral is mixture-of-experts; bert is an encoder for masked LM)."""
    init_from: ModelSource | None = None
    """Continue pretraining an existing model (domain adaptation) instead of starting from scratch."""
    hidden_size: int | None = Field(default=None, ge=8, le=65536)
    """Width of the model (architecture default if unset)."""
    num_layers: int | None = Field(default=None, ge=1, le=512)
    """Number of transformer blocks."""
    num_heads: int | None = Field(default=None, ge=1, le=1024)
    """Attention heads; must divide hiddenSize."""
    num_kv_heads: int | None = Field(default=None, ge=1, le=1024)
    """Key/value heads for grouped-query attention (llama, mistral, mixtral); must divide numHeads."""
    intermediate_size: int | None = Field(default=None, ge=8, le=262144)
    """Width of the MLP."""
    vocab_size: int | None = Field(default=None, ge=32, le=1_048_576)
    """Vocabulary size; unset: the tokenizer's."""
    max_position_embeddings: int | None = Field(default=None, ge=8, le=1_048_576)
    """Longest sequence the model supports; unset: data.sequenceLength."""
    num_experts: int | None = Field(default=None, ge=2, le=256)
    """Experts per MoE layer (mixtral only)."""
    experts_per_token: int | None = Field(default=None, ge=1, le=64)
    """Experts routed per token (mixtral only); at most numExperts."""
    config: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """Raw transformers config overrides applied last (escape hatch), e.g. `{rope_theta: 500000}`."""


class TokenizerSpec(ApiModel):
    """Tokenizer: loaded from a path or the hub, from the initFrom model, or trained on the data."""

    path: StorageURI | None = None
    """A saved tokenizer directory."""
    hub_id: HubId | None = None
    """A hub id whose tokenizer to use."""
    vocab_size: int = Field(default=32000, ge=256, le=1_048_576)
    """Vocabulary size when a byte-level BPE tokenizer is trained on the job's data (no path, hubId or initFrom)."""


class PretrainingData(ApiModel):
    """Training documents, filters, tokenizer and packing."""

    sources: list[DataSource] = Field(min_length=1, max_length=256)
    """One or more inputs, mixed by weight."""
    text_field: str = Field(default="text", min_length=1, max_length=128)
    """Field holding the document text in jsonl/parquet/saved-dataset records."""
    filters: QualityFilters = sub(QualityFilters)
    """Quality filters applied before tokenisation."""
    tokenizer: TokenizerSpec = sub(TokenizerSpec)
    """Tokenizer to use or train."""
    sequence_length: int = Field(default=2048, ge=8, le=1_048_576)
    """Tokens per training sequence."""
    packing: bool = True
    """Concatenate documents (separated by EOS) into full sequenceLength blocks: no padding waste."""


class PretrainingOptimization(Optimization):
    """Optimizer and schedule. Say how long with exactly one of maxSteps or tokenBudget."""

    token_budget: int | None = Field(default=None, ge=1)
    """Train on this many tokens; steps = tokenBudget / (global batch × sequenceLength)."""
    global_batch_tokens: int | None = Field(default=None, ge=1)
    """Tokens per optimizer step over all workers (alternative to globalBatchSize); must be a multiple of data.sequenceLength."""
    weight_decay: float = Field(default=0.1, ge=0, le=1)
    """AdamW weight decay (0.1 is usual for pretraining)."""


class TrainingJobSpec(Lifecycle):
    """Desired state of a TrainingJob: pretraining or continued pretraining on a Ray cluster."""

    model: ModelSpec
    """The model to train."""
    objective: Literal["causal", "masked"] = "causal"
    """causal: next-token prediction (decoders); masked: masked-token prediction (encoders such as bert)."""
    mask_probability: float = Field(default=0.15, gt=0, lt=1)
    """Fraction of tokens masked for the masked objective."""
    data: PretrainingData
    """Training data."""
    evaluation: Evaluation = sub(Evaluation)
    """Held-out evaluation."""
    training: PretrainingOptimization = sub(PretrainingOptimization)
    """Optimizer, schedule, batch sizes and precision."""
    deepspeed: DeepSpeed | None = None
    """DeepSpeed ZeRO settings; absent: plain distributed data parallel."""
    resources: Resources = sub(Resources)
    """Workers, GPUs and placement."""
    checkpointing: Checkpointing = sub(Checkpointing)
    """Checkpoint interval, retention and resume."""
    output: Output
    """Where the trained model goes."""

    @model_validator(mode="after")
    def _check_rules(self) -> TrainingJobSpec:
        raise_issues(self.issues())
        return self

    def optimizer(self) -> str:
        """The optimizer the job trains with: spec.training.optimizer, AdamW when unset."""
        return self.training.optimizer or "adamw"

    def issues(self) -> list[FieldIssue]:
        out = self._model_issues() + self._architecture_issues() + self._objective_issues()
        out += self._data_issues()
        out += self._training_issues()
        if self.deepspeed is not None:
            out += self.deepspeed.issues(("deepspeed",))
        out += self.resources.issues(("resources",))
        out += precision_issues(self.training.precision, self.resources)
        out += optimizer_issues(self.training.optimizer, self.resources, self.deepspeed)
        out += self.checkpointing.issues(("checkpointing",))
        if self.promotion is not None:
            out += self.promotion.issues(("promotion",), "pretrain", self.evaluation.enabled())
        return out

    def _model_issues(self) -> list[FieldIssue]:
        """Exactly one of a fresh architecture or initFrom; no size overrides on initFrom."""
        out: list[FieldIssue] = []
        m = self.model
        if (m.architecture is None) == (m.init_from is None):
            out.append(
                FieldIssue(
                    ("model",),
                    "set exactly one of model.architecture (fresh model) or model.initFrom "
                    "(continued pretraining)",
                    "e.g. `architecture: llama` to start from scratch, or `initFrom: {path: s3://bucket/base}`",
                )
            )
        if m.init_from is not None:
            out += m.init_from.issues(("model", "initFrom"))
            sized = [f for f in _SIZE_FIELDS if getattr(m, f) is not None]
            for f in sized:
                out.append(
                    FieldIssue(
                        ("model", camel(f)),
                        "size overrides do not apply to an initFrom model",
                        f"remove model.{camel(f)} (the pretrained config is used)",
                    )
                )
        return out

    def _architecture_issues(self) -> list[FieldIssue]:
        """A fresh model's shape: heads, grouped-query attention, experts, objective, positions."""
        out: list[FieldIssue] = []
        m, arch = self.model, self.model.architecture
        if arch is None:
            return out
        if m.hidden_size and m.num_heads and m.hidden_size % m.num_heads:
            out.append(
                FieldIssue(
                    ("model", "numHeads"),
                    f"numHeads ({m.num_heads}) must divide hiddenSize ({m.hidden_size})",
                    "pick numHeads so that hiddenSize / numHeads is a whole number, e.g. 64 or 128",
                )
            )
        if m.num_kv_heads is not None:
            if arch in ("gpt2", "bert"):
                out.append(
                    FieldIssue(
                        ("model", "numKvHeads"),
                        f"{arch} has no grouped-query attention",
                        "remove model.numKvHeads or use llama/mistral/mixtral",
                    )
                )
            elif m.num_heads and m.num_heads % m.num_kv_heads:
                out.append(
                    FieldIssue(
                        ("model", "numKvHeads"),
                        f"numKvHeads ({m.num_kv_heads}) must divide numHeads ({m.num_heads})",
                        "use a divisor of numHeads, e.g. numHeads / 4",
                    )
                )
        if arch not in MOE_ARCHITECTURES:
            for f in ("num_experts", "experts_per_token"):
                if getattr(m, f) is not None:
                    out.append(
                        FieldIssue(
                            ("model", camel(f)),
                            f"{arch} is not a mixture-of-experts architecture",
                            f"remove model.{camel(f)} or use architecture: mixtral",
                        )
                    )
        elif m.num_experts and m.experts_per_token and m.experts_per_token > m.num_experts:
            out.append(
                FieldIssue(
                    ("model", "expertsPerToken"),
                    f"expertsPerToken ({m.experts_per_token}) exceeds numExperts ({m.num_experts})",
                    "route to at most numExperts experts (2 is usual)",
                )
            )
        return out

    def _objective_issues(self) -> list[FieldIssue]:
        """The objective fits the architecture; positions cover the sequence length."""
        out: list[FieldIssue] = []
        m, arch = self.model, self.model.architecture
        if arch is None:
            return out
        if self.objective == "masked" and arch not in ENCODER_ARCHITECTURES:
            out.append(
                FieldIssue(
                    ("objective",),
                    f"the masked objective needs an encoder; {arch} is a decoder",
                    "use model.architecture: bert, or objective: causal",
                )
            )
        if self.objective == "causal" and arch in ENCODER_ARCHITECTURES:
            out.append(
                FieldIssue(
                    ("objective",),
                    f"{arch} is an encoder and cannot be trained causally",
                    "use objective: masked, or a decoder architecture such as llama",
                )
            )
        if m.max_position_embeddings is not None and m.max_position_embeddings < self.data.sequence_length:
            out.append(
                FieldIssue(
                    ("model", "maxPositionEmbeddings"),
                    f"shorter than data.sequenceLength ({self.data.sequence_length})",
                    "raise maxPositionEmbeddings or lower data.sequenceLength",
                )
            )
        return out

    def _data_issues(self) -> list[FieldIssue]:
        out: list[FieldIssue] = []
        tok = self.data.tokenizer
        if tok.path is not None and tok.hub_id is not None:
            out.append(
                FieldIssue(
                    ("data", "tokenizer"), "set at most one of path and hubId", "keep one tokenizer source"
                )
            )
        return out

    def _training_issues(self) -> list[FieldIssue]:
        """Steps or token budget, and a global batch the workers and micro batches divide."""
        out: list[FieldIssue] = []
        t = self.training
        if (t.max_steps is None) == (t.token_budget is None):
            out.append(
                FieldIssue(
                    ("training",),
                    "set exactly one of training.maxSteps or training.tokenBudget",
                    "e.g. `maxSteps: 1000` or `tokenBudget: 2000000000`",
                )
            )
        if t.global_batch_size is not None and t.global_batch_tokens is not None:
            out.append(
                FieldIssue(
                    ("training", "globalBatchTokens"),
                    "set globalBatchSize or globalBatchTokens, not both",
                    "remove one of them",
                )
            )
        if t.global_batch_tokens is not None and t.global_batch_tokens % self.data.sequence_length:
            out.append(
                FieldIssue(
                    ("training", "globalBatchTokens"),
                    f"{t.global_batch_tokens} is not a multiple of data.sequenceLength "
                    f"({self.data.sequence_length})",
                    "use a multiple of the sequence length",
                )
            )
        if t.global_batch_tokens is not None:
            if t.global_batch_tokens % self.data.sequence_length == 0:
                out += batch_issues(
                    t.global_batch_tokens // self.data.sequence_length,
                    t.micro_batch_size,
                    self.resources,
                    "globalBatchTokens",
                )
        else:
            out += batch_issues(t.global_batch_size, t.micro_batch_size, self.resources)
        return out
