"""Will it fit? Per-GPU memory of a TrainingJob or FineTuneJob, estimated before a GPU is requested.

Pure functions (the one reader, `local_model_config`, is kept apart so `estimate` stays pure):

- model states, after the ZeRO paper (Rajbhandari et al. 2020, arXiv 1910.02054, sec. 3.1): mixed
  precision Adam holds 2 bytes of 16-bit weights, 2 of 16-bit gradients and 12 of optimizer state
  (fp32 master weights and the two moments) per trained parameter: 16 bytes. In fp32 (CPU) it is
  4 + 4 + 8, the same 16. ZeRO stage 1 shards the optimizer state over the data-parallel ranks,
  stage 2 also the gradients, stage 3 also the weights; offload moves them to CPU memory.
- the optimizer (spec.training.optimizer) decides the state per trained parameter: torch's AdamW
  two moments in the parameter's dtype (8 bytes in fp32); bitsandbytes' 32-bit AdamW always 8;
  its blockwise 8-bit AdamW (Dettmers et al. 2022, arXiv 2110.02861) 2 bytes plus an fp32 absmax per
  256 values of each moment (tensors under 4,096 values keep 32-bit state); Adafactor (Shazeer and
  Stern 2018, arXiv 1804.04235, transformers' defaults: no first moment) a row and a column vector
  per matrix. A paged optimizer's state lives in CUDA unified memory that moves to CPU memory when
  the GPU runs short (QLoRA sec. 3): it is reported as pageable, not counted against the GPU.
- LoRA (Hu et al. 2021, arXiv 2106.09685): a frozen 16-bit base and r·(in + out) trained
  parameters per adapted linear layer, each at the 16 bytes above. QLoRA (Dettmers et al. 2023,
  arXiv 2305.14314, sec. 3): the frozen linear layers in 4-bit NF4, 0.5 bytes a parameter, plus
  quantisation constants: 32/64 = 0.5 bits a parameter, or 8/64 + 32/(64·256) ≈ 0.127 bits with
  double quantisation. Embeddings, norms and the output head stay 16-bit.
- activations, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models", arXiv 2205.05198, eq. 1): s·b·h·(34 + 5·a·s/h) bytes per layer in 16 bits. The 5·a·s/h
  term is the attention scores, softmax and its dropout; transformers' default attention (SDPA,
  fused kernels on GPUs) does not store them, which is the paper's selective recomputation (sec.
  4.2), so only 34·s·b·h is counted. With checkpointing: 2·s·b·h per layer (its input) plus one
  layer's full activations while it is recomputed. The logits: b·s·vocab·(2 + 4) bytes (16-bit
  logits and their fp32 copy for the loss).
- a margin: 1 GiB (CUDA context, cuBLAS/NCCL workspaces) + 10% of the tensors (allocator
  fragmentation). The total with the margin is what is compared with the GPU's memory; the
  tensors alone are comparable with `torch.cuda.max_memory_allocated()`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from ..api import FineTuneJob, Job, TrainingJob
from ..api.common import PAGED_OPTIMIZERS
from ..api.finetune_job import LoraSettings
from .planning import LlamaShape

GiB = 2**30
MARGIN_FIXED_BYTES = GiB
"""CUDA context and library workspaces (cuBLAS, NCCL): about 0.5-1 GiB per process."""
MARGIN_FRACTION = 0.10
"""PyTorch caching-allocator fragmentation, as a fraction of the estimated tensors."""
MARGIN_TEXT = "1 GiB (CUDA context, workspaces) + 10% of the tensors (allocator fragmentation)"

ADAM_BYTES_PER_PARAM = 16
"""Weights + gradients + AdamW state per trained parameter: 2 + 2 + 12 (bf16), 4 + 4 + 8 (fp32)."""
MASTER_BYTES = 4
"""Mixed precision's fp32 master copy of a 16-bit trained weight (counted with the optimizer)."""
BNB_8BIT_MIN_SIZE = 4096
"""bitsandbytes keeps 32-bit state for tensors with fewer values (min_8bit_size)."""
BNB_BLOCK = 256
"""bitsandbytes' blockwise quantisation: one fp32 absmax per 256 values of each 8-bit moment."""
OPTIMIZER_TEXT = {
    "adamw": "AdamW (torch, fused): two moments in the trained weights' dtype",
    "adamw-8bit": "8-bit AdamW (bitsandbytes): two blockwise-quantised 8-bit moments",
    "paged-adamw": "paged 32-bit AdamW (bitsandbytes): two fp32 moments in paged memory",
    "paged-adamw-8bit": "paged 8-bit AdamW (bitsandbytes): two 8-bit moments in paged memory",
    "adafactor": "Adafactor (transformers): a factored second moment, no first moment",
}
NF4_BITS = 4.0
QUANT_CONSTANT_BITS = {True: 8 / 64 + 32 / (64 * 256), False: 32 / 64}
"""QLoRA sec. 3: fp32 absmax per 64 weights (0.5 bits), or double-quantised (≈0.127 bits)."""

