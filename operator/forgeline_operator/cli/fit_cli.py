"""`forgeline validate --fit`: the options and the tables around `sizing/fit.py`'s memory estimate."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..api import Job
from ..sizing import fit

DOES_NOT_FIT_EXIT = 3

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def memory_bytes(text: str) -> int:
    """80GiB, 80GB, 81559MiB, 80Gi or plain bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmg]i?b?|b)?\s*", text.lower())
    unit = (match.group(2) or "") if match else ""
    unit = unit + "b" if unit.endswith("i") else unit
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a memory size: {text} (write e.g. 80GiB or 24GB)")
    return int(float(match.group(1)) * _UNITS[unit])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The --fit options of `forgeline validate`."""
    p.add_argument(
        "--fit",
        action="store_true",
        help="also estimate each valid job's memory per GPU and say whether it fits; "
        f"exits {DOES_NOT_FIT_EXIT} when a job does not fit (1 when one is invalid)",
    )
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument(
        "--gpu-memory", type=memory_bytes, help="memory of one GPU, e.g. 80GiB (default: from nodePool)"
    )
    gpu.add_argument("--gpu", choices=sorted(fit.GPU_MEMORY_MIB), help="a known GPU type")
    p.add_argument(
        "--model-config",
        type=Path,
        help="a base model's config.json, for jobs whose base model size is otherwise unknown",
    )


def estimates(jobs: list[Job], args: argparse.Namespace) -> list[fit.FitEstimate]:
    """One estimate per job: the GPU memory from the options, else from the job's placement."""
    override = args.gpu_memory or (fit.gpu_memory_for(args.gpu) if args.gpu else None)
    given = json.loads(args.model_config.read_text()) if args.model_config else None
    out = []
    for job in jobs:
        placement = fit.job_gpu_memory(job)
        memory, source = (
            (override, f"--gpu {args.gpu}" if args.gpu else "--gpu-memory")
            if override
            else placement or (None, "")
        )
        config = fit.local_model_config(job, Path.cwd()) or given
        out.append(fit.estimate(job, memory, gpu_source=source, model_config=config))
    return out


def exit_code(found: list[fit.FitEstimate]) -> int:
    return DOES_NOT_FIT_EXIT if any(e.fits is False for e in found) else 0


def as_json(e: fit.FitEstimate) -> dict[str, Any]:
    return {**e.__dict__, "tensors": e.tensors, "total": e.total}


_VERDICTS = {
    True: "[green]FITS[/green]",
    False: "[red]DOES NOT FIT[/red]",
    None: "[yellow]NOT COMPARED[/yellow]",
}


def print_estimate(e: fit.FitEstimate, console: Console) -> None:
    """The breakdown table, the verdict and the advice of one job."""
    console.print(f"\n[bold]{escape(e.job)}[/bold]: {escape(e.model)}")
    if e.params is None:
        console.print("  [yellow]UNKNOWN[/yellow]: no estimate without the model's size")
        return
    console.print(f"  {e.params / 1e9:.2f}B parameters, {e.trainable_params or 0:,} trained")
    table = Table(show_edge=False, box=None, pad_edge=False, padding=(0, 2))
    table.add_column("per GPU" if e.gpu_memory or "CPU" not in e.gpu_source else "per process")
    table.add_column("GB", justify="right")
    rows = [
        ("weights", e.weights),
        ("gradients", e.gradients),
        ("optimizer states", e.optimizer_states),
        ("activations", e.activations),
        ("tensors (≈ torch.cuda.max_memory_allocated)", e.tensors),
        ("margin", e.margin),
        ("total", e.total),
    ]
    if e.offloaded:
        rows.append(("offloaded to CPU memory (not counted)", e.offloaded))
    if e.pageable:
        rows.append(("paged optimizer states (CPU memory under pressure; not counted)", e.pageable))
    if e.gpu_memory:
        rows.append(("GPU memory", e.gpu_memory))
    for name, value in rows:
        table.add_row(name, f"{value / 1e9:.2f}")
    console.print(table)
    for line in e.assumptions:
        console.print(f"  [dim]{escape(line)}[/dim]")
    console.print(f"  {_VERDICTS[e.fits]} ({escape(e.gpu_source)})")
    for line in e.advice:
        console.print(f"    [cyan]try:[/cyan] {escape(line)}")
