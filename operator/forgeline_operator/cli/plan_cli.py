"""`forgeline plan`: the command line and the tables around `sizing/planning.py`'s scaling-law sizing."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..sizing import planning

# ------------------------------------------------------------------------------ forgeline plan

_PLAN_PICKS = ("approach-3", "approach-1", "inference-aware", "train-to-test")


@dataclass(frozen=True)
class _PlanRow:
    key: str
    title: str
    plan: planning.ServedPlan


def _positive(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> float | int:
        value = kind(float(text)) if kind is int else kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def add_parser(sub: Any) -> None:
    """The `plan` subcommand, on the `forgeline` parser's subparsers."""
    p = sub.add_parser(
        "plan",
        help="compute-optimal model size and tokens for a budget (Chinchilla, inference-aware); --emit a job",
    )
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--gpu-hours", type=_positive(float), help="training budget in GPU-hours")
    budget.add_argument("--flops", type=_positive(float), help="training budget in FLOPs, e.g. 1e21")
    p.add_argument("--gpu", choices=sorted(planning.GPUS), default="h100")
    p.add_argument("--gpus", type=_positive(int), default=8, help="GPUs the job runs on (default: 8)")
    p.add_argument("--mfu", type=_positive(float), help="model FLOPs utilisation, 0-1 (default: measured)")
    p.add_argument("--bench-results", default="bench/results.md", help="where measured MFUs are read")
    p.add_argument("--price", type=_positive(float), help="USD per GPU-hour (default: a stated assumption)")
    p.add_argument(
        "--inference-tokens", type=float, default=0.0, help="tokens the model will serve in its lifetime"
    )
    p.add_argument(
        "--samples-per-query",
        type=_positive(int),
        default=1,
        help="most samples per query (repeated sampling); the plan picks k up to this",
    )
    p.add_argument(
        "--sample-exponent",
        type=_positive(float),
        default=planning.SAMPLE_EXPONENT,
        help=f"κ: best-of-k reducible loss = one sample's × k^-κ (default {planning.SAMPLE_EXPONENT})",
    )
    p.add_argument("--emit", action="store_true", help="print a TrainingJob for the plan (table to stderr)")
    p.add_argument(
        "--pick", choices=_PLAN_PICKS, help="plan to emit (default: the most inference-aware one printed)"
    )
    p.add_argument("--name", help="the emitted job's name (default: from its size)")
    p.add_argument("--data", default="s3://your-bucket/corpus/*.parquet", help="the emitted job's data")
    p.add_argument("--output", default=None, help="the emitted job's output URI")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    problem = _plan_argument_problem(args)
    if problem:
        print(f"forgeline plan: {problem}", file=sys.stderr)
        return 2
    gpu = planning.GPUS[args.gpu]
    mfu, mfu_note = _plan_mfu(args, gpu)
    price = args.price if args.price is not None else gpu.price_per_hour
    flops = args.flops or planning.flops_for_gpu_hours(args.gpu_hours, gpu, mfu)
    rows = _plan_rows(flops, args)
    default = next(r.key for r in reversed(rows) if r.key != "approach-1")
    picked = next(r for r in rows if r.key == (args.pick or default))
    shape = planning.llama_shape_for(picked.plan.allocation.params)
    job = planning.job_shape_for(picked.plan.allocation, gpu, args.gpus)
    console = Console(highlight=False, soft_wrap=True, stderr=args.emit)
    budget = f"{_sci(flops)} FLOPs" + (
        f" ({args.gpu_hours:,.0f} {gpu.name} GPU-hours at {mfu:.0%} MFU)" if args.gpu_hours else ""
    )
    console.print(f"[bold]Compute-optimal plans for {escape(budget)}[/bold]")
    console.print(_plan_table(rows, gpu, mfu, price, args.gpus))
    if args.samples_per_query > 1:
        console.print(_samples_table(rows[-1], flops, args))
    for note in [*_plan_notes(rows, args, gpu, mfu_note, price), _shape_note(picked, shape, job, args)]:
        console.print(f"- {escape(note)}")
    if args.emit:
        print(_plan_yaml(picked, shape, gpu, mfu, args), end="")
    return 0


def _plan_argument_problem(args: argparse.Namespace) -> str | None:
    if args.gpus > 8 and args.gpus % 8:
        return f"--gpus {args.gpus}: use up to 8 (one node) or a multiple of 8 (whole nodes)"
    if args.inference_tokens < 0:
        return "--inference-tokens must not be negative"
    if args.samples_per_query > 1 and not args.inference_tokens:
        return "--samples-per-query needs --inference-tokens (samples cost nothing without inference)"
    if args.pick in ("inference-aware", "train-to-test") and not args.inference_tokens:
        return f"--pick {args.pick} needs --inference-tokens"
    if args.pick == "train-to-test" and args.samples_per_query == 1:
        return "--pick train-to-test needs --samples-per-query above 1"
    if args.mfu is not None and args.mfu > 1:
        return f"--mfu is a fraction (0.4 for 40%), got {args.mfu}"
    return None


