"""`forgeline report NAME [-n NS] [-o json]`: where a job's time and chip-hours went.

Prints status.goodput: seconds, share and GPU-hours (CPU core-hours on a CPU pool) by category,
each attempt's split with how it ended, and, for a job that trains from other jobs' outputs
(`fromJob`), the pipeline's goodput summed over the chain of stages it comes from.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..api import InvalidJobError, parse_job
from ..controller import goodput
from .joblogs import LogsError, fetch_job, fetch_related

_LABELS = {
    "queued": "queued (holds nothing)",
    "provisioning": "provisioning",
    "startup": "start-up",
    "productive": "productive steps",
    "redone": "redone work",
    "evaluation": "evaluation",
    "checkpointSave": "checkpoint writes",
    "checkpointRestore": "checkpoint restores",
    "stalled": "stalled",
    "other": "other",
}


def chain(job: dict[str, Any], fetch: Any) -> list[dict[str, Any]]:
    """The job and every job it trains from (fromJob, recursively), each once, upstream first."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}

    def visit(obj: dict[str, Any]) -> None:
        key = (obj.get("kind", ""), obj["metadata"]["name"])
        if key in seen:
            return
        try:
            refs = parse_job(obj).upstream_refs()
        except InvalidJobError:
            refs = []
        for ref in refs:
            upstream = fetch(ref.kind, ref.name)
            if upstream is not None:
                visit(upstream)
        seen[key] = obj

    visit(job)
    return list(seen.values())


def render(job: dict[str, Any], stages: list[dict[str, Any]], console: Console) -> None:
    """The report as tables."""
    name, status = job["metadata"]["name"], job.get("status") or {}
    g = status.get("goodput") or {}
    if not g.get("seconds"):
        console.print(f"{escape(name)}: no goodput yet (phase {status.get('phase') or 'new'})")
        return
    unit = g.get("chipUnit") or "chip"
    chips = float(g.get("chips") or 0)
    held = float(g.get("heldSeconds") or 0)
    table = Table(title=f"{job.get('kind', 'job')} {name}: {status.get('phase', '')}", title_justify="left")
    for column in ("category", "seconds", "share of held", f"{unit}-hours"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for category in goodput.CATEGORIES:
        seconds = float(g["seconds"].get(category, 0.0))
        share = "" if category == "queued" or not held else f"{seconds / held:.1%}"
        hours = "" if category == "queued" else f"{seconds * chips / 3600:.4g}"
        table.add_row(_LABELS[category], f"{seconds:.1f}", share, hours)
    console.print(table)
    fraction = g.get("fraction")
    console.print(
        f"goodput {fraction:.1%}" if isinstance(fraction, (int, float)) else "goodput: no steps yet",
        f"of {held:.0f} s held × {chips:g} {unit} = {float(g.get('chipHours') or 0):.4g} {unit}-hours",
        f"({float(g.get('productiveChipHours') or 0):.4g} productive);",
        f"redone steps: {g.get('redoneSteps', 0)}",
    )
    for a in g.get("attempts") or []:
        parts = ", ".join(
            f"{_LABELS[c]} {float(v):.1f}s" for c, v in (a.get("seconds") or {}).items() if float(v) >= 0.05
        )
        steps = f"steps {a['firstStep']}–{a['lastStep']}" if "lastStep" in a else "no step"
        resumed = f", resumed from step {a['resumedFrom']}" if a.get("resumedFrom") else ""
        redone = f", {a['redoneSteps']} redone" if a.get("redoneSteps") else ""
        console.print(
            f"  attempt {a['attempt']} ended {escape(str(a.get('endedBy') or '?'))}: "
            f"{steps}{resumed}{redone}; {parts}"
        )
    if len(stages) > 1:
        total = goodput.pipeline([(s.get("status") or {}).get("goodput") or {} for s in stages])
        names = " → ".join(s["metadata"]["name"] for s in stages)
        frac = total["fraction"]
        console.print(
            f"pipeline {escape(names)}: goodput {frac:.1%}" if frac is not None else f"pipeline {names}",
            f"over {total['heldSeconds']:.0f} s held, {total['chipHours']:.4g} chip-hours "
            f"({total['productiveChipHours']:.4g} productive)",
        )


def main(args: argparse.Namespace) -> int:
    try:
        job = fetch_job(args)
    except LogsError as exc:
        print(f"forgeline report: {exc}", file=sys.stderr)
        return 1

    stages = chain(job, fetch_related(args))
    if args.output == "json":
        doc = {"name": job["metadata"]["name"], "goodput": (job.get("status") or {}).get("goodput") or {}}
        if len(stages) > 1:
            stage_goodput = [(s.get("status") or {}).get("goodput") or {} for s in stages]
            doc["pipeline"] = {
                **goodput.pipeline(stage_goodput),
                "names": [s["metadata"]["name"] for s in stages],
            }
        print(json.dumps(doc, indent=2))
        return 0
    render(job, stages, Console(highlight=False, width=120))
    return 0
