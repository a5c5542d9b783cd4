"""Fine-tuning outcomes: full vs LoRA vs QLoRA vs prompt tuning on one held-out task, in one run.

    .venv/bin/python bench/finetune_outcomes.py            # quick: 2M llama, ~5 min on 2 cores
    .venv/bin/python bench/finetune_outcomes.py --full     # 20M llama, ~19 min on 2 cores

(Both measured with pretraining included; a cached base saves ~1 min quick, ~7 min full.)

Reproduces at small scale the usual claims: LoRA reaches about 99% of full fine-tuning's quality
while training 0.1-1% of the parameters; QLoRA cuts memory about tenfold; prompt tuning reaches
90-95%. Every job goes through `forgeline run`'s path (runlocal.run_job: the manifest becomes a job
config, is submitted through the Ray Jobs API of one embedded Ray head and followed to the end),
one at a time, each with 1 Ray Train worker × 2 threads so that the rank-0 peak RSS is comparable.

1. Base model: a llama TrainingJob pretrained from scratch on the bundled corpus
   (examples/data/corpus.jsonl: a made-up world of 12 animals with a colour, sound, home and food).
   Cached in $FORGELINE_CACHE/bench/finetune-outcomes/base-<size>-<hash of its manifest and the
   corpus files>: a re-run with the same manifest skips pretraining.
2. Task: alpaca-format questions built from examples/data/generate.py's ANIMALS and QUESTIONS
   (written into the cache, deterministically). Each animal's four questions are split two and two:
   the fine-tunes train on 24 (animal, question) pairs and are evaluated (spec.evaluation.sources)
   on the other 24, whose answers they never saw in fine-tuning but the base saw in pretraining.
   The held-out prompts also use names the training prompts do not use. So the eval measures
   whether fine-tuning makes the model answer, in the new format, with what pretraining taught it.
3. Jobs, same data, steps, batch and seed: `base` (the base model evaluated as it is: a full
   fine-tune of 1 step at learning rate 1e-9, so the trainer's own eval code measures it), then
   full, lora, qlora (4-bit NF4 base, bitsandbytes' CPU path) and prompt-tuning, each at its
   method's usual learning rate (METHODS).
4. Table: held-out response-token loss and next-token accuracy (± 95% half-widths from the
   trainer), quality vs full, trainable fraction, peak RSS of the rank-0 worker, training seconds
   and submit-to-done seconds; plus the base weights' in-memory size (fp32 vs 4-bit, measured with
   transformers' get_memory_footprint in this process) and the model state it implies.

Appends a dated section to bench/results.md (`--out`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import benchlib  # bench/ is on sys.path when a bench runs as a script

REPO = Path(__file__).resolve().parents[1]
SEED = 42
EVAL_BATCH = 16

MODELS = {
    "quick": {
        "architecture": "llama",
        "hiddenSize": 192,
        "numLayers": 4,
        "numHeads": 6,
        "numKvHeads": 6,
        "intermediateSize": 512,
    },
    "full": {
        "architecture": "llama",
        "hiddenSize": 448,
        "numLayers": 8,
        "numHeads": 8,
        "numKvHeads": 8,
        "intermediateSize": 1216,
    },
}
PRETRAIN = {  # steps × batch × sequence length: several passes over the ~100k-token corpus
    "quick": {"maxSteps": 150, "globalBatchSize": 16, "sequenceLength": 128, "learningRate": 2e-3},
    "full": {"maxSteps": 160, "globalBatchSize": 16, "sequenceLength": 128, "learningRate": 1e-3},
}
FINETUNE = {
    "quick": {"maxSteps": 30, "globalBatchSize": 16, "microBatchSize": 16, "warmupSteps": 3},
    "full": {"maxSteps": 40, "globalBatchSize": 16, "microBatchSize": 16, "warmupSteps": 4},
}
LORA = {"r": 2, "alpha": 4, "dropout": 0.0, "targetModules": ["all-linear"]}
METHODS: dict[str, dict[str, Any]] = {
    # the base model as it is: one step at a negligible learning rate, evaluated by the trainer
    "base": {"method": "full", "learningRate": 1e-9, "maxSteps": 1},
    "full": {"method": "full", "learningRate": 5e-4},
    "lora": {"method": "lora", "learningRate": 5e-3, "lora": LORA},
    "qlora": {
        "method": "qlora",
        "learningRate": 5e-3,
        "lora": LORA,
        "quantization": {
            "bits": 4,
            "quantType": "nf4",
            "doubleQuant": True,
            "computeDtype": "float32",
            "allowCpu": True,
        },
    },
    "prompt-tuning": {
        "method": "prompt-tuning",
        "learningRate": 3e-2,
        "promptTuning": {"numVirtualTokens": 16, "initText": "Answer the question about the animal."},
    },
}
RESOURCES = {"workers": 1, "cpu": "2", "memory": "4Gi"}


def cache_root() -> Path:
    root = Path(os.environ.get("FORGELINE_CACHE") or Path.home() / ".cache/forgeline")
    return root / "bench" / "finetune-outcomes"


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# -- the task ----------------------------------------------------------------------------------


def _world() -> Any:
    """examples/data/generate.py as a module (ANIMALS, QUESTIONS, NAMES), without running it."""
    spec = importlib.util.spec_from_file_location(
        "forgeline_example_data", REPO / "examples/data/generate.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def task_split() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train pairs, held-out pairs) of (animal, question index): animal i holds out questions
    i mod 4 and i+1 mod 4, so each question is held out for 6 animals and trained on the other 6."""
    world = _world()
    train, held = [], []
    for i, animal in enumerate(world.ANIMALS):
        for q in range(len(world.QUESTIONS)):
            (held if q in (i % 4, (i + 1) % 4) else train).append((animal, q))
    return train, held


