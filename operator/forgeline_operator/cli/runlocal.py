"""`forgeline run MANIFEST`: run TrainingJob/FineTuneJob manifests on this machine (or any Ray).

    forgeline run examples/pretrain-tiny-llama.yaml
    forgeline run examples/pipeline-pretrain-sft-dpo.yaml       # stages in order, fromJob resolved
    forgeline run job.yaml --address http://ray-head:8265 --output s3://bucket/out

Without --address an embedded Ray head starts (token auth on) and stops at the end. The
manifest becomes a job config with the same code the operator uses, and is submitted through
the Ray Jobs API; a live bar shows step/total, loss, tokens/s and ETA. Ctrl-C stops the Ray job
(and the embedded head) cleanly.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from ray.exceptions import AuthenticationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from ..api import FieldError, InvalidJobError, Job, inputs, parse_job, promotion
from ..api.inputs import InputProblem
from ..api.jobconfig import PROGRESS_PREFIX, build_job_config
from ..controller import decisions, failures, goodput, lifecycle
from ..rayclient.rayjobs import TERMINAL_RAY_STATES, LogCursor, RayJobs, combine_ledgers, local_python

if TYPE_CHECKING:
    from ..rayclient.localray import LocalRay


@dataclass
class RunResult:
    name: str
    kind: str
    status: str
    output: str
    submission_id: str
    records: list[dict[str, Any]]
    submitted_at: float = 0.0
    ended_at: float = 0.0
    verdict: promotion.Verdict | None = None
    """spec.promotion's verdict, for a job that succeeded and has a gate."""

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED"

    def evals(self) -> tuple[dict[str, float] | None, dict[str, float] | None]:
        """(the eval before training, the last eval): the last record at step 0, as LogCursor
        keeps it (a TRL recipe's own baseline record comes after the one its library logs)."""
        evals = [r for r in self.records if r.get("type") == "eval"]
        baseline = next((r for r in reversed(evals) if r.get("step") == 0), None)
        return (_numbers(baseline) if baseline else None), (_numbers(evals[-1]) if evals else None)

    def goodput(self) -> dict[str, Any]:
        """This run's one attempt split as the operator splits an attempt (controller/goodput)."""
        first = next((r for r in self.records if r.get("type", "progress") == "progress"), None)
        groups: dict[str, dict[str, Any]] = {}
        for r in self.records:
            if isinstance(r.get("ledger"), dict):
                groups[str(r["ledger"].get("group", ""))] = r
        last = combine_ledgers(list(groups.values()))
        attempt = goodput.Attempt(self.submitted_at, self.ended_at or time.time(), first, last)
        return goodput.split(attempt)

    def last(self, kind: str) -> dict[str, Any]:
        return next((r for r in reversed(self.records) if r.get("type") == kind), {})


