"""Where the test cluster's binaries are: built once from the Go module proxy by
tests/setup/build_cluster.sh into $FORGELINE_CACHE/cluster/<component>-<version>/ (its manifest.json
names them), plus kubectl and helm (tests/setup/install_tools.sh, $FORGELINE_CACHE/bin)."""

from __future__ import annotations

import json
import os
import shutil
from functools import cache
from pathlib import Path

CACHE = Path(os.environ.get("FORGELINE_CACHE", Path.home() / ".cache" / "forgeline"))
MANIFEST = CACHE / "cluster" / "manifest.json"

# binary → the build_cluster.sh component that provides it
_COMPONENT = {
    "etcd": "etcd",
    "kube-apiserver": "kubernetes",
    "kube-controller-manager": "kubernetes",
    "kube-scheduler": "kubernetes",
    "kubelet": "kubernetes",
    "kube-proxy": "kubernetes",
    "pause": "pause",
    "coredns": "coredns",
    "ray-operator": "kuberay",
    "kueue": "kueue",
}

SETUP_HINT = "run `make setup` (tests/setup/build_cluster.sh builds it from the Go module proxy)"


@cache
def manifest() -> dict[str, dict[str, str]]:
    """component → {"version", "dir"} for what build_cluster.sh has built ({} before it ran)."""
    try:
        return json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return {}


def component(name: str) -> dict[str, str]:
    """The built component's version and directory; FileNotFoundError saying how to build it."""
    found = manifest().get(name)
    if not found or not Path(found["dir"]).is_dir():
        raise FileNotFoundError(f"{name} is not built ({MANIFEST} has no entry): {SETUP_HINT}")
    return found


def version(name: str) -> str:
    return component(name)["version"]


def find_binary(name: str) -> str:
    """A binary's path: $KUBEBUILDER_ASSETS (envtest's etcd and kube-apiserver) first, then the
    cluster build's, then $FORGELINE_CACHE/bin (kubectl, helm), then PATH."""
    candidates: list[Path] = []
    if assets := os.environ.get("KUBEBUILDER_ASSETS"):
        candidates.append(Path(assets) / name)
    if (comp := _COMPONENT.get(name)) and comp in manifest():
        candidates.append(Path(manifest()[comp]["dir"]) / "bin" / name)
    candidates.append(CACHE / "bin" / name)
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    if name not in _COMPONENT and (found := shutil.which(name)):
        return found
    raise FileNotFoundError(
        f"{name} not found (looked in KUBEBUILDER_ASSETS, {MANIFEST}, {CACHE / 'bin'} and PATH): {SETUP_HINT}"
    )


def crds(name: str) -> list[Path]:
    """The CRD files that came with a controller's own module (kuberay, kueue)."""
    return sorted((Path(component(name)["dir"]) / "crds").glob("*.yaml"))


def webhook_manifests(name: str) -> Path:
    """The webhook configurations that came with a controller's own module (kueue)."""
    return Path(component(name)["dir"]) / "webhook" / "manifests.yaml"