GPU_MEMORY_MIB = {
    "h100": 81559,
    "h200": 143771,
    "a100-80gb": 81920,
    "a100-40gb": 40960,
    "l4": 23034,
    "a10g": 23028,
    "t4": 15360,
    "a6000": 49140,
    "l40s": 46068,
    "a40": 46068,
    "rtx-4090": 24564,
    "rtx-3090": 24576,
}
"""Total memory as nvidia-smi reports it (H100 SXM 80GB, H200 141GB, A100 SXM 80/40GB, L4, A10G, T4,
RTX A6000 48GB, L40S, A40, and the 24 GB consumer cards the QLoRA paper names)."""
_GPU_ALIASES = {"a100": "a100-80gb", "a100-80g": "a100-80gb", "a100-40g": "a100-40gb"}


def gpu_memory_for(name: str) -> int | None:
    """Bytes of memory of a GPU named like `h100`, `a100-40gb`, or a node label value such as
    `NVIDIA-H100-80GB-HBM3` / `NVIDIA-A100-SXM4-40GB`; None when the type is not known."""
    key = name.strip().lower()
    key = _GPU_ALIASES.get(key, key)
    if key in GPU_MEMORY_MIB:
        return GPU_MEMORY_MIB[key] * 2**20
    for gpu in sorted(GPU_MEMORY_MIB, key=len, reverse=True):
        family = "a100" if gpu.startswith("a100") else gpu  # rtx-4090 matches RTX-4090 and RTX 4090
        pattern = re.escape(family).replace(r"\-", "[^a-z0-9]?")
        if re.search(rf"(^|[^a-z0-9]){pattern}([^0-9]|$)", key):
            size = re.search(r"(\d+)\s*gb", key)
            if family == "a100" and size:
                return GPU_MEMORY_MIB.get(f"a100-{size.group(1)}gb", 0) * 2**20 or None
            return GPU_MEMORY_MIB[_GPU_ALIASES.get(family, family)] * 2**20
    return None


def job_gpu_memory(job: Job) -> tuple[int, str] | None:
    """The GPU memory a job's placement implies: its nodePool named after a known GPU type, or a
    nodeSelector value naming one (e.g. nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3)."""
    res = job.spec.resources
    candidates = [("spec.resources.nodePool", res.node_pool)] if res.node_pool else []
    candidates += [(f"spec.resources.nodeSelector[{k}]", v) for k, v in res.node_selector.items()]
    for where, value in candidates:
        memory = gpu_memory_for(value)
        if memory is not None:
            return memory, f"{where}: {value}"
    return None