def load_jobs(path: str) -> list[Job]:
    """Every job in a manifest file, or InvalidJobError naming the document and field."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    jobs, errors = [], []
    for i, doc in enumerate(docs):
        try:
            jobs.append(parse_job(doc))
        except InvalidJobError as exc:
            prefix = f"document {i + 1}: " if len(docs) > 1 else ""
            errors += [FieldError(prefix + e.path, e.message, e.fix) for e in exc.errors]
    if errors:
        raise InvalidJobError(errors)
    if not jobs:
        raise InvalidJobError(
            [
                FieldError(
                    "(file)",
                    "no TrainingJob or FineTuneJob in it",
                    "give a manifest with kind TrainingJob or FineTuneJob",
                )
            ]
        )
    return jobs


def _resolve_from_job(ref: Any, done: dict[str, RunResult], field: str = "fromJob") -> str:
    prior = done.get(ref.name)
    if prior is None:
        raise InvalidJobError(
            [
                FieldError(
                    "fromJob",
                    f"{ref.kind}/{ref.name} is not an earlier job in this run",
                    "put that job before this one in the same file, or name the model by path",
                )
            ]
        )
    if not prior.ok:
        raise RuntimeError(f"{ref.kind}/{ref.name} did not succeed ({prior.status})")
    if prior.verdict is not None and not prior.verdict.promoted and not ref.allow_unpromoted:
        why = f"{prior.verdict.reason}: {prior.verdict.message}"
        raise RuntimeError(decisions.UpstreamNotPromoted(ref.kind, ref.name, why, field).message)
    return prior.output


def run_job(
    job: Job,
    ray_jobs: RayJobs,
    console: Console,
    *,
    output: str | None,
    done: dict[str, RunResult],
    work_dir: str,
    submitted: list[str] | None = None,
    fail_at_step: int | None = None,
    attempt: int = 0,
    max_worker_failures: int = 2,
    quiet: bool = False,
    verbose: bool = False,
) -> RunResult:
    """Submit one job to Ray, follow its progress records live, print its outcome; `done` gets
    its result (later jobs in the file resolve `fromJob` against it)."""
    base, reward = job.model_source(), job.reward_model_source()
    base_field = f"{job.MODEL_FIELD}.fromJob"
    adapters = job.adapter_sources()
    config = build_job_config(
        job,
        output=output,
        base_model=_resolve_from_job(base.from_job, done, base_field) if base and base.from_job else None,
        reward_model=_resolve_from_job(reward.from_job, done, "spec.rl.rewardModel.fromJob")
        if reward and reward.from_job
        else None,
        adapters=[
            _resolve_from_job(a.from_job, done, f"spec.merge.adapters[{i}].fromJob") if a.from_job else None
            for i, a in enumerate(adapters)
        ],
        work_dir=work_dir,
        mlflow_default=os.environ.get("FORGELINE_MLFLOW_TRACKING_URI"),
        run_name=f"local-{job.metadata.name}",
        attempt=attempt,
        fail_at_step=fail_at_step,
        max_worker_failures=max_worker_failures,
    )
    sid = f"forgeline-{job.metadata.name}-{uuid.uuid4().hex[:8]}"
    submitted_at = time.time()
    ray_jobs.submit(config, sid, wait_for_agent=120)
    if submitted is not None:
        submitted.append(sid)
    console.print(
        f"[bold]{job.KIND}/{job.metadata.name}[/bold]: submitted Ray job {sid} to {ray_jobs.address}"
    )
    status, records = _follow(ray_jobs, sid, job.metadata.name, console, quiet)
    result = RunResult(job.metadata.name, job.KIND, status, config.paths.output, sid, records)
    result.submitted_at, result.ended_at = submitted_at, time.time()
    if result.ok and job.spec.promotion is not None:
        result.verdict = promotion.decide(job.spec.promotion, *result.evals())
    if not result.ok:
        console.print(_failure_report(result, ray_jobs, work_dir, verbose), soft_wrap=True)
    else:
        console.print(_summary(result, work_dir))
    done[job.metadata.name] = result
    return result


FOLLOW_POLL_SECONDS = 0.25
"""How often `forgeline run` reads the job's status and log: a record the trainer writes is on the
screen within this plus Ray's log forwarding (bench/time_to_first_step.py measures the sum)."""


def _follow(
    ray_jobs: RayJobs, sid: str, name: str, console: Console, quiet: bool
) -> tuple[str, list[dict[str, Any]]]:
    """Show a Ray job's progress records (bar, evals, events, errors) until it ends: its final
    status and every record."""
    cursor = LogCursor()
    records: list[dict[str, Any]] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=quiet, transient=False) as bar:
        task = bar.add_task(escape(name), total=None, stats="starting")
        while True:
            status = ray_jobs.status(sid) or "PENDING"
            new = cursor.feed(ray_jobs.logs(sid))
            records += new
            for record in new:
                _show(record, bar, task)
            if status in TERMINAL_RAY_STATES:
                return status, records
            time.sleep(FOLLOW_POLL_SECONDS)


