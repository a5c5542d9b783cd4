"""Time to first step, split into phases: `forgeline run`'s path against a running Ray head.

    .venv/bin/python bench/time_to_first_step.py [--repeats 3] [--example pretrain-tiny-llama]

One embedded Ray head (token auth, as `forgeline run` starts it) stays up for the whole run, as a
head does on a cluster. The example is submitted `--repeats` times through the Ray Jobs API (the
first run warms the machine's caches and is reported apart), each with its own run name so
nothing resumes. Every trainer record carries the wall-clock time it was written, so the phases
come from the records themselves:

    submission     submit_job() returned → the Ray job's driver says "preparing data"
                   (runtime env, the driver's python start-up and imports, ray.init, the MFU
                   peak probe, the storage preflight)
    data           "preparing data" → "data ready" (read, filter, tokenizer, pack, ray.put)
    worker group   "data ready" → "preflight passed" (Ray Train's controller, worker processes
                   started and importing, torch.distributed set up, the preflight checks)
    setup          "preflight passed" → "training started" (model build, engine, restore)
    first step     "training started" → the first progress record (step 1 done)

and, apart, `job end`: the driver's last record → the Jobs API reporting SUCCEEDED.

Prints a table of medians and appends it to bench/results.md (`--out`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PHASES = [
    ("submission", None, "preparing data"),
    ("data", "preparing data", "data ready"),
    ("worker group", "data ready", "preflight passed"),
    ("setup", "preflight passed", "training started"),
    ("first step", "training started", "first progress"),
]


def phases(submitted: float, records: list[dict]) -> dict[str, float]:
    """Seconds per phase (and the total) from a run's time-stamped records."""
    marks: dict[str | None, float] = {None: submitted}
    for r in records:
        key = r.get("message") if r.get("type") == "event" else None
        if r.get("type") == "progress":
            key = "first progress"
        if key and key not in marks and "time" in r:
            marks[key] = float(r["time"])
    out = {name: marks[end] - marks[start] for name, start, end in PHASES if start in marks and end in marks}
    if "first progress" in marks:
        out["total"] = marks["first progress"] - submitted
    return out


def run_once(jobs, job, work_dir: str, steps: int) -> tuple[dict[str, float], list[float]]:
    """One submission, followed to the end as `forgeline run` follows it: (phases, each record's
    delay from being written to being read through the Jobs API, polled every 0.2 s)."""
    from forgeline_operator.api.jobconfig import build_job_config
    from forgeline_operator.rayclient.rayjobs import TERMINAL_RAY_STATES, LogCursor

    name = job.metadata.name
    config = build_job_config(job, work_dir=work_dir, run_name=name)
    submitted = time.time()
    sid = jobs.submit(config, f"forgeline-{name}", wait_for_agent=120)
    cursor, records, delays = LogCursor(), [], []
    while True:
        status = jobs.status(sid)
        new = cursor.feed(jobs.logs(sid))
        seen = time.time()
        delays += [seen - r["time"] for r in new if "time" in r]
        records += new
        if status in TERMINAL_RAY_STATES:
            ended = time.time()
            break
        time.sleep(0.2)
    if status != "SUCCEEDED":
        sys.exit(f"{job.metadata.name}: {status}\n" + "\n".join(jobs.logs(sid).splitlines()[-30:]))
    split = phases(submitted, records)
    finished = [r["time"] for r in records if r.get("type") == "finished"]
    if finished:  # the driver's last record → the Jobs API says SUCCEEDED (driver exit, Ray's polls)
        split["job end"] = ended - finished[-1]
    return split, delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--example", default="pretrain-tiny-llama")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "bench/results.md"))
    args = parser.parse_args()

    from forgeline_operator.api import parse_job
    from forgeline_operator.rayclient.localray import LocalRay
    from forgeline_operator.rayclient.rayjobs import RayJobs, local_python

    raw = yaml.safe_load((REPO / f"examples/{args.example}.yaml").read_text())
    raw["spec"]["training"]["maxSteps"] = args.steps
    raw["spec"].setdefault("checkpointing", {})["intervalSteps"] = args.steps
    with LocalRay() as head:
        jobs = RayJobs(head.address, python=local_python(), token=head.token)
        runs = []
        for i in range(args.repeats + 1):
            raw["metadata"]["name"] = f"ttfs-{i}-{int(time.time())}"
            raw["spec"]["output"] = {"uri": f"runs/bench-ttfs/{raw['metadata']['name']}"}
            split, wall = run_once(jobs, parse_job(raw), str(REPO), args.steps)
            print(
                f"run {i}{' (warm-up)' if i == 0 else ''}: "
                + ", ".join(f"{k} {v:.2f}s" for k, v in split.items())
            )
            runs.append((split, wall))
    measured = runs[1:]
    names = [n for n, _, _ in PHASES] + ["total", "job end"]
    med = {n: statistics.median(r[0][n] for r in measured) for n in names}
    lines = [
        f"## Time to first step, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU; "
        f"Python {platform.python_version()}. Command: `.venv/bin/python bench/time_to_first_step.py "
        f"--repeats {args.repeats} --example {args.example}`.",
        "",
        f"`{args.example}` ({args.steps} steps) submitted through the Ray Jobs API to a running embedded "
        "head (`forgeline run`'s path), medians of the runs after a warm-up run:",
        "",
        "| phase | seconds (median) | runs |",
        "| --- | ---: | --- |",
    ]
    for n in names:
        each = ", ".join(f"{r[0][n]:.2f}" for r in measured)
        lines.append(f"| {n} | {med[n]:.2f} | {each} |")
    lines.append(f"| warm-up run's total | {runs[0][0]['total']:.2f} | |")
    delays = sorted(d for r in measured for d in r[1])
    lines += [
        "",
        f"Record delivery (written by the trainer → read through the Jobs API, polled every 0.2 s), "
        f"{len(delays)} records: median {statistics.median(delays):.2f} s, "
        f"p90 {delays[int(0.9 * (len(delays) - 1))]:.2f} s, max {delays[-1]:.2f} s.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