# ----------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelDims:
    """The dimensions memory depends on. family: llama (llama, mistral, mixtral), gpt2 or bert."""

    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    num_experts: int = 1
    tied_embeddings: bool = False
    max_positions: int = 0

    @property
    def params(self) -> int:
        if self.family == "llama":
            shape = LlamaShape(
                self.hidden_size,
                self.num_layers,
                self.num_heads,
                self.num_kv_heads,
                self.intermediate_size,
                self.vocab_size,
            )
            d, i, e = self.hidden_size, self.intermediate_size, self.num_experts
            experts = self.num_layers * ((e - 1) * 3 * d * i + (d * e if e > 1 else 0))  # and the router
            return shape.params + experts - (self.vocab_size * d if self.tied_embeddings else 0)
        d = self.hidden_size
        embeddings = (self.vocab_size + self.max_positions) * d  # tied output head
        block = self.block_linear_params + 9 * d + self.intermediate_size  # biases, two LayerNorms
        # gpt2: the final LayerNorm; bert: token types, LayerNorm, pooler, MLM transform and bias
        outside = 2 * d if self.family == "gpt2" else 2 * d * d + 6 * d + self.vocab_size
        return embeddings + self.num_layers * block + outside

    def linear_layers(self) -> list[tuple[tuple[str, ...], int, int]]:
        """Each linear layer of one block: (module names PEFT matches, in features, out features)."""
        d, i, e = self.hidden_size, self.intermediate_size, self.num_experts
        if self.family == "gpt2":
            return [(("c_attn",), d, 3 * d), (("c_proj",), d, d), (("c_fc",), d, i), (("c_proj",), i, d)]
        if self.family == "bert":
            return [
                (("query",), d, d),
                (("key",), d, d),
                (("value",), d, d),
                (("dense",), d, d),
                (("dense",), d, i),
                (("dense",), i, d),
            ]
        kv = self.num_kv_heads * (d // self.num_heads)
        attention = [(("q_proj",), d, d), (("k_proj",), d, kv), (("v_proj",), d, kv), (("o_proj",), d, d)]
        mlp = [(("gate_proj", "w1"), d, i), (("up_proj", "w3"), d, i), (("down_proj", "w2"), i, d)]
        return attention + mlp * e

    @property
    def block_linear_params(self) -> int:
        return sum(n_in * n_out for _, n_in, n_out in self.linear_layers())

    def adapter_params(self, r: int, targets: list[str]) -> int:
        """LoRA's r·(in + out) per adapted linear layer; `all-linear`: every block linear."""
        every = "all-linear" in targets
        per_block = sum(
            r * (n_in + n_out)
            for names, n_in, n_out in self.linear_layers()
            if every or any(n in targets for n in names)
        )
        return per_block * self.num_layers


def _llama(d: int, layers: int, heads: int, kv: int, inter: int, vocab: int, tied: bool = False) -> ModelDims:
    return ModelDims("llama", d, layers, heads, kv, inter, vocab, tied_embeddings=tied)


_LLAMA2_7B = _llama(4096, 32, 32, 32, 11008, 32000)
_LLAMA3_8B = _llama(4096, 32, 32, 8, 14336, 128256)
_LLAMA3_70B = _llama(8192, 80, 64, 8, 28672, 128256)
_MISTRAL_7B = _llama(4096, 32, 32, 8, 14336, 32000)
KNOWN_MODELS: dict[str, ModelDims] = {
    "meta-llama/llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/llama-2-7b-chat-hf": _LLAMA2_7B,
    "meta-llama/llama-2-13b-hf": _llama(5120, 40, 40, 40, 13824, 32000),
    "meta-llama/llama-2-13b-chat-hf": _llama(5120, 40, 40, 40, 13824, 32000),
    "meta-llama/meta-llama-3-8b": _LLAMA3_8B,
    "meta-llama/meta-llama-3-8b-instruct": _LLAMA3_8B,
    "meta-llama/llama-3.1-8b": _LLAMA3_8B,
    "meta-llama/llama-3.1-8b-instruct": _LLAMA3_8B,
    "meta-llama/llama-3.1-70b": _LLAMA3_70B,
    "meta-llama/llama-3.1-70b-instruct": _LLAMA3_70B,
    "meta-llama/llama-3.2-1b": _llama(2048, 16, 32, 8, 8192, 128256, tied=True),
    "meta-llama/llama-3.2-1b-instruct": _llama(2048, 16, 32, 8, 8192, 128256, tied=True),
    "meta-llama/llama-3.2-3b": _llama(3072, 28, 24, 8, 8192, 128256, tied=True),
    "meta-llama/llama-3.2-3b-instruct": _llama(3072, 28, 24, 8, 8192, 128256, tied=True),
    "mistralai/mistral-7b-v0.1": _MISTRAL_7B,
    "mistralai/mistral-7b-instruct-v0.1": _MISTRAL_7B,
    "mistralai/mistral-7b-instruct-v0.2": _MISTRAL_7B,
    "tinyllama/tinyllama-1.1b-chat-v1.0": _llama(2048, 22, 32, 4, 5632, 32000),
    # LLaMA 1 (Touvron et al. 2023, table 2), the QLoRA paper's models; the hub calls the 33B "30b"
    "huggyllama/llama-7b": _llama(4096, 32, 32, 32, 11008, 32000),
    "huggyllama/llama-13b": _llama(5120, 40, 40, 40, 13824, 32000),
    "huggyllama/llama-30b": _llama(6656, 60, 52, 52, 17920, 32000),
    "huggyllama/llama-65b": _llama(8192, 80, 64, 64, 22016, 32000),
    "gpt2": ModelDims("gpt2", 768, 12, 12, 12, 3072, 50257, tied_embeddings=True, max_positions=1024),
}
"""Hub ids whose configs are well known (their config.json on the hub), lower-cased."""

_ARCHITECTURE_DEFAULTS = {
    "llama": _LLAMA2_7B,
    "mistral": _MISTRAL_7B,
    "mixtral": replace(_MISTRAL_7B, num_experts=8),
    "gpt2": KNOWN_MODELS["gpt2"],
    "bert": ModelDims("bert", 768, 12, 12, 12, 3072, 30522, max_positions=512),
}
"""transformers' config defaults per architecture: what a TrainingJob gets for sizes it leaves unset."""

_CONFIG_KEYS = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_layers": ("num_hidden_layers", "n_layer"),
    "num_heads": ("num_attention_heads", "n_head"),
    "num_kv_heads": ("num_key_value_heads",),
    "intermediate_size": ("intermediate_size", "n_inner"),
    "vocab_size": ("vocab_size",),
    "num_experts": ("num_local_experts",),
    "max_positions": ("max_position_embeddings", "n_positions"),
}


def dims_from_config(config: Mapping[str, Any]) -> ModelDims | None:
    """Dimensions from a transformers config.json; None when it lacks them or is not a llama,
    mistral, mixtral, gpt2 or bert-like model."""
    model_type = str(config.get("model_type", "llama"))
    family = "gpt2" if model_type == "gpt2" else "bert" if model_type in ("bert", "roberta") else "llama"
    values: dict[str, int] = {}
    for name, keys in _CONFIG_KEYS.items():
        found = next((config[k] for k in keys if isinstance(config.get(k), int)), None)
        if found is not None:
            values[name] = found
    if not {"hidden_size", "num_layers", "num_heads", "vocab_size"} <= values.keys():
        return None
    values.setdefault("num_kv_heads", values["num_heads"])
    values.setdefault("intermediate_size", 4 * values["hidden_size"])
    tied = bool(config.get("tie_word_embeddings", family != "llama"))
    return ModelDims(family, tied_embeddings=tied, **values)


def local_model_config(job: Job, work_dir: Path) -> dict[str, Any] | None:
    """The config.json of the job's base model (FineTuneJob baseModel, TrainingJob initFrom) when
    its path is a local directory holding one; relative paths resolve against work_dir."""
    source = job.spec.base_model if isinstance(job, FineTuneJob) else job.spec.model.init_from
    if source is None or source.path is None:
        return None
    if "://" in source.path and not source.path.startswith("file://"):
        return None
    path = work_dir / source.path.removeprefix("file://") / "config.json"
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