def _plan_mfu(args: argparse.Namespace, gpu: planning.Gpu) -> tuple[float, str]:
    """The MFU to plan with, and a note saying where it came from."""
    if args.mfu is not None:
        return args.mfu, f"MFU {args.mfu:.0%}: given with --mfu"
    path = Path(args.bench_results)
    measured = planning.measured_mfu(path.read_text(), gpu.name) if path.is_file() else None
    if measured is not None:
        return measured[0], f"MFU {measured[0]:.1%}: measured on {gpu.name}, {path} «{measured[1]}»"
    where = f"{path} has no {gpu.name} measurement" if path.is_file() else f"no {path} here"
    mfu = planning.ASSUMED_MFU
    return mfu, f"MFU {mfu:.0%}: an ASSUMPTION ({where}); measure it, or pass --mfu"


def _plan_rows(flops: float, args: argparse.Namespace) -> list[_PlanRow]:
    tokens, fit = args.inference_tokens, planning.CHINCHILLA

    def served(allocation: planning.Allocation) -> planning.ServedPlan:
        loss = fit.loss(allocation.params, allocation.tokens)
        return planning.ServedPlan(allocation, 1, planning.inference_flops(allocation.params, tokens), loss)

    chinchilla = served(planning.compute_optimal(flops))
    rows = [
        _PlanRow("approach-3", "Chinchilla\napproach 3", chinchilla),
        _PlanRow("approach-1", "Chinchilla\napproach 1", served(planning.approach_1_optimal(flops))),
    ]
    if tokens:
        aware = planning.inference_optimal(chinchilla.effective_loss, tokens)
        rows.append(_PlanRow("inference-aware", "inference-\naware", aware))
        if args.samples_per_query > 1:
            best, _ = planning.train_to_test_optimal(
                aware.total_flops, tokens, args.samples_per_query, sample_exponent=args.sample_exponent
            )
            rows.append(_PlanRow("train-to-test", "train-to-\ntest", best))
    return rows


def _plan_table(rows: list[_PlanRow], gpu: planning.Gpu, mfu: float, price: float, gpus: int) -> Table:
    table = Table(show_header=True, header_style="bold")
    table.add_column("")
    for r in rows:
        table.add_column(r.title, justify="right")
    hours = [planning.gpu_hours(r.plan.allocation.training_flops, gpu, mfu) for r in rows]
    lines: list[tuple[str, list[str]]] = [
        ("parameters", [_count(r.plan.allocation.params) for r in rows]),
        ("training tokens", [_count(r.plan.allocation.tokens) for r in rows]),
        ("tokens/param", [f"{r.plan.allocation.tokens_per_param:,.0f}" for r in rows]),
        ("loss (eq. 10)", [f"{_single_loss(r):.3f}" for r in rows]),
        ("training FLOPs", [_sci(r.plan.allocation.training_flops) for r in rows]),
        (f"GPU-hours ({gpu.name})", [f"{h:,.0f}" for h in hours]),
        (f"wall-clock, {gpus} GPUs", [_duration(h / gpus) for h in hours]),
        (f"cost at ${price:.2f}/h", [f"${h * price:,.0f}" for h in hours]),
    ]
    if any(r.plan.inference_flops for r in rows):
        lines += [
            ("samples/query", [str(r.plan.samples) for r in rows]),
            ("inference FLOPs", [_sci(r.plan.inference_flops) for r in rows]),
            ("train + infer FLOPs", [_sci(r.plan.total_flops) for r in rows]),
        ]
    if any(r.plan.samples > 1 for r in rows):
        lines.append(("best-of-k loss*", [f"{r.plan.effective_loss:.3f}" for r in rows]))
    for label, cells in lines:
        table.add_row(label, *cells)
    return table


def _samples_table(row: _PlanRow, flops: float, args: argparse.Namespace) -> Table:
    """Every k the train-to-test plan compared, at its end-to-end budget."""
    chinchilla = planning.compute_optimal(flops)
    target = planning.CHINCHILLA.loss(chinchilla.params, chinchilla.tokens)
    aware = planning.inference_optimal(target, args.inference_tokens)
    _, plans = planning.train_to_test_optimal(
        aware.total_flops, args.inference_tokens, args.samples_per_query, sample_exponent=args.sample_exponent
    )
    table = Table(
        title=f"train-to-test: each k at {_sci(aware.total_flops)} FLOPs end to end", title_justify="left"
    )
    for name in ("k", "parameters", "tokens / parameter", "loss (1 sample)", "best-of-k loss"):
        table.add_column(name, justify="right")
    for p in plans:
        mark = " ←" if p.samples == row.plan.samples else ""
        a = p.allocation
        table.add_row(
            f"{p.samples}{mark}",
            _count(a.params),
            f"{a.tokens_per_param:,.0f}",
            f"{planning.CHINCHILLA.loss(a.params, a.tokens):.3f}",
            f"{p.effective_loss:.3f}",
        )
    return table


