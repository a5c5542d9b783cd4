"""Optimizers: memory and speed of each `spec.training.optimizer` that runs on a CPU, for the full
and LoRA fine-tunes of the outcomes bench's base, in one run.

    .venv/bin/python bench/optimizers.py                 # quick: 2M llama, 2 repeats, ~15 min on 2 cores
    .venv/bin/python bench/optimizers.py --full          # 20M llama
    .venv/bin/python bench/optimizers.py --repeats 3

Every job goes through `forgeline run`'s path (as bench/finetune_outcomes.py, whose base model,
task and manifests it reuses: the same cached base, 1 Ray Train worker × 2 threads), with only
spec.training.optimizer changed. The (method, optimizer) jobs run in interleaved rounds (every
pair once per round), and each figure is the median over rounds:

- optimizer state: the bytes of the optimizer's state tensors after training, as the trainer
  measured them (metrics.json's optimizer_state_bytes), next to `forgeline validate --fit`'s
  estimate for the same job (its optimizer states, fp32 on a CPU);
- peak RSS of the rank-0 worker (the Python, torch and Ray runtime dominate it; the difference
  between optimizers is the state and the optimizer's own workspace);
- tokens/s (metrics.json's last progress record) and training seconds;
- held-out loss and token accuracy, to show what the memory costs in quality, if anything.

The paged optimizers need CUDA (the spec refuses them on a CPU): their rows, and
`torch.cuda.max_memory_allocated` against the estimate, need a GPU run (see docs/optimizers.md).

Appends a dated section to bench/results.md (`--out`).
"""

from __future__ import annotations

import argparse
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
import finetune_outcomes as outcomes

REPO = Path(__file__).resolve().parents[1]
OPTIMIZERS = ["adamw", "adamw-8bit", "adafactor"]
METHODS = ["full", "lora"]


def manifest(size: str, method: str, optimizer: str, base: Path, task: tuple[Path, Path, dict], work: Path):
    """The outcomes bench's fine-tune of `method`, trained with `optimizer`."""
    train, held, info = task
    doc = outcomes.finetune_manifest(
        size, method, base, train, held, info["held_rows"], work / "out", work / "ckpt"
    )
    doc["metadata"]["name"] = f"opt-{method}-{optimizer}-{size}"
    doc["spec"]["training"]["optimizer"] = optimizer
    return doc


def estimated_state(doc: dict[str, Any], base: Path) -> int:
    """`forgeline validate --fit`'s optimizer states for the job (fp32 on a CPU: the state alone)."""
    from forgeline_operator.api import parse_job
    from forgeline_operator.sizing import fit

    job = parse_job(doc)
    return fit.estimate(job, None, model_config=fit.local_model_config(job, REPO)).optimizer_states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the ~20M-parameter base of the outcomes bench")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds (medians over them)")
    parser.add_argument("--out", default=str(REPO / "bench/results.md"))
    args = parser.parse_args()
    size = "full" if args.full else "quick"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from forgeline_operator.rayclient.localray import LocalRay
    from forgeline_operator.rayclient.rayjobs import RayJobs, local_python

    started, load_before = time.monotonic(), os.getloadavg()
    cache = outcomes.cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    task = outcomes.write_task(cache)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    estimates: dict[tuple[str, str], int] = {}
    with tempfile.TemporaryDirectory(prefix="forgeline-optimizers-") as tmp, LocalRay() as head:
        jobs = RayJobs(head.address, python=local_python(), token=head.token)
        base, _, cached = outcomes.base_model(jobs, size, cache, Path(tmp))
        print(f"base model: {base} ({'cached' if cached else 'pretrained now'})", file=sys.stderr)
        for round_ in range(args.repeats):
            for method in METHODS:
                for optimizer in OPTIMIZERS:
                    work = Path(tmp) / f"{method}-{optimizer}"
                    doc = manifest(size, method, optimizer, base, task, work)
                    estimates[method, optimizer] = estimated_state(doc, base)
                    m = outcomes.run(jobs, doc, work / "out")
                    runs.setdefault((method, optimizer), []).append(m)
                    print(
                        f"round {round_ + 1}: {method} {optimizer}: state {m['optimizer_state_bytes']:,} B, "
                        f"RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB, {m['tokens_per_second']:.0f} tok/s, "
                        f"eval_loss {m['final_eval']['eval_loss']:.4f}",
                        file=sys.stderr,
                    )
    elapsed, load_after = time.monotonic() - started, os.getloadavg()
    lines = [
        f"\n## Optimizers ({size}), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n",
        f"Machine: {benchlib.cpu_model()}, {os.cpu_count()} cores, no GPU (load average "
        f"{load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end). {outcomes.versions()}, "
        f"Python {platform.python_version()}. Command: `.venv/bin/python bench/optimizers.py"
        f"{' --full' if args.full else ''} --repeats {args.repeats}` ({elapsed / 60:.1f} min, "
        f"{'base model from the cache' if cached else 'pretraining included'}). The outcomes bench's "
        "fine-tunes, one Ray Train worker; medians of interleaved rounds; state bytes are exact.\n",
        "| method | optimizer | optimizer state (measured) | estimate (`--fit`) | vs adamw "
        "| peak RSS, rank 0 | tokens/s | train s | held-out loss | token accuracy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in METHODS:
        adamw_state = statistics.median(r["optimizer_state_bytes"] for r in runs[method, "adamw"])
        for optimizer in OPTIMIZERS:
            rs = runs[method, optimizer]

            def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
                return statistics.median(r[key] for r in rs)

            state = med("optimizer_state_bytes")
            ev = rs[-1]["final_eval"]
            estimate = estimates[method, optimizer]
            lines.append(
                f"| {method} | {optimizer} | {state / 2**20:.3f} MiB | {estimate / 2**20:.3f} MiB "
                f"| {state / adamw_state:.3g}× | {med('peak_rss_bytes') / 2**20:,.0f} MiB "
                f"| {med('tokens_per_second'):,.0f} | {med('wall_seconds'):.1f} "
                f"| {ev['eval_loss']:.3f} ± {ev['eval_loss_ci95']:.3f} | {100 * ev['accuracy']:.1f}% |"
            )
    benchlib.publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