# ------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class FitEstimate:
    """Estimated memory of one training process (one GPU), in bytes, and what to change."""

    job: str
    model: str
    """What was estimated and where its size came from; says so when the size is unknown."""
    params: int | None
    trainable_params: int | None
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    margin: int
    offloaded: int
    """Bytes per process moved to CPU memory by ZeRO offload (not counted against the GPU)."""
    gpu_memory: int | None
    """The memory compared against; None for CPU jobs or when the GPU type is unknown."""
    gpu_source: str
    fits: bool | None
    """None when the size or the GPU memory is unknown (a Fits condition would be Unknown)."""
    advice: list[str]
    assumptions: list[str]
    pageable: int = 0
    """Bytes per process of a paged optimizer's state: on the GPU while it fits, moved to CPU memory
    under pressure (not counted against the GPU, and not in torch.cuda.max_memory_allocated)."""
    optimizer: str = ""

    @property
    def tensors(self) -> int:
        """Weights, gradients, optimizer states and activations: comparable with
        torch.cuda.max_memory_allocated() (the trainer's peak_gpu_memory_bytes)."""
        return self.weights + self.gradients + self.optimizer_states + self.activations

    @property
    def total(self) -> int:
        return self.tensors + self.margin


@dataclass(frozen=True)
class _Setup:
    """Everything the arithmetic needs, taken out of a job once (so advice can vary one field)."""

    dims: ModelDims
    method: str
    lora_r: int | None
    lora_targets: tuple[str, ...]
    quantized: bool
    double_quant: bool
    virtual_tokens: int
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    ranks: int
    gpus_per_worker: int
    micro_batch: int
    sequence_length: int
    checkpointing: bool
    weight_bytes: int
    sequences_per_example: int
    reference_copy: bool
    optimizer: str = "adamw"
    deepspeed: bool = False
    adapter_bytes: int | None = None
    """QLoRA: bytes per adapter weight in the dtype it trains in (None: the precision's rule)."""


class _Parts(NamedTuple):
    """Bytes per process: the GPU's share, then what is moved or pageable to CPU memory."""

    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    margin: int
    offloaded: int
    pageable: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.activations + self.margin


def estimate(
    job: Job,
    gpu_memory_bytes: int | None,
    *,
    gpu_source: str = "",
    model_config: Mapping[str, Any] | None = None,
) -> FitEstimate:
    """Per-GPU memory of `job` against `gpu_memory_bytes` (None: no limit), with advice when it does
    not fit. `model_config` is the base model's config.json (see `local_model_config`)."""
    name = f"{job.kind}/{job.metadata.name}"
    gpus = job.spec.resources.gpus_per_worker
    limit = gpu_memory_bytes if gpus > 0 else None
    source = gpu_source if limit is not None else "CPU job: per worker process, no limit" if gpus == 0 else ""
    dims, model = _model_dims(job, model_config)
    if dims is None:
        empty = FitEstimate(name, model, None, None, 0, 0, 0, 0, 0, 0, limit, source, None, [], [])
        return empty
    if isinstance(job, FineTuneJob) and job.spec.method == "merge":
        return _merge_estimate(job, dims, model, limit, source)
    setup = _setup(job, dims)
    parts = _breakdown(setup)
    if limit is None and gpus > 0:
        source = "unknown GPU type: pass --gpu or --gpu-memory, or name a known GPU in nodePool/nodeSelector"
    fits = None if limit is None else parts.total <= limit
    advice = _advice(setup, limit) if fits is False else []
    assumptions = _assumptions(setup)
    if paging := _paging(parts, limit):
        assumptions.append(
            f"paged optimizer: {_gb(paging)} of its {_gb(parts.pageable)} state does not fit beside the "
            "rest and moves between CPU and GPU memory at every step (slower steps, no out-of-memory)"
        )
    return FitEstimate(
        name,
        model,
        dims.params,
        _trainable(setup),
        *parts[:6],
        gpu_memory=limit,
        gpu_source=source,
        fits=fits,
        advice=advice,
        assumptions=assumptions,
        pageable=parts.pageable,
        optimizer=setup.optimizer,
    )


def _merge_estimate(
    job: FineTuneJob, dims: ModelDims, model: str, limit: int | None, source: str
) -> FitEstimate:
    """A merge trains nothing: the base's weights (16-bit on a GPU), no gradients or optimizer
    states; activations of one evaluation forward (one layer at a time, plus the logits) when
    spec.dataset is given. The adapters are left out: their ranks are read at run time, and even
    r 64 on every linear layer is about 2% of a 7B base."""
    spec = job.spec
    gpus = spec.resources.gpus_per_worker
    w = 4 if spec.training.precision == "fp32" or (spec.training.precision == "auto" and gpus == 0) else 2
    weights = dims.params * w
    activations = 0
    if spec.dataset is not None:
        b, seq = spec.training.micro_batch_size, spec.dataset.max_sequence_length
        activations = int(34 * seq * b * dims.hidden_size * w / 2) + b * seq * dims.vocab_size * (w + 4)
    margin = MARGIN_FIXED_BYTES + int(MARGIN_FRACTION * (weights + activations))
    total = weights + activations + margin
    return FitEstimate(
        f"{job.kind}/{job.metadata.name}",
        model,
        dims.params,
        0,
        weights,
        0,
        0,
        activations,
        margin,
        0,
        gpu_memory=limit,
        gpu_source=source,
        fits=None if limit is None else total <= limit,
        advice=[] if limit is None or total <= limit else ["use a GPU with more memory (resources.nodePool)"],
        assumptions=[
            f"method merge: the base's weights in {8 * w}-bit, no gradients or optimizer states",
            "the input adapters are not counted (their ranks are known at run time; usually about 1-2% "
            "of the base each)",
            "evaluation: one forward of microBatchSize examples" if spec.dataset else "no evaluation",
            f"margin: {MARGIN_TEXT}",
        ],
    )