def _show(r: dict[str, Any], bar: Progress, task: TaskID) -> None:
    kind = r.get("type")
    if kind == "progress":
        stats = f"loss {r.get('loss', float('nan')):.4f}  {r.get('tokens_per_second', 0):,.0f} tok/s"
        if r.get("mfu") is not None:
            stats += f"  MFU {100 * r['mfu']:.1f}%"
        bar.update(task, total=r.get("total_steps"), completed=r.get("step"), stats=stats)
    elif kind == "eval":
        when = "before training" if r.get("step") == 0 else f"@ step {r.get('step')}"
        bar.console.print(f"  eval {when}: {_eval_metrics(r)}")
    elif kind == "event":
        bar.console.print(f"  {escape(str(r.get('message')))}")


def _eval_metrics(record: dict[str, Any]) -> str:
    """An eval record's metrics as a person reads them (not its type, step or time stamp)."""
    return ", ".join(
        f"{k} {v:.4g}"
        for k, v in record.items()
        if k not in ("type", "step", "time", "job") and isinstance(v, int | float)
    )


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float)}


def _print_unreachable(console: Console, where: str, exc: Exception) -> None:
    console.print(
        f"[red]cannot use the Ray cluster at {escape(where)}: {escape(str(exc).strip())}[/red]\n"
        "  fix: pass the Ray Jobs API address (dashboard port, usually 8265) to --address, "
        "and for clusters with token auth export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"
    )


def _print_invalid(console: Console, manifest: str, exc: InvalidJobError) -> None:
    console.print(f"[red]✗ {escape(manifest)} is invalid:[/red]")
    for e in exc.errors:
        console.print(f"    [bold]{escape(e.path)}[/bold]: {escape(e.message)}")
        if e.fix:
            console.print(f"      [cyan]fix:[/cyan] {escape(e.fix)}")


def main(args: Any) -> int:
    console = Console(highlight=False)
    try:
        jobs = load_jobs(args.manifest)
    except InvalidJobError as exc:
        _print_invalid(console, args.manifest, exc)
        return 1
    notes = _credential_notes(jobs, args.address) + _object_store_notes(jobs, args.address, args.output)
    for note in notes:
        console.print(f"[yellow]{escape(note)}[/yellow]")
    if args.output and len(jobs) > 1:
        console.print("[red]--output applies to one job; this file has several[/red]")
        return 2
    problems = check_inputs(jobs, args.output, os.getcwd())
    if problems:
        for job, problem in problems:
            console.print(
                f"[red]✗ {job.KIND}/{escape(job.metadata.name)}[/red] {escape(problem.line())}",
                soft_wrap=True,
            )
        return 1
    from ..rayclient.localray import LocalRay

    local = None if args.address else LocalRay()

    def _terminate(signum: int, frame: Any) -> None:  # SIGTERM: clean up exactly as for Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    # Ctrl-C stops the Ray job even where SIGINT came in ignored (a shell's background job, nohup):
    # Python keeps an inherited SIG_IGN, and the job would then run on after the user gave up on it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    done: dict[str, RunResult] = {}
    submitted: list[str] = []
    ray_jobs: RayJobs | None = None
    try:
        ray_jobs = _connect(args.address, local, console)
        for job in jobs:
            work_dir = os.getcwd()
            result = run_job(
                job,
                ray_jobs,
                console,
                output=args.output,
                done=done,
                work_dir=work_dir,
                submitted=submitted,
                verbose=getattr(args, "verbose", False),
            )
            if not result.ok:
                return 1
        return 0
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping the Ray job ...[/yellow]")
        if ray_jobs is not None:
            _stop(ray_jobs, submitted, console)
        return 130
    except (InvalidJobError, RuntimeError) as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        return 1
    except (ConnectionError, OSError, AuthenticationError) as exc:
        _print_unreachable(console, args.address or "the embedded Ray head", exc)
        return 1
    finally:
        if local is not None:
            local.stop()


