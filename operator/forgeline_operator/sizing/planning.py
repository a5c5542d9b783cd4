"""How big a model, on how many tokens, for a compute budget: the arithmetic behind `forgeline plan`.

Pure functions on published scaling laws, no I/O (the CLI reads files and prints):

- `compute_optimal`: Chinchilla's approach 3 (Hoffmann et al. 2022, arXiv 2203.15556, eq. 10), the
  parametric loss L(N, D) = E + A/N^α + B/D^β minimised at fixed training compute C ≈ 6ND. The
  planner sizes models with this one: the inference-aware plans need a loss model, and this is it.
- `approach_1_optimal`: Chinchilla's approach 1 (N_opt ∝ C^0.50), calibrated to its Table 3, shown
  beside it for reference. It picks bigger models than approach 3 at the same compute.
- `inference_optimal`: Sardana & Frankle 2023 ("Beyond Chinchilla-Optimal", arXiv 2401.00448):
  reach the same loss for the least training + inference compute, 6ND + 2N·T.
- `train_to_test_optimal`: with k samples per query (Roberts et al. 2026, "Test-Time Scaling Makes
  Overtraining Compute-Optimal", arXiv 2604.01411) inference costs 2N·T·k and the best of k samples
  is better than one; N, D and k are chosen together. How much better k samples are is an
  assumption here (`SAMPLE_EXPONENT`), not a fit.
- `llama_shape_for` and `training_job_manifest`: a TrainingJob sized to a plan.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------------- scaling laws


@dataclass(frozen=True)
class LossFit:
    """A parametric loss L(N, D) = E + A/N^alpha + B/D^beta (nats per token)."""

    e: float
    a: float
    b: float
    alpha: float
    beta: float

    def loss(self, params: float, tokens: float) -> float:
        return self.e + self.reducible(params, tokens)

    def reducible(self, params: float, tokens: float) -> float:
        """The loss above the irreducible E."""
        return self.a / params**self.alpha + self.b / tokens**self.beta


CHINCHILLA = LossFit(e=1.69, a=406.4, b=410.7, alpha=0.34, beta=0.28)
"""Hoffmann et al. 2022, eq. 10 (approach 3; the fit is in appendix D.2), with its published,
rounded constants. With these constants N_opt ∝ C^0.45: at 5.76e23 FLOPs it picks about 32B
parameters, where approach 1 (Table 3) picks 67B."""

TABLE_3 = (
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
)
"""Hoffmann et al. 2022, Table 3 (approach 1): (parameters, training FLOPs, training tokens)."""

APPROACH_1_EXPONENT = 0.50
"""Approach 1's N_opt ∝ C^a, a = 0.50 (Hoffmann et al. 2022, Table 2); D_opt = C / 6N."""


@dataclass(frozen=True)
class Allocation:
    """A model size and a training-token count."""

    params: float
    tokens: float

    @property
    def training_flops(self) -> float:
        return 6 * self.params * self.tokens

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


def compute_optimal(flops: float, fit: LossFit = CHINCHILLA) -> Allocation:
    """Closed form of argmin L(N, D) subject to 6ND = flops (Hoffmann et al. 2022, eq. 4):
    N_opt = G·(C/6)^(β/(α+β)), D_opt = (C/6)/N_opt, G = (αA / βB)^(1/(α+β))."""
    g = (fit.alpha * fit.a / (fit.beta * fit.b)) ** (1 / (fit.alpha + fit.beta))
    params = g * (flops / 6) ** (fit.beta / (fit.alpha + fit.beta))
    return Allocation(params, flops / 6 / params)


def compute_optimal_numeric(flops: float, fit: LossFit = CHINCHILLA) -> Allocation:
    """The same optimum found by search (a check on the closed form)."""
    log_n = _argmin(lambda x: fit.loss(math.exp(x), flops / 6 / math.exp(x)), math.log(1e3), math.log(flops))
    return Allocation(math.exp(log_n), flops / 6 / math.exp(log_n))


def _approach_1_coefficient() -> float:
    """k in N_opt = k·C^0.50: the geometric mean over Table 3's rows."""
    logs = [math.log(n) - APPROACH_1_EXPONENT * math.log(c) for n, c, _ in TABLE_3]
    return math.exp(sum(logs) / len(logs))


