"""`make demo`: the Forgeline API on a real control plane, start to finish, on this machine.

1. starts a real etcd + kube-apiserver on loopback (forgeline_operator.devcluster);
2. installs the CRDs generated from the models;
3. validates every example offline (`forgeline validate`) and applies the pipeline example;
4. shows `kubectl get tj,ftj` and `kubectl explain`, and a bad manifest rejected with the field
   named, both by `forgeline validate` and by the apiserver.

Pass --keep to leave the control plane running (Ctrl-C stops it) and use the printed kubeconfig.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from .devcluster import ControlPlane, find_binary

REPO = Path(__file__).resolve().parents[2]


def _run(console: Console, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    shown = " ".join(Path(a).name if a.startswith("/") and "kubeconfig" not in a else a for a in argv)
    console.print(f"[bold cyan]$ {shown}[/bold cyan]")
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    out = (proc.stdout + proc.stderr).rstrip()
    if out:
        console.print(out, markup=False, highlight=False)
    if check and proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode})")
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the control plane running")
    args = parser.parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    forgeline = str(Path(sys.executable).parent / "forgeline")

    console.print(Rule("1. a real control plane (etcd + kube-apiserver, RBAC on)"))
    t0 = time.monotonic()
    cp = ControlPlane()
    cp.start()
    console.print(f"kube-apiserver ready at {cp.url} in {time.monotonic() - t0:.1f}s; "
                  f"kubeconfig: {cp.kubeconfig}")
    kubectl = [find_binary("kubectl"), "--kubeconfig", str(cp.kubeconfig)]
    try:
        console.print(Rule("2. CRDs generated from the pydantic models"))
        _run(console, [forgeline, "crds", "--dir", "crds", "--check"])
        _run(console, kubectl + ["apply", "-f", "crds/"])
        _run(console, kubectl + ["wait", "--for=condition=Established", "--timeout=30s",
                                 "crd/trainingjobs.forgeline.dev", "crd/finetunejobs.forgeline.dev"])

        console.print(Rule("3. validate every example offline, apply the pipeline"))
        _run(console, [forgeline, "validate", "examples", "examples/production"])
        _run(console, kubectl + ["apply", "-f", "examples/pipeline-pretrain-sft-dpo.yaml"])
        _run(console, kubectl + ["get", "tj,ftj", "-o", "wide"])
        for _ in range(60):  # the CRD's OpenAPI is published a moment after it is established
            if subprocess.run(kubectl + ["explain", "trainingjob.spec"], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        _run(console, kubectl + ["explain", "trainingjob.spec.deepspeed"])

        console.print(Rule("4. bad input fails loudly, naming the field and the fix"))
        _run(console, [forgeline, "validate", "tests/bad_manifests/tj-offload-params-zero2.yaml",
                       "tests/bad_manifests/tj-lr-negative.yaml"], check=False)
        _run(console, kubectl + ["apply", "--validate=false", "-f",
                                 "tests/bad_manifests/tj-lr-negative.yaml"], check=False)
        console.print(Rule("done"))
        console.print("Training runs through the operator arrive with the operator issue; today "
                      "`forgeline validate` and the CRDs are the product.")
        if args.keep:
            console.print(f"control plane kept running: export KUBECONFIG={cp.kubeconfig}; Ctrl-C stops it")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
