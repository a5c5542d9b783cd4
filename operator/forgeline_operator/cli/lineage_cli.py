"""`forgeline lineage NAME [-n NS]` or `forgeline lineage OUTPUT_DIR`: where a model came from.

From an output directory it reads the record itself (`lineage.json`, which nests the records of
the jobs its base model came from); from a job name it reads status.lineage of that job and of
each job it trained from (`fromJob`), through the apiserver. Newest first, one block per job: the
job, its output and config digests, the data it read with their digests, the base model, the
image and versions, the evals before → after and the promotion verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from .joblogs import LogsError, fetch_job, fetch_related
from .report import chain as upstream_chain

LINEAGE_FILE = "lineage.json"


def records_from_file(path: Path) -> list[Mapping[str, Any]]:
    """The record in an output directory (or a lineage.json) and its nested upstream records."""
    file = path / LINEAGE_FILE if path.is_dir() else path
    node: Mapping[str, Any] | None = json.loads(file.read_text())
    out: list[Mapping[str, Any]] = []
    while node is not None and len(out) < 64:
        out.append(node)
        node = ((node.get("inputs") or {}).get("baseModel") or {}).get("upstream")
    return out


def _short(value: Any) -> str:
    return f"{value[:12]}…" if isinstance(value, str) and len(value) > 12 else str(value)


def _evals(record: Mapping[str, Any]) -> str:
    evals = record.get("evals") or {}
    before, after = evals.get("before") or {}, evals.get("after") or {}
    keys = [
        k for k in ("eval_loss", "perplexity", "accuracy", "preference_accuracy", "mean_reward") if k in after
    ]
    shown = [
        f"{k} {before[k]:.4g} → {after[k]:.4g}" if k in before else f"{k} {after[k]:.4g}" for k in keys[:2]
    ]
    tokens = after.get("eval_tokens")
    return ", ".join(shown) + (f" ({tokens:,.0f} held-out tokens)" if tokens else "")


def render_records(records: list[Mapping[str, Any]], console: Console) -> None:
    """Full records (from lineage.json), newest first."""
    for i, rec in enumerate(records):
        job = rec.get("job") or {}
        out = (rec.get("output") or {}).get("digest") or {}
        console.print(
            f"[bold]{escape(job.get('kind', '?'))}/{escape(job.get('name', '?'))}[/bold] "
            f"({escape(str(job.get('method')))}), output {escape(str(rec.get('output', {}).get('uri')))} "
            f"sha256 {_short(out.get('sha256'))}, {out.get('files', '?')} files"
        )
        versions = ", ".join(f"{k} {v}" for k, v in (rec.get("versions") or {}).items())
        image = (rec.get("trainerImage") or {}).get("image") or "(no image: run on this machine)"
        console.print(
            f"  config sha256 {_short((rec.get('config') or {}).get('sha256'))}; seed {rec.get('seed')}; "
            f"image {escape(image)}"
        )
        console.print(f"  {escape(versions)}")
        for d in (rec.get("inputs") or {}).get("data") or []:
            digest = d.get("sha256") or d.get("datasetFingerprint")
            console.print(f"  data {escape(d['uri'])}: sha256 {_short(digest)}, {d.get('bytes', 0):,} bytes")
        evals = _evals(rec)
        if evals:
            console.print(f"  evals {escape(evals)}")
        promo = rec.get("promotion")
        if promo:
            console.print(
                f"  gate: {'promoted' if promo.get('promoted') else 'NOT promoted'} ({promo.get('reason')})"
            )
        base = (rec.get("inputs") or {}).get("baseModel")
        if base:
            digest = base.get("digest")
            sha = digest.get("sha256") if isinstance(digest, dict) else digest
            tail = " — trained by the job below" if base.get("upstream") else ""
            console.print(f"  ↑ base model {escape(str(base.get('location')))} sha256 {_short(sha)}{tail}")
        elif i == len(records) - 1:
            console.print("  ↑ trained from scratch")


def render_statuses(jobs: list[Mapping[str, Any]], console: Console) -> None:
    """status.lineage of each job, newest first (when the output directory is not readable here)."""
    for job in jobs:
        name = f"{job.get('kind')}/{job['metadata']['name']}"
        status = job.get("status") or {}
        lin = status.get("lineage")
        if not lin:
            console.print(
                f"[bold]{escape(name)}[/bold]: no lineage yet (phase {status.get('phase') or 'new'})"
            )
            continue
        console.print(
            f"[bold]{escape(name)}[/bold] lineage {_short(lin.get('digest'))}, output "
            f"{escape(str(status.get('outputUri')))} sha256 {_short(lin.get('outputSha256'))}"
        )
        console.print(
            f"  config sha256 {_short(lin.get('configSha256'))}; seed {lin.get('seed')}; "
            f"image {escape(str(lin.get('trainerImage') or '(none)'))}"
        )
        for d in lin.get("data") or []:
            console.print(f"  data {escape(str(d.get('uri')))}: sha256 {_short(d.get('sha256'))}")
        promo = status.get("promotion")
        if promo:
            console.print(
                f"  gate: {'promoted' if promo.get('promoted') else 'NOT promoted'} ({promo.get('reason')})"
            )
        base = lin.get("baseModel")
        if base:
            console.print(
                f"  ↑ base model {escape(str(base.get('location')))} sha256 {_short(base.get('sha256'))}"
            )


def main(args: argparse.Namespace, fetch: Callable[[argparse.Namespace], dict[str, Any]] = fetch_job) -> int:
    console = Console(highlight=False, width=140)
    path = Path(args.name)
    if path.exists() and (path.is_file() or (path / LINEAGE_FILE).exists()):
        records = records_from_file(path)
        if args.output == "json":
            print(json.dumps(records[0], indent=2))
        else:
            render_records(records, console)
        return 0
    try:
        job = fetch(args)
    except LogsError as exc:
        print(f"forgeline lineage: {exc}", file=sys.stderr)
        return 1

    jobs = list(reversed(upstream_chain(job, fetch_related(args))))  # newest first
    if args.output == "json":
        print(
            json.dumps(
                [
                    {"job": j["metadata"]["name"], "lineage": (j.get("status") or {}).get("lineage")}
                    for j in jobs
                ],
                indent=2,
            )
        )
        return 0
    render_statuses(jobs, console)
    return 0