_APPROACH_1_K = _approach_1_coefficient()


def approach_1_optimal(flops: float) -> Allocation:
    """Chinchilla approach 1, N_opt = k·C^0.50 calibrated to Table 3 (within 6% of every row)."""
    params = _APPROACH_1_K * flops**APPROACH_1_EXPONENT
    return Allocation(params, flops / 6 / params)


# ------------------------------------------------------------------- inference-aware plans

SAMPLE_EXPONENT = 0.1
"""An assumption: the best of k samples has the reducible loss of one sample times k^-κ.

Why this form: the failure rate of repeated sampling, -log pass@k, falls as a power of k (Brown et al.
2024, "Large Language Monkeys", arXiv 2407.21787; Schaeffer et al. 2025, arXiv 2502.17578), with
exponents that depend on the task. Carrying it over to the language-model loss is our
simplification, not Roberts et al.'s fit, and κ = 0.1 is deliberately modest (16 samples take 24%
off the reducible loss); `forgeline plan --sample-exponent` changes it."""


@dataclass(frozen=True)
class ServedPlan:
    """A model, its training tokens, the samples it draws per query, and what serving costs."""

    allocation: Allocation
    samples: int
    inference_flops: float
    effective_loss: float
    """Loss per query: one sample's loss, or for k samples the assumed best-of-k loss."""

    @property
    def total_flops(self) -> float:
        return self.allocation.training_flops + self.inference_flops


def inference_flops(params: float, inference_tokens: float, samples: int = 1) -> float:
    """2N FLOPs per token served (a forward pass), k samples per query."""
    return 2 * params * inference_tokens * samples


def best_of_k_loss(
    allocation: Allocation, samples: int, fit: LossFit = CHINCHILLA, sample_exponent: float = SAMPLE_EXPONENT
) -> float:
    """E + (L(N, D) - E)·k^-κ: the assumed loss of the best of k samples (`SAMPLE_EXPONENT`)."""
    return fit.e + fit.reducible(allocation.params, allocation.tokens) * samples**-sample_exponent


def tokens_for_reducible_loss(params: float, reducible: float, fit: LossFit = CHINCHILLA) -> float:
    """D such that A/N^α + B/D^β = reducible (the iso-loss curve); inf where N alone cannot reach it."""
    left = reducible - fit.a / params**fit.alpha
    return (fit.b / left) ** (1 / fit.beta) if left > 0 else math.inf


def inference_optimal(target_loss: float, inference_tokens: float, fit: LossFit = CHINCHILLA) -> ServedPlan:
    """Sardana & Frankle 2023: the N, D reaching `target_loss` for the least 6ND + 2N·T.

    A 1-D search over log N along the iso-loss curve, which starts where N alone would reach the
    target (D → ∞). Without inference it lands on the compute-optimal point; more inference tokens
    move it to smaller N and more D."""
    reducible = target_loss - fit.e
    if reducible <= 0:
        raise ValueError(f"target loss {target_loss} is not above the irreducible loss {fit.e}")
    n_floor = (fit.a / reducible) ** (1 / fit.alpha)

    def total(log_n: float) -> float:
        n = math.exp(log_n)
        return 6 * n * tokens_for_reducible_loss(n, reducible, fit) + inference_flops(n, inference_tokens)

    # Without inference the optimum sits at about 10× n_floor (the compute-optimal point): 1e4× is ample.
    n = math.exp(_argmin(total, math.log(n_floor) + 1e-9, math.log(n_floor) + math.log(1e4)))
    allocation = Allocation(n, tokens_for_reducible_loss(n, reducible, fit))
    return ServedPlan(allocation, 1, inference_flops(n, inference_tokens), fit.loss(n, allocation.tokens))


def sample_counts(max_samples: int) -> list[int]:
    """The k the train-to-test plan compares: powers of two up to max_samples, and max_samples."""
    return sorted({*(2**i for i in range(max_samples.bit_length()) if 2**i <= max_samples), max_samples})


