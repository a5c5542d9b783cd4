"""The operator's memory and CPU with many jobs: the numbers behind the chart's `resources`.

    .venv/bin/python bench/operator_footprint.py [--jobs 1000]     (appends to bench/results.md)

Starts the real control plane (etcd + kube-apiserver), the operator process
(`python -m forgeline_operator`, as the chart runs it), creates N TrainingJobs parked with
`suspend: true` (admitted, validated, status written, no Ray work), and reports:
the operator's RSS idle, peak while admitting, and settled; CPU seconds spent admitting; and
its CPU use over 60 s with N parked jobs (the steady state of a busy cluster's backlog).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import yaml

from forgeline_operator.dev.cluster import ControlPlane, find_binary
from forgeline_operator.dev.operator_process import OperatorProcess

REPO = Path(__file__).resolve().parents[1]


def _kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(
        [find_binary("kubectl"), "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--out", default=str(REPO / "bench/results.md"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="forgeline-bench-"))
    with ControlPlane(workdir=work / "cp") as cp:
        _kubectl(cp.kubeconfig, "apply", "-f", str(REPO / "crds"))
        _kubectl(cp.kubeconfig, "wait", "--for=condition=Established", "crd/trainingjobs.forgeline.dev")
        _kubectl(cp.kubeconfig, "create", "namespace", "bench")
        proc = OperatorProcess(
            cp.kubeconfig,
            work,
            work / "operator.log",
            FORGELINE_BACKEND="address",
            FORGELINE_RAY_ADDRESS="http://127.0.0.1:1",
            FORGELINE_WATCH_NAMESPACES="bench",
            FORGELINE_LOG_LEVEL="WARNING",
        )
        proc.start()
        try:
            assert proc.proc is not None
            op = psutil.Process(proc.proc.pid)
            time.sleep(5)
            idle_rss = op.memory_info().rss
            peak = [idle_rss]
            stop = threading.Event()

            def _sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], op.memory_info().rss)
                    time.sleep(0.2)

            sampler = threading.Thread(target=_sample, daemon=True)
            sampler.start()
            base = yaml.safe_load((REPO / "examples/pretrain-tiny-llama.yaml").read_text())
            base["spec"]["suspend"] = True
            items = []
            for i in range(args.jobs):
                doc = json.loads(json.dumps(base))
                doc["metadata"] = {"name": f"bulk-{i:05d}", "namespace": "bench"}
                items.append(doc)
            cpu0 = sum(op.cpu_times()[:2])
            started = time.monotonic()
            for chunk in range(0, args.jobs, 250):
                _kubectl(
                    cp.kubeconfig,
                    "create",
                    "-f",
                    "-",
                    stdin=json.dumps(
                        {"apiVersion": "v1", "kind": "List", "items": items[chunk : chunk + 250]}
                    ),
                )
            while True:
                out = json.loads(_kubectl(cp.kubeconfig, "get", "tj", "-n", "bench", "-o", "json"))
                if (
                    sum((o.get("status") or {}).get("phase") == "Suspended" for o in out["items"])
                    == args.jobs
                ):
                    break
                time.sleep(2)
            admitted_s = time.monotonic() - started
            admit_cpu = sum(op.cpu_times()[:2]) - cpu0
            time.sleep(10)
            cpu1 = sum(op.cpu_times()[:2])
            time.sleep(60)
            steady_cpu = (sum(op.cpu_times()[:2]) - cpu1) / 60
            settled_rss = op.memory_info().rss
            stop.set()
        finally:
            proc.stop()
    cpu = platform.processor() or platform.machine()
    text = "\n".join(
        [
            f"\n## Operator footprint with {args.jobs} jobs, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n",
            f"Machine: {cpu}, {os.cpu_count()} cores, no GPU; Python {platform.python_version()}. "
            f"Command: `.venv/bin/python bench/operator_footprint.py --jobs {args.jobs}`.\n",
            "| jobs | created → all Suspended | operator CPU spent admitting | RSS idle | RSS peak "
            "| RSS settled | CPU with the jobs parked (60 s) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {args.jobs} | {admitted_s:.0f} s | {admit_cpu:.1f} CPU-s | {idle_rss / 2**20:.0f} MiB | "
            f"{peak[0] / 2**20:.0f} MiB | {settled_rss / 2**20:.0f} MiB | {steady_cpu * 1000:.0f} mCPU |",
        ]
    )
    print(text)
    with open(args.out, "a") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