def check_inputs(jobs: list[Job], output: str | None, work_dir: str) -> list[tuple[Job, InputProblem]]:
    """What can be known wrong with the jobs' inputs before Ray starts (api.inputs: data, models,
    hub ids within its timeout, writable outputs). A pipeline's later stages read what earlier
    ones write: those locations are not checked."""
    made: dict[str, str] = {}  # job name → its output, for the stages after it

    def upstream(source: Any) -> str | None:
        return made.get(source.from_job.name, "") if source and source.from_job else None

    out = []
    for job in jobs:
        config = build_job_config(
            job,
            output=output,
            work_dir=work_dir,
            base_model=upstream(job.model_source()),
            reward_model=upstream(job.reward_model_source()),
            adapters=[upstream(a) for a in job.adapter_sources()],
        )
        out += [(job, p) for p in inputs.check(config, skip=frozenset(made.values()))]
        made[job.metadata.name] = config.paths.output
    return out


def _failure_report(result: RunResult, ray_jobs: RayJobs, work_dir: str, verbose: bool) -> str:
    """A failed job's one line (the operator's status.message for the same failure), then, where
    the reason is not known, the log's last meaningful lines (no Ray colour codes, no progress
    records); the full log is kept in a file named here. `verbose`: the raw tail as well."""
    log = ray_jobs.logs(result.submission_id)
    error = result.last("error") or None
    failure = failures.classify(error, ray_jobs.message(result.submission_id), log[-20_000:])
    lines = [
        f"[red]✗ {result.kind}/{escape(result.name)} failed:[/red] {escape(failures.failed_line(failure))}"
    ]
    kept = Path(work_dir) / "runs" / "logs" / f"{result.submission_id}.log"
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(log)
        where = f"full log: {kept}"
    except OSError as exc:
        where = f"the full log could not be kept ({exc}); rerun with --verbose"
    if failure.reason in ("Unknown", "UserCodeError") or verbose:
        meaningful = readable_log(log)[-(25 if verbose else 8) :]
        lines += [f"  {escape(line)}" for line in meaningful]
    lines.append(f"  {escape(where)}")
    return "\n".join(lines)


def readable_log(log: str) -> list[str]:
    """A Ray job log as a person reads it: without colour codes, Forgeline's progress records,
    Ray's INFO chatter and blank lines."""
    out = []
    for line in _ANSI.sub("", log).splitlines():
        text = line.strip()
        if not text or PROGRESS_PREFIX in text or _RAY_INFO.search(text):
            continue
        out.append(text)
    return out


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAY_INFO = re.compile(r"^(\(\w+ pid=\d+[^)]*\)\s*)?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+INFO\b|^\[\w+\] ")


def _credential_notes(jobs: list[Job], address: str | None) -> list[str]:
    """spec.credentials names Kubernetes Secrets; here the trainer sees this shell's environment
    (the embedded Ray head inherits it) or, with --address, that cluster's own."""
    notes = []
    for job in jobs:
        for ref in job.spec.credentials:
            where = f"the Ray cluster at {address}" if address else "this shell's environment"
            missing = [k for k in ref.keys if k not in os.environ] if not address else []
            note = (
                f"{job.metadata.name}: spec.credentials Secret {ref.secret_name} is not read here; "
                f"the trainer uses {where}"
            )
            notes.append(note + (f" (not set here: {', '.join(missing)})" if missing else ""))
    return notes