def best_at_budget(
    total_flops: float,
    inference_tokens: float,
    samples: int,
    fit: LossFit = CHINCHILLA,
    sample_exponent: float = SAMPLE_EXPONENT,
) -> ServedPlan:
    """The N, D with 6ND + 2N·T·k = total_flops and the least best-of-k loss (a search over log N)."""
    n_ceiling = total_flops / (2 * inference_tokens * samples) if inference_tokens > 0 else total_flops

    def tokens(n: float) -> float:
        return (total_flops - inference_flops(n, inference_tokens, samples)) / (6 * n)

    def loss(log_n: float) -> float:
        n = math.exp(log_n)
        d = tokens(n)
        return best_of_k_loss(Allocation(n, d), samples, fit, sample_exponent) if d > 0 else math.inf

    n = math.exp(_argmin(loss, math.log(1e3), math.log(n_ceiling) - 1e-9))
    allocation = Allocation(n, tokens(n))
    return ServedPlan(
        allocation,
        samples,
        inference_flops(n, inference_tokens, samples),
        best_of_k_loss(allocation, samples, fit, sample_exponent),
    )


def train_to_test_optimal(
    total_flops: float,
    inference_tokens: float,
    max_samples: int,
    fit: LossFit = CHINCHILLA,
    sample_exponent: float = SAMPLE_EXPONENT,
) -> tuple[ServedPlan, list[ServedPlan]]:
    """Roberts et al. 2026's question at a fixed end-to-end budget: N, D and k ≤ max_samples chosen
    together for the least best-of-k loss. Returns the best plan and the best plan for every k
    compared. Given the inference-aware plan's total compute, k = 1 reproduces that plan."""
    plans = [
        best_at_budget(total_flops, inference_tokens, k, fit, sample_exponent)
        for k in sample_counts(max_samples)
    ]
    return min(plans, key=lambda p: (p.effective_loss, p.samples)), plans


