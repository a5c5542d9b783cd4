"""Pretraining throughput: Forgeline's recipe (Ray Train, 2 workers) vs a plain PyTorch loop.

    .venv/bin/python bench/pretrain_throughput.py [--steps 30] [--out bench/results.md]

Same model (a ~20M-parameter llama: 19.5M in the blocks, 6M in embeddings), same data (the
bundled corpus, packed into 256-token blocks with the tokenizer the recipe trained), same global
batch (16 sequences = 4096 tokens per step), in one run of this script on this machine:

1. the recipe, submitted through the Ray Jobs API to an embedded Ray head (`forgeline run`'s
   path): 2 Ray Train workers × 1 thread, gloo all-reduce;
2. a plain single-process loop: same model config, AdamW, same batches, 2 threads.

Reports steady-state tokens/s (steps after the first 5) and MFU against the same measured CPU
matmul peak; appends a dated section to bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEQ, GLOBAL_BATCH = 256, 16
MODEL = {
    "architecture": "llama",
    "hiddenSize": 384,
    "numLayers": 11,
    "numHeads": 6,
    "numKvHeads": 6,
    "intermediateSize": 1024,
}


def manifest(steps: int, out: str) -> dict:
    return {
        "apiVersion": "forgeline.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "bench-llama-20m"},
        "spec": {
            "model": MODEL,
            "data": {
                "sources": [{"uri": str(REPO / "examples/data/corpus.jsonl")}],
                "tokenizer": {"vocabSize": 8000},
                "sequenceLength": SEQ,
            },
            "evaluation": {"holdoutFraction": 0.0},
            "training": {
                "maxSteps": steps,
                "globalBatchSize": GLOBAL_BATCH,
                "microBatchSize": 8,
                "learningRate": 1e-3,
                "warmupSteps": 2,
            },
            "resources": {"workers": 2, "cpu": "1", "memory": "4Gi"},
            "checkpointing": {"intervalSteps": 10_000},
            "output": {"uri": out},
        },
    }


def run_recipe(steps: int, work: Path) -> tuple[dict, list[dict]]:
    import yaml  # noqa: F401 - parse path identical to the CLI's
    from rich.console import Console

    from forgeline_operator.api import parse_job
    from forgeline_operator.localray import LocalRay
    from forgeline_operator.rayjobs import RayJobs, local_python
    from forgeline_operator.runlocal import run_job

    job = parse_job(manifest(steps, str(work / "recipe-out")))
    with LocalRay() as head:
        result = run_job(
            job,
            RayJobs(head.address, python=local_python(), token=head.token),
            Console(stderr=True),
            output=None,
            done={},
            work_dir=str(work),
            quiet=True,
        )
    if not result.ok:
        raise SystemExit(f"recipe run failed: {result.status}")
    metrics = json.loads((work / "recipe-out/metrics.json").read_text())
    return metrics, [r for r in result.records if r.get("type") == "progress"]


def run_plain(steps: int, work: Path) -> dict:
    """The baseline: the same model and batches in a plain PyTorch loop, no Ray, no DDP."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from forgeline_trainer import data as D
    from forgeline_trainer import models, progress

    torch.set_num_threads(2)
    out = work / "recipe-out"
    tokenizer = D.load_tokenizer(str(out))
    docs = D.read_texts(
        [
            type(
                "S", (), {"uri": str(REPO / "examples/data/corpus.jsonl"), "format": "jsonl", "weight": 1.0}
            )()
        ],
        "text",
    )
    blocks = D.tokenize_and_pack(docs, tokenizer, SEQ, packing=True)
    config = AutoConfig.from_pretrained(out)
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    layers, hidden = models.shape(model)
    flops_per_token = progress.model_flops_per_token(models.active_params(model), layers, hidden, SEQ)
    times = []
    for step in range(steps):
        idx = D.batch_indices(blocks.n, GLOBAL_BATCH, step, 42)
        ids = torch.from_numpy(blocks.tokens[idx].astype(np.int64))
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    steady = times[5:]
    tps = GLOBAL_BATCH * SEQ / statistics.mean(steady)
    peak = progress.measure_cpu_peak(threads=2)
    return {
        "tokens_per_second": tps,
        "mfu": tps * flops_per_token / peak,
        "peak_flops": peak,
        "final_loss": float(loss),
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=str(REPO / "bench/results.md"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="forgeline-bench-") as tmp:
        work = Path(tmp)
        metrics, records = run_recipe(args.steps, work)
        steady = [r for r in records if r["step"] > 5]
        recipe_tps = (
            statistics.mean(r["tokens_per_second"] for r in steady)
            if steady
            else metrics["tokens_per_second"]
        )
        recipe_mfu = statistics.mean(r["mfu"] for r in steady) if steady else metrics["mfu"]
        plain = run_plain(args.steps, work)
    cpu = (
        subprocess.run(
            ["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True, text=True
        ).stdout.strip()
        or platform.processor()
    )
    import torch

    lines = [
        f"\n## Pretraining throughput, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n",
        f"Machine: {cpu}, {os.cpu_count()} cores, no GPU; torch {torch.__version__}, Python "
        f"{platform.python_version()}. "
        f"Command: `.venv/bin/python bench/pretrain_throughput.py --steps {args.steps}`.\n",
        f"Model: llama {MODEL['hiddenSize']}×{MODEL['numLayers']} layers, {metrics['parameters'] / 1e6:.1f}M "
        f"parameters; {SEQ}-token sequences, global batch {GLOBAL_BATCH} ({GLOBAL_BATCH * SEQ} tokens/step), "
        f"{args.steps} steps, steady state = steps 6–{args.steps}.\n",
        "| run | tokens/s | MFU (vs measured fp32 matmul peak) | final loss |",
        "| --- | ---: | ---: | ---: |",
        f"| Forgeline recipe: Ray Train, 2 workers × 1 thread, gloo DDP | {recipe_tps:,.0f} | "
        f"{100 * recipe_mfu:.1f}% | {metrics['final_loss']:.3f} |",
        f"| plain PyTorch loop, 1 process × 2 threads | {plain['tokens_per_second']:,.0f} | "
        f"{100 * plain['mfu']:.1f}% | {plain['final_loss']:.3f} |",
        f"\n**Ratio recipe / plain: {recipe_tps / plain['tokens_per_second']:.2f}×** tokens/s. "
        f"Peak used for MFU: {plain['peak_flops'] / 1e9:.0f} GFLOP/s (2-thread fp32 matmul probe; the recipe "
        f"measures 1 thread per worker and sums the workers). FLOPs/token = 6N + 12·L·d·S = "
        f"{plain['flops_per_token'] / 1e6:.1f} MFLOP.\n",
    ]
    text = "\n".join(lines)
    print(text)
    path = Path(args.out)
    if not path.exists():
        path.write_text("# Benchmarks\n\nMeasured results, newest last. Each section names its machine.\n")
    with path.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