def task_rows(pairs: list[tuple[str, int]], names: list[str]) -> list[dict[str, str]]:
    """Alpaca records for these pairs: the plain question, and "<name> asks: <question>", each as
    the instruction or as the input of one of two fixed instructions (generate.py's two forms, and
    chat.jsonl's system line as a third)."""
    world = _world()
    rows = []
    for animal, q in pairs:
        question, answer, _ = world.QUESTIONS[q]
        colour, sound, home, food = world.ANIMALS[animal]
        facts = {"a": animal, "colour": colour, "sound": sound, "home": home, "food": food}
        out = answer.format(**facts)
        for asked in [question.format(**facts)] + [f"{n} asks: {question.format(**facts)}" for n in names]:
            rows.append({"instruction": asked, "input": "", "output": out})
            for instruction in (
                "Answer the question about the animal.",
                "You answer questions about animals.",
            ):
                rows.append({"instruction": instruction, "input": asked, "output": out})
    return rows


def write_task(cache: Path) -> tuple[Path, Path, dict[str, int]]:
    """train.jsonl and heldout.jsonl in the cache (regenerated each run: deterministic, instant)."""
    world = _world()
    train_pairs, held_pairs = task_split()
    names = list(world.NAMES)
    train = task_rows(train_pairs, names[:5])
    held = task_rows(held_pairs, names[5:])
    rows = {"train": train, "heldout": held}
    task_dir = cache / f"task-{digest(rows)}"
    task_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, recs in rows.items():
        paths[split] = task_dir / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in recs))
    info = {
        "train_pairs": len(train_pairs),
        "held_pairs": len(held_pairs),
        "train_rows": len(train),
        "held_rows": len(held),
    }
    return paths["train"], paths["heldout"], info


# -- manifests ---------------------------------------------------------------------------------