def _argmin(f: Callable[[float], float], lo: float, hi: float, grid: int = 240) -> float:
    """x in [lo, hi] minimising a unimodal f: a coarse grid, then golden-section search."""
    xs = [lo + (hi - lo) * i / grid for i in range(grid + 1)]
    best = min(range(len(xs)), key=lambda i: f(xs[i]))
    a, b = xs[max(best - 1, 0)], xs[min(best + 1, grid)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > 1e-10 * max(1.0, abs(a)):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2


# ------------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Gpu:
    """An accelerator: dense bf16 tensor-core peak (datasheet, without sparsity), memory, a price."""

    name: str
    peak_flops: float
    memory_gib: int
    price_per_hour: float
    """An assumed on-demand cloud price in USD; `--price` overrides it."""


GPUS = {
    g.name: g
    for g in (
        Gpu("h100", 989e12, 80, 2.50),
        Gpu("h200", 989e12, 141, 3.50),
        Gpu("b200", 2250e12, 180, 5.00),
        Gpu("a100", 312e12, 80, 1.50),
        Gpu("l4", 121e12, 24, 0.80),
    )
}
"""NVIDIA datasheets (H100/H200 SXM, HGX B200, A100 SXM, L4); prices are assumptions."""

ASSUMED_MFU = 0.40
"""Model FLOPs utilisation assumed when bench/results.md has no measurement on the GPU."""


def measured_mfu(results_markdown: str, gpu: str) -> tuple[float, str] | None:
    """The newest MFU measured on `gpu` in bench/results.md, as (fraction, section title).

    A section counts when its `Machine:` line names the GPU (e.g. "8× NVIDIA H100 80GB"); its MFU
    is the first row's value in the first table column whose header says MFU."""
    found: tuple[float, str] | None = None
    for section in re.split(r"^## ", results_markdown, flags=re.MULTILINE)[1:]:
        title, _, body = section.partition("\n")
        machine = next((line for line in body.splitlines() if line.startswith("Machine:")), "")
        if not re.search(rf"\b{re.escape(gpu)}\b", machine, re.IGNORECASE):
            continue
        mfu = _first_mfu_cell(body)
        if mfu is not None:
            found = (mfu, title.strip())
    return found


def _first_mfu_cell(markdown: str) -> float | None:
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        cells = _cells(line)
        column = next((j for j, cell in enumerate(cells) if "MFU" in cell), None)
        if column is None or i + 2 >= len(lines):
            continue
        row = _cells(lines[i + 2])
        match = re.search(r"([0-9]+(?:\.[0-9]+)?)\s*%", row[column]) if column < len(row) else None
        if match:
            return float(match.group(1)) / 100
    return None


def _cells(line: str) -> list[str]:
    line = line.strip()
    return [c.strip() for c in line.strip("|").split("|")] if line.startswith("|") else []


def gpu_hours(flops: float, gpu: Gpu, mfu: float) -> float:
    return flops / (gpu.peak_flops * mfu) / 3600


def flops_for_gpu_hours(hours: float, gpu: Gpu, mfu: float) -> float:
    return hours * 3600 * gpu.peak_flops * mfu


# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a llama decoder (transformers' LlamaConfig, untied embeddings)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int

    @property
    def params(self) -> int:
        """Parameters as transformers counts them: embeddings, blocks, final norm, lm_head."""
        d, head_dim = self.hidden_size, self.hidden_size // self.num_heads
        attention = 2 * d * d + 2 * d * self.num_kv_heads * head_dim  # q, o; k, v
        block = attention + 3 * d * self.intermediate_size + 2 * d  # gate/up/down MLP, two RMSNorms
        return 2 * self.vocab_size * d + self.num_layers * block + d


_ASPECT_RATIO = 100
"""Width / depth to aim for: Llama 2 7B is 128, Llama 3 70B 102, TinyLlama 93, GPT-2 small 64."""


def llama_shape_for(params: float, vocab_size: int = 32000) -> LlamaShape:
    """A llama shape near `params`: for each width (multiples of 128, then 256), the depth that lands
    closest; of the widths within 3% of the target, the one nearest the aspect ratio."""
    widths = [*range(256, 1024, 128), *range(1024, 16385, 256)]  # an even number of heads
    shapes = [s for d in widths if (s := _shape_at_width(d, params, vocab_size))]

    def error(s: LlamaShape) -> float:
        return abs(s.params - params) / params

    close = [s for s in shapes if error(s) <= 0.03] or [min(shapes, key=error)]
    return min(close, key=lambda s: abs(math.log(s.hidden_size / s.num_layers / _ASPECT_RATIO)))


def _shape_at_width(hidden: int, params: float, vocab_size: int) -> LlamaShape | None:
    head_dim = 64 if hidden < 1024 else 128
    heads = hidden // head_dim
    kv_heads = heads // 4 if heads % 4 == 0 else heads // 2  # grouped-query attention
    intermediate = _round_up(8 * hidden / 3, 256)  # SwiGLU at about 2/3 of 4d, as llama does
    one_layer = LlamaShape(hidden, 1, heads, kv_heads, intermediate, vocab_size)
    outside_blocks = 2 * vocab_size * hidden + hidden  # embeddings, lm_head, final norm
    layers = round((params - outside_blocks) / (one_layer.params - outside_blocks))
    if not 1 <= layers <= 512:
        return None
    return LlamaShape(hidden, layers, heads, kv_heads, intermediate, vocab_size)


def _round_up(x: float, multiple: int) -> int:
    return multiple * math.ceil(x / multiple)


# -------------------------------------------------------------------------- the manifest


def batch_tokens_for(flops: float) -> float:
    """Tokens per optimizer step: DeepSeek LLM's fit B_opt = 0.2920·C^0.3271 (arXiv 2401.02954, eq. 1)."""
    return 0.2920 * flops**0.3271


def learning_rate_for(flops: float) -> float:
    """Peak learning rate: DeepSeek LLM's fit η_opt = 0.3118·C^-0.1250 (arXiv 2401.02954, eq. 1)."""
    return 0.3118 * flops**-0.1250


@dataclass(frozen=True)
class JobShape:
    """What the manifest runs: how it parallelises, batches and how long."""

    sequence_length: int
    micro_batch_size: int
    global_batch_size: int
    max_steps: int
    zero_stage: int | None


def job_shape_for(allocation: Allocation, gpu: Gpu, gpus: int) -> JobShape:
    """Sequence length, batches and steps from the token count; ZeRO from the memory the model needs."""
    n = allocation.params
    sequence = 4096 if n >= 1e9 else 2048
    micro = 4 if n < 3e9 else 2 if n < 20e9 else 1
    per_step = micro * gpus
    steps_of = max(1, round(batch_tokens_for(allocation.training_flops) / sequence / per_step))
    global_batch = steps_of * per_step
    max_steps = max(1, math.ceil(allocation.tokens / (global_batch * sequence)))
    return JobShape(sequence, micro, global_batch, max_steps, _zero_stage(n, gpu, gpus))


def _zero_stage(params: float, gpu: Gpu, gpus: int) -> int | None:
    """Mixed-precision AdamW holds about 16 bytes a parameter (bf16 weights and gradients, fp32
    master weights and two moments). Plain DDP while that is under a quarter of a GPU's memory
    (activations need the rest); ZeRO-2 while the weights plus a shard of the rest fit in half;
    ZeRO-3 beyond."""
    memory = gpu.memory_gib * 2**30
    if 16 * params <= memory / 4:
        return None
    if 2 * params + 14 * params / gpus <= memory / 2:
        return 2
    return 3


def training_job_manifest(
    name: str,
    shape: LlamaShape,
    allocation: Allocation,
    gpu: Gpu,
    gpus: int,
    planned_gpu_hours: float,
    data_uri: str,
    output_uri: str,
) -> dict[str, Any]:
    """A TrainingJob (forgeline.dev/v1alpha1) that trains `shape` on about `allocation.tokens` tokens
    on `gpus` GPUs (nodes of up to 8), with a GPU-hour budget 25% over the plan for restarts."""
    if gpus > 8 and gpus % 8:
        raise ValueError(f"{gpus} GPUs: use up to 8 (one node) or a multiple of 8 (whole nodes)")
    job = job_shape_for(allocation, gpu, gpus)
    per_node = min(gpus, 8)
    steps_warmup = min(2000, max(1, job.max_steps // 100))
    spec: dict[str, Any] = {
        "model": {
            "architecture": "llama",
            "hiddenSize": shape.hidden_size,
            "numLayers": shape.num_layers,
            "numHeads": shape.num_heads,
            "numKvHeads": shape.num_kv_heads,
            "intermediateSize": shape.intermediate_size,
            "vocabSize": shape.vocab_size,
            "maxPositionEmbeddings": job.sequence_length,
        },
        "data": {
            "sources": [{"uri": data_uri, "format": "parquet"}],
            "textField": "text",
            "tokenizer": {"hubId": "meta-llama/Llama-2-7b-hf"},
            "sequenceLength": job.sequence_length,
            "packing": True,
        },
        "training": {
            "maxSteps": job.max_steps,
            "globalBatchSize": job.global_batch_size,
            "microBatchSize": job.micro_batch_size,
            "learningRate": float(f"{learning_rate_for(allocation.training_flops):.2g}"),
            "minLearningRateRatio": 0.1,
            "schedule": "cosine",
            "warmupSteps": steps_warmup,
            "weightDecay": 0.1,
            "gradClip": 1.0,
            "precision": "bf16",
        },
        "resources": {
            "workers": gpus // per_node,
            "gpusPerWorker": per_node,
            "cpu": str(12 * per_node),
            "memory": f"{128 * per_node}Gi",
            "sharedMemory": f"{32 * per_node}Gi",
        },
        "checkpointing": {"intervalSteps": max(1, min(500, job.max_steps // 10)), "keep": 3},
        "output": {"uri": output_uri},
        "backoffLimit": 5,
        "budget": {"maxGpuHours": float(f"{1.25 * planned_gpu_hours:.4g}")},
    }
    if job.zero_stage is not None:
        spec["deepspeed"] = {"zeroStage": job.zero_stage, "activationCheckpointing": job.zero_stage == 3}
    return {
        "apiVersion": "forgeline.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "labels": {"forgeline.dev/planned-by": "forgeline-plan"}},
        "spec": spec,
    }
