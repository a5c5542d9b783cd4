"""`make demo`: a three-stage training pipeline through the real operator, on this machine.

1. starts a real etcd + kube-apiserver on loopback (forgeline_operator.dev.cluster) and installs
   the CRDs generated from the models;
2. starts the operator (`python -m forgeline_operator`) with the local backend: an embedded Ray
   head stands in for the KubeRay cluster a real deployment would create;
3. applies examples/pipeline-pretrain-sft-dpo.yaml — tiny pretrain → LoRA SFT from its output →
   DPO from the SFT — and shows the jobs' status until all three succeed;
4. prints `kubectl get tj,ftj`, where the models are, where the metrics are, and how long it took
   from `kubectl apply` to the first job being provisioned and to its first training step.

    --keep   leave everything running afterwards (Ctrl-C stops it)

    --cluster kubelet  (`make demo CLUSTER=kubelet`, needs root) the same pipeline on the test
             cluster instead: nodes from kind-config.yaml with a real kubelet and containerd, the
             real KubeRay, the operator and trainer images built from their Dockerfiles, the chart's
             operator as a pod; the live view shows `kubectl get pods` as KubeRay creates them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from .cluster import ControlPlane, find_binary
from .operator_process import OperatorProcess

REPO = Path(__file__).resolve().parents[3]
PIPELINE = REPO / "examples" / "pipeline-pretrain-sft-dpo.yaml"
JOBS = [("tj", "pipe-pretrain"), ("ftj", "pipe-sft"), ("ftj", "pipe-dpo")]


class _Kubectl:
    def __init__(self, kubeconfig: Path) -> None:
        self.base = [find_binary("kubectl"), "--kubeconfig", str(kubeconfig)]

    def __call__(self, *args: str, check: bool = True, input: str | None = None) -> str:
        proc = subprocess.run(self.base + list(args), capture_output=True, text=True, cwd=REPO, input=input)
        if check and proc.returncode != 0:
            raise SystemExit(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout


# The live table's columns in the order shown. At narrow widths (and when output is not a
# terminal: rich assumes 80 columns) the last ones go first, as `kubectl get` shows fewer columns
# without -o wide; the message takes the room left, cut with an ellipsis, or is left out.
_COLUMNS = ("job", "phase", "progress", "loss", "held-out eval", "tokens/s", "MFU")
_MESSAGE_MIN = 20
"""The message column is shown cut to the room left, but not narrower than this."""


def _cells(name: str, obj: dict[str, Any]) -> dict[str, str]:
    st = obj.get("status") or {}
    p = st.get("progress") or {}
    shown = p.get("display") or {}  # what kubectl get prints: 1.75, 46.2k, 30%
    return {
        "job": name,
        "phase": st.get("phase", "-"),
        "progress": p.get("summary", "-"),
        "loss": shown.get("loss", "-"),
        "held-out eval": shown.get("eval", "-"),
        "tokens/s": shown.get("tokensPerSecond", "-"),
        "MFU": shown.get("mfu", "-"),
        "message": st.get("message") or "",
    }


def _table(objs: dict[str, dict[str, Any]], width: int = 200) -> Table:
    """The jobs as a table no wider than `width`: no cell wraps; columns that do not fit are
    left out, least important first; the message is cut with an ellipsis."""
    rows = [_cells(name, objs.get(name, {})) for _, name in JOBS]

    def used(headings: list[str]) -> int:  # "│ cell " per column, then the last "│"
        return sum(max(len(h), *(len(r[h]) for r in rows)) + 3 for h in headings) + 1

    shown: list[str] = []
    for heading in _COLUMNS:
        if used([*shown, heading]) > width:
            break
        shown.append(heading)
    room = width - used(shown) - 3
    table = Table(title="forgeline pipeline (kubectl get tj,ftj)", expand=False)
    for heading in shown:
        table.add_column(heading, no_wrap=True)
    if room >= _MESSAGE_MIN:
        table.add_column("message", no_wrap=True, overflow="ellipsis", max_width=room)
    for r in rows:
        table.add_row(*(r[h] for h in shown), *([r["message"]] if room >= _MESSAGE_MIN else []))
    return table


@dataclass
class _Watched:
    """What the demo saw while the pipeline ran (seconds from `kubectl apply`)."""

    objs: dict[str, dict[str, Any]] = field(default_factory=dict)
    provisioned: float | None = None
    first_step: float | None = None
    total: float = 0.0

    def phase(self, name: str) -> str | None:
        return ((self.objs.get(name) or {}).get("status") or {}).get("phase")

    @property
    def succeeded(self) -> bool:
        return all(self.phase(n) == "Succeeded" for _, n in JOBS)


def _install_crds(kubectl: _Kubectl) -> None:
    kubectl("apply", "-f", str(REPO / "crds"))
    kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/trainingjobs.forgeline.dev",
        "crd/finetunejobs.forgeline.dev",
    )


def _start_operator(cp: ControlPlane) -> OperatorProcess:
    operator = OperatorProcess(
        cp.kubeconfig,
        REPO,
        cp.workdir / "operator.log",
        FORGELINE_BACKEND="local",
        FORGELINE_RECONCILE_INTERVAL="2",
        FORGELINE_LOCAL_WORK_DIR=str(REPO),
    )
    try:
        operator.start(timeout=120)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    return operator


def _watch_pipeline(
    kubectl: _Kubectl, console: Console, timeout: float, manifest: str | None = None, pods: bool = False
) -> _Watched:
    """Apply the pipeline (or `manifest`) and show the jobs live (with `pods`: the Ray pods
    too) until all succeed, one fails, or time is up."""
    applied = time.monotonic()
    if manifest is None:
        console.print(kubectl("apply", "-f", str(PIPELINE)).strip())
    else:
        console.print(kubectl("apply", "-f", "-", input=manifest).strip())
    seen = _Watched()

    def view() -> Any:
        if not pods:
            return _table(seen.objs, console.width)
        listing = kubectl(
            "get", "pods", "-o", "wide", "-l", "app.kubernetes.io/managed-by=forgeline", check=False
        )
        return Group(
            _table(seen.objs, console.width),
            Text("kubectl get pods -o wide", style="bold"),
            Text(listing.rstrip()),
        )

    with Live(view(), console=console, refresh_per_second=2) as live:
        while time.monotonic() - applied < timeout:
            items = json.loads(kubectl("get", "tj,ftj", "-o", "json"))["items"]
            seen.objs = {o["metadata"]["name"]: o for o in items}
            live.update(view())
            first = (seen.objs.get("pipe-pretrain") or {}).get("status") or {}
            if seen.provisioned is None and first.get("phase") in ("Provisioning", "Running", "Succeeded"):
                seen.provisioned = time.monotonic() - applied
            if seen.first_step is None and (first.get("progress") or {}).get("step", 0) >= 1:
                seen.first_step = time.monotonic() - applied
            phases = [seen.phase(n) for _, n in JOBS]
            if all(p == "Succeeded" for p in phases) or "Failed" in phases:
                break
            time.sleep(1)
    console.print()  # the table's bottom border, then a blank line before the next heading
    seen.total = time.monotonic() - applied
    return seen


def _report(kubectl: _Kubectl, console: Console, seen: _Watched, operator: OperatorProcess | None) -> None:
    console.print(kubectl("get", "tj,ftj", "-o", "wide").rstrip())
    for _, name in JOBS:
        st = (seen.objs.get(name) or {}).get("status") or {}
        out = st.get("outputUri", "?")
        where = out if out.startswith(("/", "s3://", "gs://", "pvc://")) else str(REPO / out)
        console.print(f"  {name}: {st.get('phase')} — model at {where}")
        gain = ((st.get("progress") or {}).get("display") or {}).get("eval")
        if gain:
            console.print(f"    held-out eval before → after training: {gain}")
        promo = st.get("promotion")
        if promo:  # spec.promotion's gate: the next stage trains from it only when promoted
            word = "promoted" if promo.get("promoted") else "NOT promoted"
            console.print(f"    gate: {word} ({promo.get('reason')}) — {promo.get('message', '')}")
        g = st.get("goodput") or {}
        if g.get("display"):
            console.print(
                f"    goodput {g['display']} of {g.get('heldSeconds', 0):.0f}s held × {g.get('chips', 0):g} "
                f"{g.get('chipUnit', '')} (`forgeline report {name}`)"
            )
        lin = st.get("lineage") or {}
        if lin.get("digest"):
            back = " ← ".join(u["job"].split("/")[1] for u in lin.get("upstream") or [])
            console.print(
                f"    lineage {lin['digest'][:12]}…"
                + (f" ← {back}" if back else "")
                + f" (`forgeline lineage {name}`)"
            )
    console.print(
        "time from kubectl apply to the first job Provisioning (its Ray cluster requested): "
        f"{seen.provisioned:.1f}s"
        if seen.provisioned is not None
        else "first job never provisioned"
    )
    console.print(
        f"time from kubectl apply to its first training step reported in status: {seen.first_step:.1f}s"
        if seen.first_step is not None
        else "no training step seen"
    )
    for _, name in JOBS:
        t = ((seen.objs.get(name) or {}).get("status") or {}).get("timings") or {}
        if t.get("timeToFirstStepSeconds") is not None:
            console.print(
                f"  {name}: first step {t['timeToFirstStepSeconds']:.1f}s after it was created = queued "
                f"{t['queuedSeconds']:.1f}s + provisioning {t['provisioningSeconds']:.1f}s + trainer "
                f"start-up {t['startupSeconds']:.1f}s (status.timings)"
            )
    console.print(f"whole pipeline: {seen.total:.0f}s")
    if operator is None:
        return
    try:
        lines = [
            ln
            for ln in operator.metrics().splitlines()
            if ln.startswith(("forgeline_jobs{", "forgeline_job_loss{"))
        ]
    except OSError:
        return
    console.print(f"operator metrics ({operator.metrics_url}), e.g.:")
    for ln in lines[:8]:
        console.print(f"  {ln}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep everything running at the end")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds to wait for the pipeline")
    parser.add_argument("--cluster", choices=["embedded", "kubelet"], default="embedded",
                        help="kubelet: on the test cluster, in real pods that KubeRay creates")  # fmt: skip
    args = parser.parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    if args.cluster == "kubelet":
        return _on_the_test_cluster(console, args.timeout)

    console.print(Rule("1. a real control plane (etcd + kube-apiserver, RBAC on) and the CRDs"))
    cp = ControlPlane()
    cp.start()
    kubectl = _Kubectl(cp.kubeconfig)
    operator: OperatorProcess | None = None
    try:
        _install_crds(kubectl)
        console.print(f"kube-apiserver {cp.url}; KUBECONFIG={cp.kubeconfig}")
        console.print(Rule("2. the operator, with an embedded Ray head as its backend"))
        operator = _start_operator(cp)
        console.print(f"operator up (log: {operator.log_path}); metrics at {operator.metrics_url}")
        console.print(Rule("3. kubectl apply -f examples/pipeline-pretrain-sft-dpo.yaml"))
        seen = _watch_pipeline(kubectl, console, args.timeout)
        console.print(Rule("4. results"))
        _report(kubectl, console, seen, operator)
        if not seen.succeeded:
            console.print(f"[red]the pipeline did not succeed; operator log: {operator.log_path}[/red]")
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
        if operator is not None:
            operator.stop()
        cp.stop()


def _on_the_test_cluster(console: Console, timeout: float) -> int:
    """The pipeline on the test cluster (forgeline_operator.dev.cluster), torn down at the end."""
    import shutil

    from .cluster.binaries import CACHE
    from .cluster.cluster import KubeCluster, on_a_small_cluster

    workdir = CACHE / "demo-cluster"
    shutil.rmtree(workdir, ignore_errors=True)
    console.print(
        Rule("1. a real cluster: the nodes of kind-config.yaml (kubelet, containerd), CoreDNS, KubeRay")
    )
    cluster = KubeCluster(workdir, log=console.print)
    try:
        cluster.up()
        console.print(Rule("2. the images from their Dockerfiles; helm install of the chart"))
        images = cluster.build_and_load_images()
        cluster.install_forgeline(images, "operator.reconcileInterval=2")
        console.print(f"operator image {images['operator']}, trainer image {images['trainer']}")
        cluster.work_volume("default", workdir / "volume")
        console.print(f"PersistentVolumeClaim work → {workdir / 'volume'}; KUBECONFIG={cluster.kubeconfig}")
        console.print(
            Rule("3. kubectl apply the pipeline (outputs on pvc://work, one small worker per stage)")
        )
        docs = [on_a_small_cluster(d, workers=1) for d in yaml.safe_load_all(PIPELINE.read_text()) if d]
        kubectl = _Kubectl(cluster.kubeconfig)
        seen = _watch_pipeline(kubectl, console, timeout, manifest=yaml.safe_dump_all(docs), pods=True)
        console.print(Rule("4. results"))
        _report(kubectl, console, seen, None)
        if not seen.succeeded:
            console.print(cluster.diagnostics("default"))
            console.print("[red]the pipeline did not succeed[/red]")
            return 1
        console.print(
            f"[green]✓ three jobs Succeeded in KubeRay's pods; models under {workdir / 'volume'}[/green]"
        )
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        problems = cluster.down()
        console.print(f"cluster down: {problems or 'nothing left behind'}")


if __name__ == "__main__":
    sys.exit(main())