def _object_store_notes(jobs: list[Job], address: str | None, output: str | None = None) -> list[str]:
    """Where `s3://` URIs go: the trainer's s3fs and pyarrow read the AWS variables of this shell
    (inherited by the embedded Ray head and its workers) or, with --address, of that cluster. Only
    the endpoint is named, never a key."""

    def _uris(value: Any) -> list[str]:
        if isinstance(value, dict):
            return [u for v in value.values() for u in _uris(v)]
        if isinstance(value, list):
            return [u for v in value for u in _uris(v)]
        return [value] if isinstance(value, str) and value.startswith("s3://") else []

    uses_s3 = [j.metadata.name for j in jobs if _uris(j.spec.model_dump())] + (
        ["--output"] if output and output.startswith("s3://") else []
    )
    if not uses_s3:
        return []
    if address:
        return [f"{', '.join(uses_s3)}: s3:// URIs use the AWS variables of the Ray cluster at {address}"]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    keys = "AWS_ACCESS_KEY_ID" in os.environ or "AWS_PROFILE" in os.environ
    how = "AWS credentials" if keys else "AWS credential chain (no AWS_ACCESS_KEY_ID or AWS_PROFILE set here)"
    return [f"{', '.join(uses_s3)}: s3:// URIs go to {endpoint} (AWS_ENDPOINT_URL) with this shell's {how}"]


def _connect(address: str | None, local: LocalRay | None, console: Console) -> RayJobs:
    """The Jobs API client: for `address`, or for the embedded head `local` (started here)."""
    if local is None:
        assert address is not None
        return RayJobs(address, request_timeout=10)
    console.print("starting an embedded Ray head (token auth) ...")
    local.start()
    console.print(f"Ray dashboard: {local.address}")
    return RayJobs(local.address, python=local_python(), token=local.token, request_timeout=10)


def _stop(ray_jobs: RayJobs, submission_ids: list[str], console: Console) -> None:
    """Stop this run's Ray jobs (only ours, even on a shared cluster) and wait until they end
    (at most about a minute: then the embedded head, if any, is stopped regardless)."""
    deadline = time.monotonic() + 60
    for sid in submission_ids:
        try:
            if (ray_jobs.status(sid) or "STOPPED") in TERMINAL_RAY_STATES:
                continue
            state = ray_jobs.stop_and_wait(sid, timeout=max(0.0, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - a wedged dashboard must not block the exit
            state = f"unknown: {exc}"
        console.print(f"stopped Ray job {sid} ({state})")


def _summary(result: RunResult, work_dir: str) -> str:
    done = result.last("done")
    out = (
        result.output
        if "://" in result.output or result.output.startswith("/")
        else str(Path(work_dir) / result.output)
    )
    lines = [f"[green]✓ {result.kind}/{result.name} succeeded[/green]"]
    if done.get("final_loss") is not None:
        first = next((r.get("loss") for r in result.records if r.get("type") == "progress"), None)
        lines.append(
            f"  loss {first:.4f} → {done['final_loss']:.4f}"
            if first is not None
            else f"  final loss {done['final_loss']:.4f}"
        )
    evals = [r for r in result.records if r.get("type") == "eval"]
    if evals:
        baseline, after = result.evals()
        gain = lifecycle.eval_gain(baseline, after) if baseline else None
        if gain:
            lines.append(f"  held-out {gain} (before → after training)")
        lines.append("  final eval: " + _eval_metrics(evals[-1]))
    if result.verdict is not None:
        v = result.verdict
        colour, word = ("green", "promoted") if v.promoted else ("yellow", "not promoted")
        lines.append(f"  [{colour}]gate: {word} ({v.reason})[/{colour}] {escape(v.message)}")
    split = result.goodput()["seconds"]
    wall = sum(split.values())
    if wall > 0:
        parts = ", ".join(
            f"{k} {v / wall:.0%}" for k, v in sorted(split.items(), key=lambda kv: -kv[1]) if v / wall >= 0.05
        )
        lines.append(f"  goodput {split['productive'] / wall:.0%} of {wall:.0f} s ({parts})")
    lines.append(f"  output: {out} (model, tokenizer, metrics.json, loss.png)")
    return "\n".join(lines)