def pretrain_manifest(size: str) -> dict[str, Any]:
    p = PRETRAIN[size]
    return {
        "apiVersion": "forgeline.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": f"outcomes-base-{size}"},
        "spec": {
            "model": MODELS[size],
            "data": {
                "sources": [{"uri": str(REPO / "examples/data/corpus.jsonl"), "format": "jsonl"}],
                "textField": "text",
                "tokenizer": {"vocabSize": 1024},
                "sequenceLength": p["sequenceLength"],
                "packing": True,
            },
            "evaluation": {
                "sources": [{"uri": str(REPO / "examples/data/corpus_eval.jsonl")}],
                "maxBatches": 8,
            },
            "training": {
                "maxSteps": p["maxSteps"],
                "globalBatchSize": p["globalBatchSize"],
                "microBatchSize": p["globalBatchSize"],
                "learningRate": p["learningRate"],
                "warmupSteps": 20,
                "schedule": "cosine",
                "seed": SEED,
            },
            "resources": RESOURCES,
            "checkpointing": {"intervalSteps": 100_000, "resume": "never"},
        },
    }


def finetune_manifest(
    size: str, name: str, base: Path, train: Path, held: Path, held_rows: int, out: Path, ckpt: Path
) -> dict[str, Any]:
    m = dict(METHODS[name])
    training = {**FINETUNE[size], "learningRate": m.pop("learningRate"), "seed": SEED}
    if "maxSteps" in m:
        training.update(maxSteps=m.pop("maxSteps"), warmupSteps=0)
    return {
        "apiVersion": "forgeline.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"outcomes-{name}-{size}"},
        "spec": {
            "baseModel": {"path": str(base)},
            **m,
            "dataset": {"sources": [{"uri": str(train)}], "format": "alpaca", "maxSequenceLength": 128},
            "evaluation": {
                "sources": [{"uri": str(held)}],
                "maxBatches": -(-held_rows // EVAL_BATCH) + 1,  # every held-out example
            },
            "training": training,
            "resources": RESOURCES,
            "checkpointing": {"storage": str(ckpt), "intervalSteps": 100_000, "resume": "never"},
            "output": {"uri": str(out), **({"save": "adapter"} if m["method"] != "full" else {})},
        },
    }


# -- running -----------------------------------------------------------------------------------


def run(jobs: Any, manifest: dict[str, Any], out: Path) -> dict[str, Any]:
    """One job through `forgeline run`'s path; its metrics.json plus the submit-to-done seconds."""
    from rich.console import Console

    from forgeline_operator.api import parse_job
    from forgeline_operator.cli.runlocal import run_job

    if out.exists():
        shutil.rmtree(out)
    manifest["spec"]["output"] = {**manifest["spec"].get("output", {}), "uri": str(out)}
    t0 = time.monotonic()
    result = run_job(
        parse_job(manifest), jobs, Console(stderr=True), output=None, done={}, work_dir=str(REPO), quiet=True
    )
    seconds = time.monotonic() - t0
    if not result.ok:
        raise SystemExit(f"{manifest['metadata']['name']} failed: {result.status}")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["job_seconds"] = seconds
    return metrics


def base_model(jobs: Any, size: str, cache: Path, scratch: Path) -> tuple[Path, dict[str, Any], bool]:
    """The pretrained base (cached by its manifest's hash): (directory, its metrics, was cached)."""
    manifest = pretrain_manifest(size)
    # the key: the manifest with the repository's path left out, and the corpus files' contents
    key = json.loads(json.dumps(manifest).replace(str(REPO), "<repo>"))
    key["corpus"] = [
        hashlib.sha256((REPO / f"examples/data/{n}").read_bytes()).hexdigest()
        for n in ("corpus.jsonl", "corpus_eval.jsonl")
    ]
    base = cache / f"base-{size}-{digest(key)}"
    if (base / "metrics.json").exists() and (base / "config.json").exists():
        return base, json.loads((base / "metrics.json").read_text()), True
    manifest["spec"]["checkpointing"]["storage"] = str(scratch / "pretrain-ckpt")
    tmp = cache / f"{base.name}.partial"
    metrics = run(jobs, manifest, tmp)
    if base.exists():
        shutil.rmtree(base)
    tmp.rename(base)
    return base, metrics, False


def weights_footprint(base: Path) -> dict[str, int]:
    """Bytes the base model's weights take in memory: fp32 as loaded for full/lora/prompt tuning,
    and 4-bit NF4 (double quantisation) as QLoRA's base is loaded (transformers' get_memory_footprint)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    fp32 = AutoModelForCausalLM.from_pretrained(base).get_memory_footprint()
    q = METHODS["qlora"]["quantization"]
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q["quantType"],
        bnb_4bit_use_double_quant=q["doubleQuant"],
        bnb_4bit_compute_dtype=getattr(torch, q["computeDtype"]),
    )
    nf4 = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=bnb, device_map={"": "cpu"}
    ).get_memory_footprint()
    return {"fp32": fp32, "nf4": nf4}


# -- report ------------------------------------------------------------------------------------


def _pm(value: float, ci: float | None, digits: int = 3) -> str:
    return f"{value:.{digits}f} ± {ci:.{digits}f}" if ci is not None else f"{value:.{digits}f}"


def trainable_fraction(results: dict[str, dict[str, Any]], name: str) -> float:
    """metrics.json's trainable_fraction, except for qlora: its `parameters` counts each 4-bit
    weight as stored (two per byte, bitsandbytes' Params4bit.numel()), which halves the quantized
    layers; here the adapter is divided by the unquantized base's count plus the adapter, as for lora."""
    m = results[name]
    if m["method"] != "qlora":
        return m["trainable_fraction"]
    return m["trainable_parameters"] / (results["base"]["parameters"] + m["trainable_parameters"])


def table(results: dict[str, dict[str, Any]], footprint: dict[str, int]) -> list[str]:
    base_loss = results["base"]["final_eval"]["eval_loss"]
    full = results["full"]["final_eval"]
    gain_full = base_loss - full["eval_loss"]
    lines = [
        "| method | held-out loss ± 95% | token accuracy ± 95% | accuracy vs full | loss gain vs full "
        "| trainable | peak RSS, rank 0 | weights in memory | model state (computed) | train s | job s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in results.items():
        ev = m["final_eval"]
        acc_ratio = ev["accuracy"] / full["accuracy"]
        gain = (base_loss - ev["eval_loss"]) / gain_full if gain_full else float("nan")
        weights = footprint["nf4"] if m["method"] == "qlora" else footprint["fp32"]
        # fp32 gradient + AdamW's two moments per trainable parameter
        state = weights + 12 * m["trainable_parameters"]
        label = "base (no fine-tuning)" if name == "base" else name
        trainable = "—" if name == "base" else f"{100 * trainable_fraction(results, name):.2f}%"
        lines.append(
            f"| {label} | {_pm(ev['eval_loss'], ev.get('eval_loss_ci95'))} "
            f"| {_pm(100 * ev['accuracy'], 100 * ev['accuracy_ci95'], 1)}% "
            f"| {100 * acc_ratio:.1f}% | {'—' if name == 'base' else f'{100 * gain:.1f}%'} | {trainable} "
            f"| {m['peak_rss_bytes'] / 2**20:,.0f} MiB | {weights / 2**20:.2f} MiB "
            f"| {'—' if name == 'base' else f'{state / 2**20:.2f} MiB'} "
            f"| {m['wall_seconds']:.0f} | {m['job_seconds']:.0f} |"
        )
    return lines


def versions() -> str:
    from importlib.metadata import version

    pkgs = ["torch", "transformers", "peft", "bitsandbytes", "ray"]
    return ", ".join(f"{p} {version(p)}" for p in pkgs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="~20M-parameter base, more fine-tuning steps")
    parser.add_argument("--out", default=str(REPO / "bench/results.md"))
    args = parser.parse_args()
    size = "full" if args.full else "quick"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from forgeline_operator.rayclient.localray import LocalRay
    from forgeline_operator.rayclient.rayjobs import RayJobs, local_python

    started, load_before = time.monotonic(), os.getloadavg()
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    train, held, info = write_task(cache)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="forgeline-outcomes-") as tmp, LocalRay() as head:
        jobs = RayJobs(head.address, python=local_python(), token=head.token)
        base, base_metrics, cached = base_model(jobs, size, cache, Path(tmp))
        print(f"base model: {base} ({'cached' if cached else 'pretrained now'})", file=sys.stderr)
        for name in METHODS:
            work = Path(tmp) / name
            manifest = finetune_manifest(
                size, name, base, train, held, info["held_rows"], work / "out", work / "ckpt"
            )
            results[name] = run(jobs, manifest, work / "out")
            m, ev = results[name], results[name]["final_eval"]
            print(
                f"{name}: eval_loss {ev['eval_loss']:.4f} ± {ev['eval_loss_ci95']:.4f}, "
                f"accuracy {ev['accuracy']:.4f}, {ev['eval_tokens']:.0f} tokens, "
                f"trainable {trainable_fraction(results, name):.4%}, "
                f"RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB, {m['job_seconds']:.0f} s",
                file=sys.stderr,
            )
    footprint = weights_footprint(base)
    elapsed, load_after = time.monotonic() - started, os.getloadavg()

    ev0 = results["full"]["final_eval"]
    pre_ev = base_metrics.get("final_eval", {})
    p, f = PRETRAIN[size], FINETUNE[size]
    lines = [
        f"\n## Fine-tuning outcomes ({size}), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n",
        f"Machine: {benchlib.cpu_model()}, {os.cpu_count()} cores, no GPU, shared: other benchmarks "
        "ran at the same "
        f"time (load average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end). "
        f"{versions()}, Python {platform.python_version()}. Command: `.venv/bin/python "
        f"bench/finetune_outcomes.py{' --full' if args.full else ''}` ({elapsed / 60:.1f} min"
        f"{', base model from the cache' if cached else ', pretraining included'}).\n",
        f"Base: llama {MODELS[size]['hiddenSize']}×{MODELS[size]['numLayers']} layers, "
        f"{base_metrics['parameters'] / 1e6:.1f}M parameters, pretrained from scratch on "
        f"examples/data/corpus.jsonl ({p['maxSteps']} steps × {p['globalBatchSize']} × "
        f"{p['sequenceLength']} tokens; corpus_eval loss "
        f"{pre_ev.get('eval_loss', float('nan')):.3f}). Task: alpaca questions about the animals; "
        f"fine-tuned on {info['train_pairs']} (animal, question) pairs ({info['train_rows']} prompts), "
        f"evaluated on the other {info['held_pairs']} pairs ({info['held_rows']} prompts, other names in "
        f"them, {ev0['eval_tokens']:.0f} response tokens). Every method: {f['maxSteps']} steps × batch "
        f"{f['globalBatchSize']}, seed {SEED}, 1 worker × 2 threads, fp32; learning rate full "
        f"{METHODS['full']['learningRate']:g}, lora/qlora {METHODS['lora']['learningRate']:g} "
        f"(r {LORA['r']}, alpha {LORA['alpha']}, all linear layers), prompt tuning "
        f"{METHODS['prompt-tuning']['learningRate']:g} (16 virtual tokens). The base row is a full "
        "fine-tune of 1 step at learning rate 1e-9: the base model measured by the same eval code.\n",
        *table(results, footprint),
        "",
        "Accuracy vs full = accuracy / full's accuracy. Loss gain vs full = (base loss − loss) / "
        "(base loss − full's loss). ± = the trainer's 95% half-widths over tokens, a lower bound: the "
        f"held-out tokens come from only {info['held_pairs']} distinct answers, each asked "
        f"{info['held_rows'] // info['held_pairs']} ways. Weights in memory: the base as each method "
        "loads it (fp32, or 4-bit NF4 for qlora), transformers' get_memory_footprint in the bench "
        "process; model state = that + 12 bytes (fp32 gradient and two AdamW moments) per trainable "
        "parameter. Train s: the trainer's wall_seconds; job s: submit to done, Ray worker start-up "
        "included.",
    ]
    benchlib.publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
