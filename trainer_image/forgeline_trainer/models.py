"""Build or load the models the recipes train, and count what MFU needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import progress, storage
from .errors import ModelUnavailable

# Spec field -> config attribute name per architecture family.
_LLAMA_LIKE = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
}
_FIELD_NAMES = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": {
        **_LLAMA_LIKE,
        "num_experts": "num_local_experts",
        "experts_per_token": "num_experts_per_tok",
    },
    "gpt2": {
        "hidden_size": "n_embd",
        "num_layers": "n_layer",
        "num_heads": "n_head",
        "intermediate_size": "n_inner",
        "vocab_size": "vocab_size",
        "max_position_embeddings": "n_positions",
    },
    "bert": {
        "hidden_size": "hidden_size",
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "intermediate_size": "intermediate_size",
        "vocab_size": "vocab_size",
        "max_position_embeddings": "max_position_embeddings",
    },
}


def fresh_config(model_spec: Any, vocab_size: int, seq_len: int, special: dict[str, int]):  # noqa: ANN201
    """A transformers config for a fresh model: architecture defaults, then the spec's sizes,
    then its raw `config` overrides."""
    from transformers import AutoConfig

    arch = model_spec.architecture
    names = _FIELD_NAMES[arch]
    values = {
        "vocab_size": model_spec.vocab_size or vocab_size,
        "max_position_embeddings": model_spec.max_position_embeddings or seq_len,
    }
    for field in names:
        if field not in values and getattr(model_spec, field) is not None:
            values[field] = getattr(model_spec, field)
    kwargs = {names[k]: v for k, v in values.items()}
    kwargs.update({k: v for k, v in special.items() if v is not None})
    kwargs.update(model_spec.config)
    return AutoConfig.for_model(arch, **kwargs)


def build_fresh(config: Any, masked: bool):  # noqa: ANN201
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    return cls.from_config(config)


def load_pretrained(location: str, work_dir: str | None, masked: bool = False, **kwargs: Any):  # noqa: ANN201
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    path = model_location(location, work_dir)
    cls = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    return cls.from_pretrained(path, **kwargs)


def model_location(location: str, work_dir: str | None) -> str:
    """A local directory for a path/URI (object stores are downloaded once); `hf://org/name`
    (a hub id, as the job config writes it) is handed to transformers as `org/name`."""
    if location.startswith("hf://"):
        return location[len("hf://") :]
    resolved = storage.resolve(location, work_dir)
    if not storage.is_remote(resolved) and not Path(resolved).is_dir():
        raise ModelUnavailable(f"model directory {resolved} does not exist")
    return storage.local_copy(resolved, cache_root="/tmp/forgeline-models")


def active_params(model: Any) -> int:
    """Parameters one token passes through (embeddings excluded; MoE: only routed experts)."""
    cfg = model.config
    total = sum(
        weights(p)
        for n, p in model.named_parameters()
        if "embed" not in n and "wte" not in n and "wpe" not in n
    )
    experts = getattr(cfg, "num_local_experts", None)
    per_tok = getattr(cfg, "num_experts_per_tok", None)
    if experts and per_tok:
        expert_params = sum(weights(p) for n, p in model.named_parameters() if ".experts." in n)
        total -= expert_params * (1 - per_tok / experts)
    return int(total)


def shape(model: Any) -> tuple[int, int]:
    """(layers, hidden size) of a transformers model."""
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    return int(layers), int(hidden)


@dataclass(frozen=True)
class ModelStats:
    """What the progress records and metrics.json say about a model, counted before an engine
    shards its weights (ZeRO-3 leaves every rank's parameters empty)."""

    parameters: int
    trainable: int
    flops_per_token: float
    """Training FLOPs per token, for MFU (progress.py)."""

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.parameters


def pretrain_stats(model: Any, seq_len: int) -> ModelStats:
    """Every weight trains: 6·N + attention (progress.model_flops_per_token)."""
    total, trainable = _counts(model)
    layers, hidden = shape(model)
    flops = progress.model_flops_per_token(active_params(model), layers, hidden, seq_len)
    return ModelStats(total, trainable, flops)


def finetune_stats(model: Any, seq_len: int) -> ModelStats:
    """A fine-tune (PEFT or full): weight gradients only for what trains
    (progress.peft_flops_per_token)."""
    total, trainable = _counts(model)
    layers, hidden = shape(getattr(model, "base_model", model))
    flops = progress.peft_flops_per_token(active_params(model), trainable, layers, hidden, seq_len)
    return ModelStats(total, trainable, flops)


def _counts(model: Any) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(weights(p) for p in params), sum(weights(p) for p in params if p.requires_grad)


def weights(p: Any) -> int:
    """The weights a parameter holds: a bitsandbytes 4-bit parameter packs two per stored byte,
    so its numel() is half (or less) of the layer's weights; its quant_state has the real shape."""
    quant_state = getattr(p, "quant_state", None)
    real = getattr(quant_state, "shape", None)
    return int(real.numel()) if real is not None else p.numel()
