"""Fine-tuning throughput: Forgeline's LoRA and DPO recipes vs plain PEFT and plain TRL, interleaved.

    .venv/bin/python bench/finetune_throughput.py            # quick: ~3M llama, 3 rounds
    .venv/bin/python bench/finetune_throughput.py --full     # ~20M llama, 5 rounds, more steps

One base model (a llama built from its config, with a byte-level BPE tokenizer trained on the
bundled corpus: throughput does not depend on the weights' values), in one run of this script,
repeated in interleaved rounds:

1. LoRA SFT (r 16, every linear layer) on examples/data/chat.jsonl, global batch 16, 1 worker × 2
   threads through the Ray Jobs API (the recipe) vs a plain loop in this process with 2 threads:
   `peft.get_peft_model`, AdamW on the adapter, the same tokenized batches in the same order;
2. DPO (LoRA policy, frozen reference = the base) on examples/data/preference.jsonl, global batch
   16, 1 worker × 2 threads (the recipe, which drives TRL's DPOTrainer under Ray Train) vs TRL's
   DPOTrainer run as TRL documents it, in this process with 2 threads.

Steady state: optimizer steps/s past step 5 (same batches, so the ratio of steps/s is the ratio of
tokens/s): for the plain loops from step 5 to the last; for the recipes between their first
progress record past step 5 (records come every 5 s) and the last. Reports the median of each
variant and the median of per-round ratios and appends a dated section to bench/results.md.
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
from typing import Any

import benchlib  # bench/ is on sys.path when a bench runs as a script

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, WARM = 16, 5
MODELS = {
    "quick": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 688},
    "full": {
        "hidden_size": 384,
        "num_hidden_layers": 11,
        "num_attention_heads": 6,
        "intermediate_size": 1024,
    },
}
SFT_SEQ, DPO_SEQ = 256, 96
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]}


def _build_base(size: str, out: Path) -> int:
    """A llama of the given shape with a tokenizer trained on the bundled corpus; its parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgeline_trainer import data as D

    docs = [json.loads(line)["text"] for line in (REPO / "examples/data/corpus.jsonl").open()]
    tokenizer = D.train_tokenizer(docs, 4000, out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **MODELS[size],
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def _manifest(method: str, base: Path, out: Path, steps: int) -> dict[str, Any]:
    data = (
        {
            "sources": [{"uri": str(REPO / "examples/data/chat.jsonl")}],
            "format": "chat",
            "maxSequenceLength": SFT_SEQ,
        }
        if method == "lora"
        else {
            "sources": [{"uri": str(REPO / "examples/data/preference.jsonl")}],
            "format": "preference",
            "maxSequenceLength": DPO_SEQ,
        }
    )
    return {
        "apiVersion": "forgeline.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"bench-{method}"},
        "spec": {
            "baseModel": {"path": str(base)},
            "method": method,
            "lora": LORA,
            "dataset": data,
            "evaluation": {"holdoutFraction": 0.0},
            "training": {
                "maxSteps": steps,
                "globalBatchSize": GLOBAL_BATCH,
                "microBatchSize": GLOBAL_BATCH,
                "learningRate": 1e-3,
                "warmupSteps": 0,
            },
            "resources": {"workers": 1, "cpu": "2", "memory": "4Gi"},
            "checkpointing": {"intervalSteps": 10_000},
            "output": {"uri": str(out)},
        },
    }


def _steady_rate(points: list[tuple[int, float]]) -> float:
    """Optimizer steps per second between the first point at or past step WARM and the last. The
    trainer writes a progress record every 5 s (and at the end), so a recipe run gives a few
    points: the rate is then over the steps between the first record and the last."""
    after = [(s, t) for s, t in points if s >= WARM]
    if len(after) < 2:
        raise SystemExit(f"too few progress records past step {WARM} ({points}): raise --steps")
    (s0, t0), (s1, t1) = after[0], after[-1]
    return (s1 - s0) / (t1 - t0)


def run_recipe(jobs: Any, method: str, base: Path, work: Path, steps: int, tag: str) -> float:
    from rich.console import Console

    from forgeline_operator.api import parse_job
    from forgeline_operator.cli.runlocal import run_job

    job = parse_job(_manifest(method, base, work / f"recipe-{tag}", steps))
    result = run_job(job, jobs, Console(stderr=True), output=None, done={}, work_dir=str(work), quiet=True)
    if not result.ok:
        raise SystemExit(f"recipe {method} run {tag} failed: {result.status}")
    points = [(r["step"], r["elapsed_seconds"]) for r in result.records if r.get("type") == "progress"]
    return _steady_rate(points)


def plain_lora(base: Path, steps: int) -> float:
    """The SFT baseline: PEFT LoRA in a plain PyTorch loop, the recipe's batches in its order."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from forgeline_trainer import data as D
    from forgeline_trainer import sft_data

    torch.set_num_threads(2)
    tokenizer = D.load_tokenizer(str(base))
    records = [json.loads(line) for line in (REPO / "examples/data/chat.jsonl").open()]
    examples = [sft_data.tokenize_example(r, "chat", tokenizer, SFT_SEQ, False) for r in records]
    torch.manual_seed(42)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear"),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    points = []
    start = time.perf_counter()
    for step in range(steps):
        idx = D.batch_indices(len(examples), GLOBAL_BATCH, step, 42)
        batch = sft_data.collate([examples[i] for i in idx], tokenizer.pad_token_id, "cpu")
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        points.append((step + 1, time.perf_counter() - start))
    return _steady_rate(points)


def plain_dpo(base: Path, steps: int, scratch: Path) -> float:
    """The DPO baseline: TRL's DPOTrainer as its documentation runs it, LoRA policy, no Ray."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from forgeline_trainer import data as D

    torch.set_num_threads(2)
    rows = [json.loads(line) for line in (REPO / "examples/data/preference.jsonl").open()]
    points: list[tuple[int, float]] = []

    class _Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            points.append((state.global_step, time.perf_counter()))

    args = DPOConfig(
        output_dir=str(scratch / "trl"),
        max_steps=steps,
        per_device_train_batch_size=GLOBAL_BATCH,
        learning_rate=1e-3,
        max_length=DPO_SEQ,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=42,
    )
    trainer = DPOTrainer(
        model=str(base),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=D.load_tokenizer(str(base)),
        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear"),
        callbacks=[_Clock()],
    )
    trainer.train()
    return _steady_rate(points)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="~20M llama, 5 rounds, 80 steps")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--methods", default=None, help="lora, dpo or lora,dpo (quick: lora; full: both)")
    parser.add_argument("--out", default=str(REPO / "bench/results.md"))
    args = parser.parse_args()
    size = "full" if args.full else "quick"
    methods = (args.methods or ("lora,dpo" if args.full else "lora")).split(",")
    rounds = args.rounds or (5 if args.full else 3)
    steps = args.steps or (80 if args.full else 60)  # records come every 5 s: enough of them
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from forgeline_operator.rayclient.localray import LocalRay
    from forgeline_operator.rayclient.rayjobs import RayJobs, local_python

    runs: dict[str, list[float]] = {}
    if "lora" in methods:
        runs |= {"recipe-lora": [], "peft": []}
    if "dpo" in methods:
        runs |= {"recipe-dpo": [], "trl": []}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="forgeline-bench-ft-") as tmp, LocalRay() as head:
        work = Path(tmp)
        base = work / "base"
        parameters = _build_base(size, base)
        jobs = RayJobs(head.address, python=local_python(), token=head.token)
        # untimed: the first plain loop in this process ran at 0.57x of the later ones (2026-11-25)
        plain_lora(base, WARM + 3)
        for i in range(rounds):
            if "lora" in methods:
                runs["recipe-lora"].append(run_recipe(jobs, "lora", base, work, steps, f"lora-{i}"))
                runs["peft"].append(plain_lora(base, steps))
            if "dpo" in methods:
                runs["recipe-dpo"].append(run_recipe(jobs, "dpo", base, work, steps, f"dpo-{i}"))
                runs["trl"].append(plain_dpo(base, steps, work / f"trl-{i}"))
            print(f"round {i}: " + ", ".join(f"{k} {v[-1]:.2f} steps/s" for k, v in runs.items()), flush=True)
    wall = time.monotonic() - started
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = {
        k: statistics.median(a / b for a, b in zip(runs[k], runs[base_k], strict=True))
        for k, base_k in (("recipe-lora", "peft"), ("recipe-dpo", "trl"))
        if k in runs
    }
    cpu = benchlib.cpu_model()
    import peft
    import torch
    import trl

    label = {
        "recipe-lora": "Forgeline LoRA recipe (Ray Train, 1 worker × 2 threads)",
        "peft": "plain PEFT LoRA loop (1 process × 2 threads)",
        "recipe-dpo": "Forgeline DPO recipe (TRL DPOTrainer under Ray Train, 1 worker × 2 threads)",
        "trl": "plain TRL DPOTrainer (1 process × 2 threads)",
    }
    vs = {"recipe-lora": "peft", "recipe-dpo": "trl"}
    flags = "".join(f" --{k} {v}" for k, v in (("steps", args.steps), ("methods", args.methods)) if v)
    lines = [
        "\n## Fine-tuning throughput: LoRA vs plain PEFT, DPO vs plain TRL, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n",
        f"Machine: {cpu}, {os.cpu_count()} cores, no GPU; torch {torch.__version__}, "
        f"peft {peft.__version__}, "
        f"trl {trl.__version__}, Python {platform.python_version()}. Command: "
        f"`.venv/bin/python bench/finetune_throughput.py{' --full' if args.full else ''}{flags}` "
        f"({rounds} interleaved "
        f"rounds of {steps} steps; {wall / 60:.1f} min in all).\n",
        f"Base: llama {MODELS[size]['hidden_size']}×{MODELS[size]['num_hidden_layers']} layers, "
        f"{parameters / 1e6:.1f}M parameters; LoRA r {LORA['r']} on every linear layer; global batch "
        f"{GLOBAL_BATCH}; SFT on chat.jsonl (≤ {SFT_SEQ} tokens), DPO on preference.jsonl (≤ {DPO_SEQ} "
        f"tokens). Steady state = past step {WARM} (the recipes: from their first progress record "
        f"past it, records come every 5 s, to step {steps}); same batches, so the steps/s ratio is the "
        "tokens/s ratio.\n",
        "| run | steps/s (median) | each round | vs plain (median of per-round ratios) |",
        "| --- | ---: | --- | ---: |",
    ]
    for k, v in runs.items():
        shown = f"{ratio[k]:.2f}× {vs[k]}" if k in ratio else "1"
        lines.append(f"| {label[k]} | {med[k]:.2f} | {', '.join(f'{x:.2f}' for x in v)} | {shown} |")
    benchlib.publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    sys.exit(main())