def _model_dims(job: Job, config: Mapping[str, Any] | None) -> tuple[ModelDims | None, str]:
    if isinstance(job, TrainingJob) and job.spec.model.architecture is not None:
        return _fresh_dims(job), f"fresh {job.spec.model.architecture} from spec.model"
    source = job.spec.base_model if isinstance(job, FineTuneJob) else job.spec.model.init_from
    assert source is not None  # validated: initFrom when there is no architecture
    where = source.hub_id or source.path or f"fromJob {source.from_job.name if source.from_job else '?'}"
    if config is not None:
        dims = dims_from_config(config)
        if dims is not None:
            return dims, f"{where} (its config.json)"
    known = _known_model(source.hub_id or source.path or "")
    if known is not None:
        return known[1], f"{where} (known shape of {known[0]})"
    how = (
        "size unknown: point the base model at a local directory with its config.json, pass "
        "--model-config CONFIG.json, or use a well-known hubId ("
        + ", ".join(sorted(KNOWN_MODELS)[:3])
        + ", …)"
    )
    return None, f"{where}: {how}"


def _known_model(location: str) -> tuple[str, ModelDims] | None:
    """A well-known hub id, or a path ending in one (e.g. pvc://models/meta-llama/Llama-3.1-8B)."""
    tail = location.lower().rstrip("/")
    for hub_id, dims in KNOWN_MODELS.items():
        if tail == hub_id or tail.endswith("/" + hub_id):
            return hub_id, dims
    return None


def _fresh_dims(job: TrainingJob) -> ModelDims:
    m, default = job.spec.model, _ARCHITECTURE_DEFAULTS[job.spec.model.architecture or "llama"]
    heads = m.num_heads or default.num_heads
    hidden = m.hidden_size or default.hidden_size
    tok = job.spec.data.tokenizer
    known_tokenizer = _known_model(tok.hub_id or "")
    vocab = m.vocab_size or (known_tokenizer[1].vocab_size if known_tokenizer else tok.vocab_size)
    return replace(
        default,
        hidden_size=hidden,
        num_layers=m.num_layers or default.num_layers,
        num_heads=heads,
        num_kv_heads=m.num_kv_heads
        or (heads if default.num_kv_heads == default.num_heads else default.num_kv_heads),
        intermediate_size=m.intermediate_size
        or (4 * hidden if default.family != "llama" else default.intermediate_size),
        vocab_size=vocab,
        num_experts=m.num_experts or default.num_experts,
        max_positions=m.max_position_embeddings or job.spec.data.sequence_length,
    )


def _setup(job: Job, dims: ModelDims) -> _Setup:
    spec, res = job.spec, job.spec.resources
    ds = spec.deepspeed
    gpus = res.gpus_per_worker
    precision = spec.training.precision
    weight_bytes = 4 if precision == "fp32" or (precision == "auto" and gpus == 0) else 2
    if isinstance(job, FineTuneJob):
        s = job.spec
        lora = s.lora if s.lora is not None or s.method not in ("lora", "qlora") else LoraSettings()
        quant = s.quantization
        return _Setup(
            dims=dims,
            method=s.method,
            lora_r=lora.r if lora is not None and s.method not in ("full", "prompt-tuning") else None,
            lora_targets=tuple(lora.target_modules) if lora is not None else (),
            quantized=s.method == "qlora" and quant is not None,
            double_quant=quant.double_quant if quant is not None else True,
            virtual_tokens=(s.prompt_tuning.num_virtual_tokens if s.prompt_tuning else 20)
            if s.method == "prompt-tuning"
            else 0,
            zero_stage=ds.zero_stage if ds else 0,
            offload_optimizer=bool(ds and ds.offload_optimizer),
            offload_params=bool(ds and ds.offload_params),
            ranks=res.workers * max(gpus, 1),
            gpus_per_worker=gpus,
            micro_batch=s.training.micro_batch_size,
            sequence_length=s.dataset.max_sequence_length,
            checkpointing=s.training.gradient_checkpointing or bool(ds and ds.activation_checkpointing),
            weight_bytes=weight_bytes,
            sequences_per_example=2 if s.method == "dpo" else s.rl.num_generations if s.rl else 1,
            reference_copy=s.method in ("dpo", "grpo", "ppo") and s.lora is None,
            optimizer=s.optimizer(),
            deepspeed=ds is not None,
            adapter_bytes=_DTYPE_BYTES[adapter] if (adapter := s.adapter_dtype()) else None,
        )
    return _Setup(
        dims=dims,
        method="pretrain",
        lora_r=None,
        lora_targets=(),
        quantized=False,
        double_quant=False,
        virtual_tokens=0,
        zero_stage=ds.zero_stage if ds else 0,
        offload_optimizer=bool(ds and ds.offload_optimizer),
        offload_params=bool(ds and ds.offload_params),
        ranks=res.workers * max(gpus, 1),
        gpus_per_worker=gpus,
        micro_batch=job.spec.training.micro_batch_size,
        sequence_length=job.spec.data.sequence_length,
        checkpointing=bool(ds and ds.activation_checkpointing),
        weight_bytes=weight_bytes,
        sequences_per_example=1,
        reference_copy=False,
        optimizer=job.spec.optimizer(),
        deepspeed=ds is not None,
    )


