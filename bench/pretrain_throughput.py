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
Both sides are timed the same way: steady-state tokens/s is the tokens trained after step
STEADY_FROM over the wall time they took, everything in the loop included (the recipe's from its
progress records' tokens_seen and elapsed_seconds, the plain loop's from its own clock), and both
use the recipe's optimizer (AdamW with its weight-decay groups) and LR schedule (warm-up, then
cosine), so they end at the same loss. While each variant trains, a sampler reads every process's
CPU time: the cores the training process got and the cores everything else took (Ray's daemons
and actors) say how much of a gap is the machine shared with Ray and how much is work per token.

Reports the median of the rounds and the median of the per-round ratios, and MFU of every variant
against one peak (the node's fp32 matmul probe with 2 threads, measured once here); appends a
dated section to bench/results.md.
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
STEADY_FROM = 5  # steps 1-5 are warm-up (allocator, first-touch); steady state is the steps after
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
    from forgeline_operator.cli.runlocal import run_job

    out = work / f"recipe-{tag}"
    job = parse_job(manifest(model, steps, str(out), f"bench-{tag}", workers))
    result = run_job(job, jobs, Console(stderr=True), output=None, done={}, work_dir=str(work), quiet=True)
    if not result.ok:
        raise SystemExit(f"recipe run {tag} failed: {result.status}")
    metrics = json.loads((out / "metrics.json").read_text())
    # from the first record at or after STEADY_FROM to the last: a record's own tokens_per_second
    # averages the window since the record before, which can reach back into the warm-up steps
    steady = [r for r in result.records if r.get("type") == "progress" and r["step"] >= STEADY_FROM]
    if len(steady) < 2:
        raise SystemExit(f"recipe run {tag}: {len(steady)} progress records after step {STEADY_FROM}")
    first, last = steady[0], steady[-1]
    tokens = last["tokens_seen"] - first["tokens_seen"]
    return {
        "tokens_per_second": tokens / (last["elapsed_seconds"] - first["elapsed_seconds"]),
        "final_loss": metrics["final_loss"],
        "parameters": metrics["parameters"],
        "out": out,
        "window": (first["time"], last["time"]),
    }


def run_plain(model_spec: dict, steps: int, tokenizer_dir: Path) -> dict:
    """The baseline: the same model and batches in a plain PyTorch loop, no Ray, no DDP; the
    recipe's AdamW and LR schedule (so both end at the same loss)."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from forgeline_operator.api import parse_job
    from forgeline_trainer import data as D
    from forgeline_trainer import models, optim, progress

    training = parse_job(manifest(model_spec, steps, "/unused", "bench-plain", 1)).spec.training

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
    opt = optim.adamw(model, training)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, optim.lr_lambda(training, steps))
    layers, hidden = models.shape(model)
    flops_per_token = progress.model_flops_per_token(models.active_params(model), layers, hidden, SEQ)
    ends = []  # (perf_counter, wall clock) at the end of each step, batch building included
    for step in range(steps):
        idx = D.batch_indices(blocks.n, GLOBAL_BATCH, step, 42)
        ids = torch.from_numpy(blocks.tokens[idx].astype(np.int64))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        ends.append((time.perf_counter(), time.time()))
    first, last = ends[STEADY_FROM - 1], ends[-1]
    tps = GLOBAL_BATCH * SEQ * (steps - STEADY_FROM) / (last[0] - first[0])
    return {
        "tokens_per_second": tps,
        "final_loss": float(loss),
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token,
        "window": (first[1], last[1]),
    }


class CpuSampler:
    """Every process's CPU time, read twice a second by a child process of its own (so its own
    reading counts as "all else" for both sides); `share` then says how many cores the training
    process and everything else used over a wall-clock window."""

    _CHILD = (
        "import json, sys, time, psutil\n"
        "while True:\n"
        "    snap = {}\n"
        "    for p in psutil.process_iter(['cmdline']):\n"
        "        try:\n"
        "            t = p.cpu_times()\n"
        "            snap[p.pid] = [' '.join(p.info['cmdline'] or []), t.user + t.system]\n"
        "        except (psutil.Error, OSError):\n"
        "            pass\n"
        "    print(json.dumps([time.time(), snap]), flush=True)\n"
        "    time.sleep(0.5)\n"
    )

    def __enter__(self) -> CpuSampler:
        import subprocess

        self._file = tempfile.NamedTemporaryFile(mode="w+", prefix="cpu-sampler-", suffix=".jsonl")
        self._proc = subprocess.Popen([sys.executable, "-c", self._CHILD], stdout=self._file)
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.kill()
        self._proc.wait()
        self._file.close()

    def share(self, window: tuple[float, float], trainer: str | int) -> tuple[float, float] | None:
        """(cores the trainer used, cores all other processes used) between the first snapshot in
        the window and the last; trainer = a pid, or a substring of its command line."""
        lines = Path(self._file.name).read_text().splitlines()
        snaps = [json.loads(line) for line in lines if line.endswith("]")]
        inside = [s for s in snaps if window[0] <= s[0] <= window[1]]
        if len(inside) < 2:
            return None
        (ta, a), (tb, b) = inside[0], inside[-1]
        mine = others = 0.0
        for pid, (cmd, cpu) in b.items():
            if pid not in a:
                continue
            used = cpu - a[pid][1]
            if int(pid) == trainer if isinstance(trainer, int) else trainer in cmd:
                mine += used
            else:
                others += used
        return mine / (tb - ta), others / (tb - ta)


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
    from forgeline_operator.rayclient.localray import LocalRay
    from forgeline_operator.rayclient.rayjobs import RayJobs, local_python
    from forgeline_trainer import progress

    # before Ray starts, best of 3: probed after the runs, while Ray shut down, it read 81 GFLOP/s
    # against ~180 (2026-11-25 11:09) and put both MFUs over 100%
    peak = max(progress.measure_cpu_peak(threads=2) for _ in range(3))
    runs: dict[str, list[dict]] = {**{f"recipe-{w}w": [] for w in workers}, "plain": []}
    with (
        tempfile.TemporaryDirectory(prefix="forgeline-bench-") as tmp,
        LocalRay() as head,
        CpuSampler() as sampler,
    ):
        work = Path(tmp)
        jobs = RayJobs(head.address, python=local_python(), token=head.token)
        # one untimed run first: the first Ray Train run on a fresh head was 20-25% slower than
        # the later ones in both quick runs of 2026-11-25 (3,508 and 3,828 tok/s against ~4,700)
        run_recipe(jobs, model, 8, work, 1, "warm-up")
        for i in range(rounds):
            for w in workers:
                r = run_recipe(jobs, model, steps, work, w, f"{w}w-{i}")
                r["cores"] = sampler.share(r["window"], "ray::RayTrainWorker")
                runs[f"recipe-{w}w"].append(r)
            r = run_plain(model, steps, runs[f"recipe-{workers[0]}w"][0]["out"])
            r["cores"] = sampler.share(r["window"], os.getpid())
            runs["plain"].append(r)
            print(
                f"round {i}: "
                + ", ".join(f"{k} {v[-1]['tokens_per_second']:,.0f} tok/s" for k, v in runs.items())
            )
    flops = runs["plain"][0]["flops_per_token"]
    tps = {k: statistics.median(r["tokens_per_second"] for r in v) for k, v in runs.items()}
    ratio = {
        k: statistics.median(
            a["tokens_per_second"] / b["tokens_per_second"] for a, b in zip(v, runs["plain"], strict=True)
        )
        for k, v in runs.items()
        if k != "plain"
    }
    cores = {
        k: tuple(statistics.median(r["cores"][j] for r in v if r["cores"]) for j in (0, 1))
        if any(r["cores"] for r in v)
        else None
        for k, v in runs.items()
    }
    cpu = benchlib.cpu_model()
    import torch

    label = {
        "recipe-1w": "Forgeline recipe: Ray Train, 1 worker × 2 threads",
        "recipe-2w": "Forgeline recipe: Ray Train, 2 workers × 1 thread, gloo DDP",
        "plain": "plain PyTorch loop, 1 process × 2 threads",
    }
    variant = (f" --workers {args.workers}" if args.workers else "") + (
        f" --rounds {args.rounds}" if args.rounds else ""
    )
    lines = [
        f"\n## Pretraining throughput, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n",
        f"Machine: {cpu}, {os.cpu_count()} cores, no GPU; torch {torch.__version__}, Python "
        f"{platform.python_version()}. Command: `.venv/bin/python bench/pretrain_throughput.py"
        f"{' --full' if args.full else ''}{variant}` ({rounds} interleaved rounds of {steps} steps, "
        "after one untimed warm-up run).\n",
        f"Model: llama {model['hiddenSize']}×{model['numLayers']} layers, "
        f"{runs['plain'][0]['parameters'] / 1e6:.1f}M parameters; {SEQ}-token sequences, global batch "
        f"{GLOBAL_BATCH} ({GLOBAL_BATCH * SEQ} tokens/step); steady state = steps {STEADY_FROM + 1}–{steps}, "
        "timed the same way for both (tokens after step 5 over their wall time, everything in the loop "
        "included); the same AdamW and LR schedule for both. Cores: CPU time over the steady window of "
        "the training process(es), and of every other process on the machine (Ray's daemons and "
        "actors, this bench). MFU against one "
        f"peak for all: {peak / 1e9:.0f} GFLOP/s (fp32 matmul, 2 threads, measured once); FLOPs/token = "
        f"6N + 12·L·d·S = {flops / 1e6:.1f} MFLOP.\n",
        "| run | tokens/s (median) | each round | vs plain (median of per-round ratios) | MFU "
        "| cores: training | cores: all else | tokens/s per training core | final loss |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k, v in runs.items():
        each = ", ".join(f"{r['tokens_per_second']:,.0f}" for r in v)
        vs = f"{ratio[k]:.2f}×" if k in ratio else "1"
        used = cores[k]
        core_cols = (
            f"{used[0]:.2f} | {used[1]:.2f} | {tps[k] / used[0]:,.0f}" if used and used[0] else "– | – | –"
        )
        lines.append(
            f"| {label.get(k, k)} | {tps[k]:,.0f} | {each} | {vs} | {100 * tps[k] * flops / peak:.1f}% | "
            f"{core_cols} | {v[-1]['final_loss']:.3f} |"
        )
    benchlib.publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    sys.exit(main())