def _single_loss(row: _PlanRow) -> float:
    return planning.CHINCHILLA.loss(row.plan.allocation.params, row.plan.allocation.tokens)


def _plan_notes(
    rows: list[_PlanRow], args: argparse.Namespace, gpu: planning.Gpu, mfu_note: str, price: float
) -> list[str]:
    fit = planning.CHINCHILLA
    notes = [
        f"{gpu.name}: {gpu.peak_flops / 1e12:,.0f} TFLOP/s dense bf16 (datasheet); {mfu_note}",
        f"price ${price:.2f} per GPU-hour: "
        + ("given with --price" if args.price is not None else "an ASSUMPTION (typical cloud); --price"),
        "approach 3 (what the planner uses): Hoffmann et al. 2022 eq. 10, "
        f"L = {fit.e} + {fit.a}/N^{fit.alpha} + {fit.b}/D^{fit.beta}, minimised at C = 6ND; "
        "approach 1: N ∝ C^0.50 fitted to Table 3 "
        "(bigger models, fewer tokens). Losses are eq. 10's (nats/token on its data): compare plans, "
        "not datasets",
    ]
    by_key = {r.key: r.plan for r in rows}
    if "inference-aware" in by_key:
        aware, budget = by_key["inference-aware"], by_key["approach-3"].allocation.training_flops
        notes.append(
            f"inference-aware (Sardana & Frankle 2023): approach 3's loss for the least training + "
            f"inference compute over {_sci(args.inference_tokens)} served tokens; it trains "
            f"{aware.allocation.training_flops / budget:.2f}× the budget"
        )
    if "train-to-test" in by_key:
        notes.append(
            "train-to-test (Roberts et al. 2026, arXiv 2604.01411): the inference-aware plan's end-to-end "
            f"compute, with N, D and k ≤ {args.samples_per_query} chosen together for the best best-of-k "
            f"loss; *ASSUMED best-of-k loss = E + (L - E)·k^-{args.sample_exponent:g} (--sample-exponent)"
        )
    return notes


def _shape_note(
    row: _PlanRow, shape: planning.LlamaShape, job: planning.JobShape, args: argparse.Namespace
) -> str:
    tokens = job.global_batch_size * job.sequence_length
    zero = f", ZeRO-{job.zero_stage}" if job.zero_stage else ", plain DDP"
    return (
        f"as a job ({row.key}): llama {shape.hidden_size}×{shape.num_layers} layers, {shape.num_heads} heads "
        f"({shape.num_kv_heads} kv), MLP {shape.intermediate_size} = {_count(shape.params)} parameters; "
        f"{job.sequence_length}-token sequences, global batch {job.global_batch_size} ({_count(tokens)} "
        f"tokens), {job.max_steps:,} steps on {args.gpus} {args.gpu}{zero}"
        + ("" if args.emit else "; --emit prints it as a TrainingJob")
    )


def _plan_yaml(
    row: _PlanRow, shape: planning.LlamaShape, gpu: planning.Gpu, mfu: float, args: argparse.Namespace
) -> str:
    allocation = row.plan.allocation
    name = args.name or _job_name(shape.params)
    hours = planning.gpu_hours(allocation.training_flops, gpu, mfu)
    manifest = planning.training_job_manifest(
        name, shape, allocation, gpu, args.gpus, hours, args.data, args.output or f"s3://your-bucket/{name}"
    )
    header = [
        f"# forgeline plan ({row.key}): {_count(shape.params)} parameters on "
        f"{_count(allocation.tokens)} tokens ({allocation.tokens_per_param:,.0f} per parameter),",
        f"# {_sci(allocation.training_flops)} FLOPs = {hours:,.0f} {gpu.name} GPU-hours at {mfu:.0%} MFU; "
        "batch and learning rate from DeepSeek LLM's fits.",
        "# Set spec.data to your corpus and spec.output to your bucket; add resources.nodePool for the GPUs.",
    ]
    if row.plan.samples > 1:
        header.append(f"# Serve it with {row.plan.samples} samples per query (the train-to-test plan).")
    return "\n".join(header) + "\n" + yaml.safe_dump(manifest, sort_keys=False)


def _job_name(params: float) -> str:
    return f"llama-{params / 1e9:.0f}b" if params >= 1e9 else f"llama-{params / 1e6:.0f}m"


def _count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            value = x / scale
            return f"{value:.3g}{unit}" if value < 100 else f"{value:,.0f}{unit}"
    return f"{x:.0f}"


def _sci(x: float) -> str:
    return f"{x:.3g}".replace("e+", "e")


def _duration(hours: float) -> str:
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h"