def _trainable(s: _Setup) -> int:
    if s.lora_r is not None:
        return s.dims.adapter_params(s.lora_r, list(s.lora_targets))
    if s.method == "prompt-tuning":
        return s.virtual_tokens * s.dims.hidden_size
    return s.dims.params


def _frozen_bytes(s: _Setup) -> int:
    """The frozen base (PEFT methods) and a frozen reference policy (dpo/grpo without LoRA)."""
    d = s.dims
    if s.lora_r is None and s.method != "prompt-tuning":
        return d.params * s.weight_bytes if s.reference_copy else 0
    if not s.quantized:
        return d.params * s.weight_bytes
    linear = d.num_layers * d.block_linear_params
    bits = NF4_BITS + QUANT_CONSTANT_BITS[s.double_quant]
    return math.ceil(linear * bits / 8) + (d.params - linear) * s.weight_bytes


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _trained_bytes(s: _Setup) -> tuple[int, int]:
    """(bytes of a trained weight and of its gradient, bytes of its master copy): QLoRA's adapters
    train in their own dtype with no master copy; 16-bit mixed precision keeps an fp32 master (the
    ZeRO paper's accounting); fp32 is its own master."""
    if s.adapter_bytes is not None:
        return s.adapter_bytes, 0
    return s.weight_bytes, MASTER_BYTES if s.weight_bytes == 2 else 0


