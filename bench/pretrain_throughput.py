"""Pretraining throughput: Forgeline's recipe (Ray Train) vs a plain PyTorch loop, interleaved.

    .venv/bin/python bench/pretrain_throughput.py            # quick: ~3M llama, 3 rounds, 1 worker
    .venv/bin/python bench/pretrain_throughput.py --full     # ~20M llama, 5 rounds, 1 and 2 workers

Same model, data (the bundled corpus packed into 256-token blocks with the tokenizer the recipe
trained), global batch (16 sequences = 4096 tokens per step) and seed, in one run of this script
on this machine, repeated in interleaved rounds (so drift in the machine's speed hits every
variant alike):

1. the recipe with 1 Ray Train worker × 2 threads (the like-for-like comparison with the plain loop);
2. the recipe with 2 Ray Train workers × 1 thread each, gloo all-reduce (data parallelism on 2 cores);
3. a plain single-process loop: same model config, AdamW, same batches, 2 threads.

The recipes run through the Ray Jobs API on one embedded Ray head kept up for the whole run.
Reports steady-state tokens/s (steps after the first 5), the median of the rounds and the median
of the per-round ratios, and MFU of every variant against one peak (the node's fp32 matmul probe
with 2 threads, measured once here); appends a dated section to bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import benchlib  # bench/ is on sys.path when a bench runs as a script

REPO = Path(__file__).resolve().parents[1]
SEQ, GLOBAL_BATCH = 256, 16
MODELS = {
    "full": {
        "architecture": "llama",
        "hiddenSize": 384,
        "numLayers": 11,
        "numHeads": 6,
        "numKvHeads": 6,
        "intermediateSize": 1024,
    },
    "quick": {
        "architecture": "llama",
        "hiddenSize": 256,
        "numLayers": 4,
        "numHeads": 4,
        "numKvHeads": 4,
        "intermediateSize": 688,
    },
}


def manifest(model: dict, steps: int, out: str, name: str, workers: int) -> dict:
    return {
        "apiVersion": "forgeline.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "model": model,
            "data": {
                "sources": [{"uri": str(REPO / "examples/data/corpus.jsonl")}],
                "tokenizer": {"vocabSize": 8000},
                "sequenceLength": SEQ,
            },
            "evaluation": {"holdoutFraction": 0.0},
            "training": {
                "maxSteps": steps,
                "globalBatchSize": GLOBAL_BATCH,
                # the whole global batch in one forward per worker, as the plain loop does (with
                # micro 8 the 1-worker run accumulated 2 half-size micro batches: smaller matmuls)
                "microBatchSize": GLOBAL_BATCH // workers,
                "learningRate": 1e-3,
                "warmupSteps": 2,
            },
            "resources": {"workers": workers, "cpu": str(2 // workers), "memory": "4Gi"},
            "checkpointing": {"intervalSteps": 10_000},
            "output": {"uri": out},
        },
    }


def run_recipe(jobs, model: dict, steps: int, work: Path, workers: int, tag: str) -> dict:
    """One recipe run on the running head: steady-state tokens/s and the run's metrics."""
    from rich.console import Console

    from forgeline_operator.api import parse_job
    from forgeline_operator.runlocal import run_job

    out = work / f"recipe-{tag}"
    job = parse_job(manifest(model, steps, str(out), f"bench-{tag}", workers))
    result = run_job(job, jobs, Console(stderr=True), output=None, done={}, work_dir=str(work), quiet=True)
    if not result.ok:
        raise SystemExit(f"recipe run {tag} failed: {result.status}")
    metrics = json.loads((out / "metrics.json").read_text())
    steady = [r for r in result.records if r.get("type") == "progress" and r["step"] > 5]
    tps = statistics.mean(r["tokens_per_second"] for r in steady) if steady else metrics["tokens_per_second"]
    return {
        "tokens_per_second": tps,
        "final_loss": metrics["final_loss"],
        "parameters": metrics["parameters"],
        "out": out,
    }


