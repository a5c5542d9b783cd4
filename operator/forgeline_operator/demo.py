"""`make demo`: a three-stage training pipeline through the real operator, on this machine.

1. starts a real etcd + kube-apiserver on loopback (forgeline_operator.devcluster) and installs
   the CRDs generated from the models;
2. starts the operator (`python -m forgeline_operator`) with the local backend: an embedded Ray
   head stands in for the KubeRay cluster a real deployment would create;
3. applies examples/pipeline-pretrain-sft-dpo.yaml — tiny pretrain → LoRA SFT from its output →
   DPO from the SFT — and shows the jobs' status until all three succeed;
4. prints `kubectl get tj,ftj`, where the models are, where the metrics are, and how long it took
   from `kubectl apply` to the first job being provisioned and to its first training step.

    --keep   leave everything running afterwards (Ctrl-C stops it)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.rule import Rule
from rich.table import Table

from .devcluster import ControlPlane, find_binary
from .ports import free_port

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "examples" / "pipeline-pretrain-sft-dpo.yaml"
JOBS = [("tj", "pipe-pretrain"), ("ftj", "pipe-sft"), ("ftj", "pipe-dpo")]


class _Kubectl:
    def __init__(self, kubeconfig: Path) -> None:
        self.base = [find_binary("kubectl"), "--kubeconfig", str(kubeconfig)]

    def __call__(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(self.base + list(args), capture_output=True, text=True, cwd=REPO)
        if check and proc.returncode != 0:
            raise SystemExit(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout


def _table(objs: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="forgeline pipeline (kubectl get tj,ftj)", expand=False)
    for col in ("job", "phase", "progress", "loss", "tokens/s", "message"):
        table.add_column(col)
    for _, name in JOBS:
        st = objs.get(name, {}).get("status") or {}
        p = st.get("progress") or {}
        table.add_row(
            name,
            st.get("phase", "-"),
            p.get("summary", "-"),
            f"{p['loss']:.3f}" if "loss" in p else "-",
            f"{p['tokensPerSecond']:,.0f}" if "tokensPerSecond" in p else "-",
            (st.get("message") or "")[:70],
        )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep everything running at the end")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds to wait for the pipeline")
    args = parser.parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)

    console.print(Rule("1. a real control plane (etcd + kube-apiserver, RBAC on) and the CRDs"))
    cp = ControlPlane()
    cp.start()
    kubectl = _Kubectl(cp.kubeconfig)
    operator: subprocess.Popen[bytes] | None = None
    log_path = cp.workdir / "operator.log"
    try:
        kubectl("apply", "-f", str(REPO / "crds"))
        kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/trainingjobs.forgeline.dev",
            "crd/finetunejobs.forgeline.dev",
        )
        console.print(f"kube-apiserver {cp.url}; KUBECONFIG={cp.kubeconfig}")

        console.print(Rule("2. the operator, with an embedded Ray head as its backend"))
        metrics_port, health_port = free_port(), free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(cp.kubeconfig),
            "FORGELINE_BACKEND": "local",
            "FORGELINE_METRICS_PORT": str(metrics_port),
            "FORGELINE_HEALTH_PORT": str(health_port),
            "FORGELINE_RECONCILE_INTERVAL": "2",
            "FORGELINE_LOCAL_WORK_DIR": str(REPO),
            "PYTHONUNBUFFERED": "1",
        }
        operator = subprocess.Popen(
            [sys.executable, "-m", "forgeline_operator"],
            cwd=REPO,
            env=env,
            stdout=open(log_path, "wb"),  # noqa: SIM115 - open as long as the operator runs
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2)
                break
            except OSError:
                if operator.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the operator did not start:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.5)
        console.print(f"operator up (log: {log_path}); metrics at http://127.0.0.1:{metrics_port}/metrics")

        console.print(Rule("3. kubectl apply -f examples/pipeline-pretrain-sft-dpo.yaml"))
        applied = time.monotonic()
        console.print(kubectl("apply", "-f", str(PIPELINE)).strip())
        provisioned = first_step = None
        objs: dict[str, dict[str, Any]] = {}
        with Live(_table(objs), console=console, refresh_per_second=2) as live:
            while time.monotonic() - applied < args.timeout:
                items = json.loads(kubectl("get", "tj,ftj", "-o", "json"))["items"]
                objs = {o["metadata"]["name"]: o for o in items}
                live.update(_table(objs))
                first = (objs.get("pipe-pretrain") or {}).get("status") or {}
                if provisioned is None and first.get("phase") in ("Provisioning", "Running", "Succeeded"):
                    provisioned = time.monotonic() - applied
                if first_step is None and (first.get("progress") or {}).get("step", 0) >= 1:
                    first_step = time.monotonic() - applied
                phases = [((objs.get(n) or {}).get("status") or {}).get("phase") for _, n in JOBS]
                if all(p == "Succeeded" for p in phases) or "Failed" in phases:
                    break
                time.sleep(1)
        total = time.monotonic() - applied

        console.print(Rule("4. results"))
        console.print(kubectl("get", "tj,ftj", "-o", "wide").rstrip())
        ok = all(((objs.get(n) or {}).get("status") or {}).get("phase") == "Succeeded" for _, n in JOBS)
        for _, name in JOBS:
            st = (objs.get(name) or {}).get("status") or {}
            out = st.get("outputUri", "?")
            where = out if out.startswith(("/", "s3://", "gs://", "pvc://")) else str(REPO / out)
            console.print(f"  {name}: {st.get('phase')} — model at {where}")
        console.print(
            f"time from kubectl apply to the first job Provisioning (its Ray cluster requested): "
            f"{provisioned:.1f}s"
            if provisioned is not None
            else "first job never provisioned"
        )
        console.print(
            f"time from kubectl apply to its first training step reported in status: {first_step:.1f}s"
            if first_step is not None
            else "no training step seen"
        )
        console.print(f"whole pipeline: {total:.0f}s")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
                lines = [
                    ln
                    for ln in r.read().decode().splitlines()
                    if ln.startswith(("forgeline_jobs{", "forgeline_job_loss{"))
                ]
            console.print(f"operator metrics (http://127.0.0.1:{metrics_port}/metrics), e.g.:")
            for ln in lines[:8]:
                console.print(f"  {ln}")
        except OSError:
            pass
        if not ok:
            console.print(f"[red]the pipeline did not succeed; operator log: {log_path}[/red]")
            return 1
        console.print("[green]✓ three jobs Succeeded[/green]")
        if args.keep:
            console.print(f"kept running: export KUBECONFIG={cp.kubeconfig}; Ctrl-C stops everything")
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if operator is not None and operator.poll() is None:
            operator.terminate()
            try:
                operator.wait(timeout=60)
            except subprocess.TimeoutExpired:
                operator.kill()
        cp.stop()


if __name__ == "__main__":
    sys.exit(main())