def _trained_tensors(s: _Setup) -> list[tuple[tuple[int, ...], int]]:
    """The shapes of the trained tensors, each with how many there are: an optimizer's state
    depends on them (8-bit keeps small tensors in 32 bits; Adafactor factors matrices)."""
    d = s.dims
    if s.lora_r is not None:
        every = "all-linear" in s.lora_targets
        out: list[tuple[tuple[int, ...], int]] = []
        for names, n_in, n_out in d.linear_layers():
            if every or any(n in s.lora_targets for n in names):
                out += [((s.lora_r, n_in), d.num_layers), ((n_out, s.lora_r), d.num_layers)]
        return out
    if s.method == "prompt-tuning":
        return [((s.virtual_tokens, d.hidden_size), 1)]
    matrices = [((n_out, n_in), d.num_layers) for _, n_in, n_out in d.linear_layers()]
    matrices.append(((d.vocab_size, d.hidden_size), 1 if d.tied_embeddings else 2))
    if d.family != "llama" and d.max_positions:
        matrices.append(((d.max_positions, d.hidden_size), 1))
    rest = d.params - sum(math.prod(shape) * n for shape, n in matrices)
    vectors = [((d.hidden_size,), rest // d.hidden_size)] if rest >= d.hidden_size else []
    if rest % d.hidden_size:
        vectors.append(((rest % d.hidden_size,), 1))
    return matrices + vectors  # the rest (norms, biases, a router) as vectors of hidden_size


def _state_bytes(optimizer: str, shape: tuple[int, ...], param_bytes: int) -> int:
    """The optimizer's state for one trained tensor of `shape` whose weights it updates in
    `param_bytes` per value (the fp32 master, or 16-bit adapters)."""
    n = math.prod(shape)
    if optimizer == "adamw":
        return 2 * n * param_bytes
    if optimizer == "adafactor":  # a row and a column vector per matrix; a vector's full second moment
        if len(shape) >= 2:
            return (math.prod(shape[:-1]) + math.prod(shape[:-2] + shape[-1:])) * param_bytes
        return n * param_bytes
    if optimizer == "paged-adamw" or n < BNB_8BIT_MIN_SIZE:  # bitsandbytes' 32-bit state is fp32
        return 2 * n * 4
    assert optimizer in ("adamw-8bit", "paged-adamw-8bit"), optimizer
    return 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)


def _optimizer_state(s: _Setup) -> int:
    param_bytes, master = _trained_bytes(s)
    update_bytes = master or param_bytes
    return sum(_state_bytes(s.optimizer, shape, update_bytes) * n for shape, n in _trained_tensors(s))


def _breakdown(s: _Setup) -> _Parts:
    """Weights, gradients, optimizer states (master copy and, unless paged, the state), activations,
    margin; then what ZeRO offload moves to CPU memory and what a paged optimizer may page there."""
    trainable = _trainable(s)
    w, master = _trained_bytes(s)
    shard_weights = s.ranks if s.zero_stage >= 3 else 1
    shard_grads = s.ranks if s.zero_stage >= 2 else 1
    shard_optimizer = s.ranks if s.zero_stage >= 1 else 1
    frozen = _frozen_bytes(s) // (shard_weights if not s.quantized else 1)
    weights = trainable * w // shard_weights + frozen
    gradients = trainable * w // shard_grads
    state = _optimizer_state(s)
    pageable = state if s.optimizer in PAGED_OPTIMIZERS else 0
    optimizer = (trainable * master + state - pageable) // shard_optimizer
    offloaded = 0
    if s.offload_optimizer:
        offloaded, optimizer = offloaded + optimizer, 0
    if s.offload_params:
        offloaded, weights = offloaded + weights, 0
    activations = _activations(s)
    tensors = weights + gradients + optimizer + activations
    margin = MARGIN_FIXED_BYTES + int(MARGIN_FRACTION * tensors)
    return _Parts(weights, gradients, optimizer, activations, margin, offloaded, pageable)


def _activations(s: _Setup) -> int:
    """Korthikanti et al. 2022 eq. 1 without the attention-score term (SDPA), scaled to the
    precision; checkpointing keeps each layer's input and one layer's full activations."""
    d = s.dims
    b = s.micro_batch * s.sequences_per_example
    seq = s.sequence_length + s.virtual_tokens
    scale = s.weight_bytes / 2
    full_layer = int(34 * seq * b * d.hidden_size * scale)
    if s.checkpointing:
        layers = d.num_layers * int(2 * seq * b * d.hidden_size * scale) + full_layer
    else:
        layers = d.num_layers * full_layer
    logits = 0 if s.method == "reward-model" else b * seq * d.vocab_size * (s.weight_bytes + 4)
    return layers + logits


def _total(parts: _Parts) -> int:
    return parts.total


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _advice(s: _Setup, limit: int) -> list[str]:
    """Concrete changes, each with the field to set and the per-GPU total it gives."""
    now = _total(_breakdown(s))
    out: list[str] = []

    def option(field: str, why: str, changed: _Setup) -> None:
        parts = _breakdown(changed)
        after = parts.total
        if after < now:
            verdict = "fits" if after <= limit else "not enough alone"
            paging = _paging(parts, limit)
            if paging and after <= limit:
                verdict += f"; {_gb(paging)} of its state moves between CPU and GPU every step"
            out.append(f"{field} ({why}: {_gb(now)} → {_gb(after)} per GPU, {verdict})")

    if s.ranks > 1 and s.zero_stage < (2 if s.quantized else 3):
        stage = 2 if s.quantized else 3
        what = "shards optimizer states and gradients" + ("" if stage == 2 else " and weights")
        option(f"spec.deepspeed.zeroStage: {stage}{_adamw(s)}", what, _on_deepspeed(s, zero_stage=stage))
    if not s.checkpointing:
        field = (
            "spec.training.gradientCheckpointing"
            if s.method != "pretrain"
            else "spec.deepspeed.activationCheckpointing"
        )
        option(f"{field}: true", "recompute activations in the backward pass", replace(s, checkpointing=True))
    smaller = _largest_fitting(s, limit, "micro_batch", range(s.micro_batch - 1, 0, -1))
    if smaller is not None:
        option(
            f"spec.training.microBatchSize: {smaller}",
            "keep globalBatchSize; gradient accumulation makes up the rest",
            replace(s, micro_batch=smaller),
        )
    elif s.micro_batch > 1:
        option("spec.training.microBatchSize: 1", "fewer activations", replace(s, micro_batch=1))
    if not s.deepspeed and s.method != "prompt-tuning":
        _switch_optimizer(s, limit, option)
    if s.quantized and s.adapter_bytes == 4 and s.weight_bytes == 2:
        option(
            "spec.quantization.adapterDtype: compute",
            "adapters and their gradients in the 16-bit compute dtype, as the QLoRA paper trains them",
            replace(s, adapter_bytes=2),
        )
    if s.method in ("full", "lora"):
        qlora = replace(s, method="qlora", quantized=True, lora_r=s.lora_r or 16, double_quant=True)
        published = s.gpus_per_worker > 0 and not s.deepspeed
        qlora = replace(
            qlora,
            lora_targets=s.lora_targets or ("all-linear",),
            zero_stage=min(s.zero_stage, 2),
            adapter_bytes=2 if s.weight_bytes == 2 else 4,
            optimizer="paged-adamw" if published and s.optimizer == "adamw" else s.optimizer,
        )
        recipe = " (the paper's recipe: 16-bit adapters, paged AdamW)" if published else ""
        option("method: qlora", f"4-bit NF4 frozen base, LoRA adapters trained{recipe}", qlora)
    if s.method == "full":
        lora = replace(s, method="lora", lora_r=16, lora_targets=("all-linear",))
        option("method: lora", "16-bit frozen base, LoRA adapters trained", lora)
    if not s.offload_optimizer and s.method != "prompt-tuning":
        zero = "" if s.zero_stage else " with spec.deepspeed.zeroStage: 2"
        offload = _on_deepspeed(s, offload_optimizer=True, zero_stage=max(s.zero_stage, 2))
        option(
            f"spec.deepspeed.offloadOptimizer: true{zero}{_adamw(s)}",
            "optimizer states in CPU memory, slower steps",
            offload,
        )
    out += _more_gpus(s, limit)
    if not out:
        out.append("no single change helps: use a GPU with more memory (--gpu h200) or a smaller model")
    return out


SWITCH_WHY = {
    "paged-adamw": "the same AdamW, its state paged to CPU memory when the GPU runs short",
    "adamw-8bit": "AdamW's two moments in 8 bits",
    "paged-adamw-8bit": "AdamW's moments in 8 bits, paged to CPU memory when the GPU runs short",
    "adafactor": "a factored second moment and no first moment",
}
"""Why each optimizer needs less memory, in the order they are suggested (closest to AdamW first)."""


def _switch_optimizer(s: _Setup, limit: int, option: Any) -> None:
    """The optimizer switch closest to AdamW that fits (else the one that saves most); when that one
    pages state at every step, also the closest that fits without paging. Paged optimizers only on
    GPUs; none under DeepSpeed (it runs its own AdamW)."""
    candidates = [
        name
        for name in SWITCH_WHY
        if name != s.optimizer and (s.gpus_per_worker > 0 or name not in PAGED_OPTIMIZERS)
    ]
    if not candidates:
        return
    parts = {name: _breakdown(replace(s, optimizer=name)) for name in candidates}
    fitting = [n for n in candidates if parts[n].total <= limit]
    first = fitting[0] if fitting else min(candidates, key=lambda n: parts[n].total)
    chosen = [first]
    if first in fitting and _paging(parts[first], limit):
        chosen += [n for n in fitting if not _paging(parts[n], limit)][:1]
    for name in chosen:
        option(f"spec.training.optimizer: {name}", SWITCH_WHY[name], replace(s, optimizer=name))


def _on_deepspeed(s: _Setup, **changes: Any) -> _Setup:
    """The setup under DeepSpeed, which trains with AdamW whatever the job chose."""
    return replace(s, deepspeed=True, optimizer="adamw", **changes)


def _adamw(s: _Setup) -> str:
    return "" if s.optimizer == "adamw" else " and spec.training.optimizer: adamw"


def _paging(parts: _Parts, limit: int | None) -> int:
    """Bytes of a paged optimizer's state that do not fit beside everything else: they move
    between CPU and GPU memory at every optimizer step (PCIe traffic: slower steps)."""
    if limit is None or not parts.pageable:
        return 0
    return max(0, min(parts.pageable, parts.total + parts.pageable - limit))


def _largest_fitting(s: _Setup, limit: int, field: str, values: range) -> int | None:
    for value in values:
        if _total(_breakdown(replace(s, **{field: value}))) <= limit:
            return value
    return None


def _more_gpus(s: _Setup, limit: int) -> list[str]:
    """Workers (of gpusPerWorker GPUs) that make it fit under ZeRO-3 (ZeRO-2 for QLoRA)."""
    stage = 2 if s.quantized else 3
    per_worker = max(s.gpus_per_worker, 1)
    base = _on_deepspeed(s, zero_stage=max(s.zero_stage, stage))
    for workers in (2**i for i in range(11)):
        ranks = workers * per_worker
        if ranks <= s.ranks:
            continue
        after = _total(_breakdown(replace(base, ranks=ranks)))
        if after <= limit:
            zero = "" if s.zero_stage >= stage else f" with spec.deepspeed.zeroStage: {stage}"
            zero += _adamw(s)
            now = _gb(_total(_breakdown(s)))
            return [
                f"spec.resources.workers: {workers}{zero} "
                f"({ranks} GPUs shard the model states: {now} → {_gb(after)} per GPU, fits)"
            ]
    return []


def _assumptions(s: _Setup) -> list[str]:
    w, master = _trained_bytes(s)
    precision = {4: "fp32", 2: "bf16"}[s.weight_bytes]
    if s.adapter_bytes is not None:
        precision += f" compute, adapters in {'bf16' if s.adapter_bytes == 2 else 'fp32'}"
    elif master:
        precision += " weights, fp32 master weights"
    zero = (
        f"ZeRO stage {s.zero_stage} over {s.ranks} data-parallel process(es)"
        if s.zero_stage
        else (f"no ZeRO: every one of {s.ranks} process(es) holds the full model states")
    )
    out = [
        f"{precision}; {zero}",
        f"activations: micro batch {s.micro_batch}"
        + (f" × {s.sequences_per_example} sequences" if s.sequences_per_example > 1 else "")
        + f", sequence {s.sequence_length + s.virtual_tokens}"
        + f", checkpointing {'on' if s.checkpointing else 'off'}",
        f"margin: {MARGIN_TEXT}",
        f"optimizer {s.optimizer}: {OPTIMIZER_TEXT[s.optimizer]}"
        + (" (pageable, not counted against the GPU)" if s.optimizer in PAGED_OPTIMIZERS else ""),
    ]
    if s.quantized:
        dq = "double-quantised" if s.double_quant else "fp32"
        out.append(f"QLoRA: block linear layers in NF4 with {dq} constants; embeddings and head 16-bit")
    if s.method in ("grpo", "ppo"):
        out.append("not modelled: the reward model and generation's KV cache")
    if s.dims.num_experts > 1:
        out.append("MoE: every expert's weights counted; activations as for a dense MLP")
    return out