def run_plain(steps: int, tokenizer_dir: Path) -> dict:
    """The baseline: the same model and batches in a plain PyTorch loop, no Ray, no DDP."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from forgeline_trainer import data as D
    from forgeline_trainer import models, progress

    torch.set_num_threads(2)
    out = tokenizer_dir
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
    return {
        "tokens_per_second": tps,
        "final_loss": float(loss),
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="~20M llama, 5 rounds, 30 steps")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--workers",
        default=None,
        help="recipe variants, comma-separated worker counts (quick: 1, the like-for-like one; full: 1,2)",
    )
    parser.add_argument("--out", default=str(REPO / "bench/results.md"))
    args = parser.parse_args()
    size = "full" if args.full else "quick"
    workers = [int(w) for w in (args.workers or ("1,2" if args.full else "1")).split(",")]
    rounds = args.rounds or (5 if args.full else 3)
    steps = args.steps or (30 if args.full else 20)
    model = MODELS[size]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from forgeline_operator.localray import LocalRay
    from forgeline_operator.rayjobs import RayJobs, local_python
    from forgeline_trainer import progress

    runs: dict[str, list[dict]] = {**{f"recipe-{w}w": [] for w in workers}, "plain": []}
    with tempfile.TemporaryDirectory(prefix="forgeline-bench-") as tmp, LocalRay() as head:
        work = Path(tmp)
        jobs = RayJobs(head.address, python=local_python(), token=head.token)
        # one untimed run first: the first Ray Train run on a fresh head was 20-25% slower than
        # the later ones in both quick runs of 2026-11-25 (3,508 and 3,828 tok/s against ~4,700)
        run_recipe(jobs, model, 8, work, 1, "warm-up")
        for i in range(rounds):
            for w in workers:
                runs[f"recipe-{w}w"].append(run_recipe(jobs, model, steps, work, w, f"{w}w-{i}"))
            runs["plain"].append(run_plain(steps, runs[f"recipe-{workers[0]}w"][0]["out"]))
            print(
                f"round {i}: "
                + ", ".join(f"{k} {v[-1]['tokens_per_second']:,.0f} tok/s" for k, v in runs.items())
            )
    peak = progress.measure_cpu_peak(threads=2)
    flops = runs["plain"][0]["flops_per_token"]
    tps = {k: statistics.median(r["tokens_per_second"] for r in v) for k, v in runs.items()}
    ratio = {
        k: statistics.median(
            a["tokens_per_second"] / b["tokens_per_second"] for a, b in zip(v, runs["plain"], strict=True)
        )
        for k, v in runs.items()
        if k != "plain"
    }
    cpu = benchlib.cpu_model()
    import torch

    label = {
        "recipe-1w": "Forgeline recipe: Ray Train, 1 worker × 2 threads",
        "recipe-2w": "Forgeline recipe: Ray Train, 2 workers × 1 thread, gloo DDP",
        "plain": "plain PyTorch loop, 1 process × 2 threads",
    }
    variant = f" --workers {args.workers}" if args.workers else ""
    lines = [
        f"\n## Pretraining throughput, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n",
        f"Machine: {cpu}, {os.cpu_count()} cores, no GPU; torch {torch.__version__}, Python "
        f"{platform.python_version()}. Command: `.venv/bin/python bench/pretrain_throughput.py"
        f"{' --full' if args.full else ''}{variant}` ({rounds} interleaved rounds of {steps} steps, "
        "after one untimed warm-up run).\n",
        f"Model: llama {model['hiddenSize']}×{model['numLayers']} layers, "
        f"{runs['plain'][0]['parameters'] / 1e6:.1f}M parameters; {SEQ}-token sequences, global batch "
        f"{GLOBAL_BATCH} ({GLOBAL_BATCH * SEQ} tokens/step); steady state = steps 6–{steps}. MFU against one "
        f"peak for all: {peak / 1e9:.0f} GFLOP/s (fp32 matmul, 2 threads, measured once); FLOPs/token = "
        f"6N + 12·L·d·S = {flops / 1e6:.1f} MFLOP.\n",
        "| run | tokens/s (median) | each round | vs plain (median of per-round ratios) | MFU | final loss |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for k, v in runs.items():
        each = ", ".join(f"{r['tokens_per_second']:,.0f}" for r in v)
        vs = f"{ratio[k]:.2f}×" if k in ratio else "1"
        lines.append(
            f"| {label.get(k, k)} | {tps[k]:,.0f} | {each} | {vs} | {100 * tps[k] * flops / peak:.1f}% | "
            f"{v[-1]['final_loss']:.3f} |"
        )
    benchlib.publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    sys.exit(main())
