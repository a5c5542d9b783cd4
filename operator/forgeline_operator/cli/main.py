"""`forgeline` command line: validate manifests offline and write the CRDs.

forgeline validate examples/*.yaml      # every error with its field path and a fix
forgeline validate -o json job.yaml     # the same, machine-readable
forgeline validate --fit [--gpu h100 | --gpu-memory 80GiB] job.yaml
                                        # and will it fit: memory per GPU, with advice
forgeline crds [--dir crds] [--docs docs/crd-reference.md] [--check]
                                        # (re)generate crds/ (and the reference) from the models
forgeline run examples/pretrain-tiny-llama.yaml   # train on an embedded Ray, live progress
forgeline logs NAME -n NS [--attempt N]  # a job's Ray job log, also after its cluster is gone
forgeline report NAME -n NS [-o json]    # where its time and GPU-hours went (goodput), pipeline too
forgeline lineage NAME -n NS | OUTPUT_DIR  # where its model came from: data, base, config, evals
forgeline plan --gpu-hours 1000 --gpu h100 [--inference-tokens T] [--emit | forgeline validate -]
                                        # compute-optimal model size and tokens for a budget
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

from ..api import API_GROUP, JOB_KINDS, FieldError, InvalidJobError, parse_job
from ..api.crd import render_crds, write_crds
from ..api.reference import render_reference
from . import fit_cli, plan_cli


@dataclass
class DocumentResult:
    """Outcome of validating one YAML document."""

    source: str
    index: int
    kind: str | None = None
    name: str | None = None
    errors: list[FieldError] = field(default_factory=list)
    skipped: str | None = None
    job: Any = field(default=None, repr=False)
    """The parsed job when valid (for --fit)."""

    @property
    def ok(self) -> bool:
        return not self.errors

    def label(self) -> str:
        where = f"{self.source}" + (f" (document {self.index + 1})" if self.index else "")
        what = f"{self.kind or '?'}/{self.name or '?'}"
        return f"{where}: {what}"


def _documents(path: str) -> Iterator[tuple[str, int, Any, FieldError | None]]:
    if path == "-":
        text, source = sys.stdin.read(), "<stdin>"
    else:
        p = Path(path)
        if p.is_dir():
            for child in sorted([*p.glob("*.yaml"), *p.glob("*.yml")]):
                yield from _documents(str(child))
            return
        source = path
        try:
            text = p.read_text()
        except OSError as exc:
            yield source, 0, None, FieldError("(file)", f"cannot read: {exc.strerror}", "check the path")
            return
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc)
        yield (
            source,
            0,
            None,
            FieldError(
                "(yaml)", f"not valid YAML at {where}: {problem}", "fix the indentation or quoting there"
            ),
        )
        return
    for i, doc in enumerate(d for d in docs if d is not None):
        yield source, i, doc, None


def validate_paths(paths: Sequence[str]) -> list[DocumentResult]:
    """Validate every document in the given files (or directories, or '-' for stdin)."""
    results: list[DocumentResult] = []
    for path in paths:
        for source, index, doc, read_error in _documents(path):
            result = DocumentResult(source, index)
            results.append(result)
            if read_error is not None:
                result.errors.append(read_error)
                continue
            if isinstance(doc, dict):
                result.kind = doc.get("kind") if isinstance(doc.get("kind"), str) else None
                meta = doc.get("metadata")
                result.name = meta.get("name") if isinstance(meta, dict) else None
                api_version = str(doc.get("apiVersion", ""))
                if result.kind not in JOB_KINDS and not api_version.startswith(API_GROUP + "/"):
                    result.skipped = f"not a Forgeline job ({api_version or '?'} {result.kind or '?'})"
                    continue
            try:
                result.job = parse_job(doc)
            except InvalidJobError as exc:
                result.errors.extend(exc.errors)
    return results


def _print_results(results: list[DocumentResult], console: Console) -> None:
    for r in results:
        if r.skipped:
            console.print(f"[dim]- {escape(r.label())}: skipped, {escape(r.skipped)}[/dim]")
        elif r.ok:
            console.print(f"[green]✓[/green] {escape(r.label())}: valid")
        else:
            n = len(r.errors)
            console.print(f"[red]✗[/red] {escape(r.label())}: {n} error{'s' if n > 1 else ''}")
            for e in r.errors:
                console.print(f"    [bold]{escape(e.path)}[/bold]: {escape(e.message)}")
                if e.fix:
                    console.print(f"      [cyan]fix:[/cyan] {escape(e.fix)}")
    checked = [r for r in results if not r.skipped]
    bad = sum(1 for r in checked if not r.ok)
    colour = "red" if bad else "green"
    console.print(
        f"[{colour}]{len(checked) - bad} valid, {bad} invalid[/{colour}]"
        + (f", {len(results) - len(checked)} skipped" if len(results) != len(checked) else "")
    )


def _cmd_validate(args: argparse.Namespace) -> int:
    results = validate_paths(args.files)
    jobs = [r.job for r in results if r.job is not None]
    fits = fit_cli.estimates(jobs, args) if args.fit else []
    by_job = dict(zip(map(id, jobs), fits, strict=False))
    if args.output == "json":
        rows = [{**_result_fields(r), "ok": r.ok} for r in results]
        for row, r in zip(rows, results, strict=True):
            if id(r.job) in by_job:
                row["fit"] = fit_cli.as_json(by_job[id(r.job)])
        print(json.dumps(rows, indent=2))
    else:
        console = Console(highlight=False, soft_wrap=True)
        _print_results(results, console)
        for estimate in fits:
            fit_cli.print_estimate(estimate, console)
    if not results:
        print("no documents found", file=sys.stderr)
        return 2
    return 1 if any(not r.ok for r in results) else fit_cli.exit_code(fits)


def _result_fields(r: DocumentResult) -> dict[str, Any]:
    return {k: v for k, v in asdict(replace(r, job=None)).items() if k != "job"}


def _cmd_crds(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    docs = Path(args.docs) if args.docs else None
    if args.check:
        stale = [
            name
            for name, text in render_crds().items()
            if not (directory / name).exists() or (directory / name).read_text() != text
        ]
        if docs is not None and (not docs.exists() or docs.read_text() != render_reference()):
            stale.append(str(docs))
        if stale:
            again = f"forgeline crds --dir {directory}" + (f" --docs {docs}" if docs else "")
            print(f"out of date: {', '.join(stale)}; run `make crds` (or `{again}`)", file=sys.stderr)
            return 1
        print(f"{directory}: up to date" + (f"; {docs}: up to date" if docs else ""))
        return 0
    for path in write_crds(directory):
        print(f"wrote {path}")
    if docs is not None:
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(render_reference())
        print(f"wrote {docs}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgeline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="validate TrainingJob/FineTuneJob manifests offline")
    p.add_argument("files", nargs="+", help="YAML files or directories ('-' reads stdin)")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    fit_cli.add_arguments(p)
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("crds", help="write the CustomResourceDefinitions generated from the models")
    p.add_argument("--dir", default="crds", help="output directory (default: crds)")
    p.add_argument(
        "--docs",
        metavar="PATH",
        default=None,
        help="also write the Markdown CRD reference there (e.g. docs/crd-reference.md)",
    )
    p.add_argument("--check", action="store_true", help="only check that the files are up to date")
    p.set_defaults(func=_cmd_crds)
    p = sub.add_parser("run", help="run a TrainingJob/FineTuneJob manifest on local or existing Ray")
    p.add_argument("manifest", help="manifest file (several jobs run in order; fromJob resolved)")
    p.add_argument("--address", help="Ray Jobs API address of an existing cluster (default: embedded Ray)")
    p.add_argument("--output", help="override spec.output.uri (single-job manifests)")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="on failure, print the Ray job's raw log tail too (with tracebacks)",
    )
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("logs", help="print a job's Ray job log (any attempt), even after its cluster is gone")
    p.add_argument("name", help="the TrainingJob or FineTuneJob")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--kind", choices=["trainingjob", "finetunejob"], help="when both kinds have the name")
    p.add_argument("--attempt", type=int, help="0 for the first submission (default: the latest)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--token", help="Ray auth token, to read a live log that is not archived yet")
    p.set_defaults(func=_cmd_logs)
    p = sub.add_parser("report", help="where a job's time and GPU-hours went: goodput and badput by category")
    p.add_argument("name", help="the TrainingJob or FineTuneJob")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--kind", choices=["trainingjob", "finetunejob"], help="when both kinds have the name")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser(
        "lineage", help="where a job's model came from: its lineage record and its upstream jobs'"
    )
    p.add_argument("name", help="the TrainingJob or FineTuneJob, or an output directory holding lineage.json")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--kind", choices=["trainingjob", "finetunejob"], help="when both kinds have the name")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.set_defaults(func=_cmd_lineage)
    plan_cli.add_parser(sub)
    return parser


def _cmd_logs(args: argparse.Namespace) -> int:
    from .joblogs import main as logs_main

    return logs_main(args)


def _cmd_lineage(args: argparse.Namespace) -> int:
    from .lineage_cli import main as lineage_main

    return lineage_main(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import main as report_main

    return report_main(args)


def _cmd_run(args: argparse.Namespace) -> int:
    from .runlocal import main as run_main

    return run_main(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
