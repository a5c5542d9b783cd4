"""Shared fixtures: one real control plane per session, one namespace per test.

The control plane is real etcd + kube-apiserver on loopback (forgeline_operator.devcluster).
Set FORGELINE_TEST_KUBECONFIG to a kubeconfig to run against an existing cluster (kind, say)
instead; set KUBEBUILDER_ASSETS to use envtest binaries.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from forgeline_operator.devcluster import ControlPlane, find_binary

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CRDS = REPO / "crds"


@dataclass
class Cluster:
    kubeconfig: Path
    control_plane: ControlPlane | None

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [find_binary("kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def api_client(self):  # noqa: ANN201 - kubernetes.client.ApiClient
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


def _install_crds(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", str(CRDS))
    for name in ("trainingjobs.forgeline.dev", "finetunejobs.forgeline.dev"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=30s")
    # The apiserver publishes a new CRD's OpenAPI (used by `kubectl explain`) a moment later.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if cluster.kubectl("explain", "trainingjob.spec", check=False).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError("CRD OpenAPI was not published within 30s")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    existing = os.environ.get("FORGELINE_TEST_KUBECONFIG")
    if existing:
        c = Cluster(Path(existing), None)
        _install_crds(c)
        yield c
        return
    cp = ControlPlane(workdir=tmp_path_factory.mktemp("control-plane"))
    cp.start()
    try:
        c = Cluster(cp.kubeconfig, cp)
        _install_crds(c)
        yield c
    finally:
        cp.stop()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def load_yaml_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def example_files() -> list[Path]:
    return sorted([*EXAMPLES.glob("*.yaml"), *EXAMPLES.glob("production/*.yaml")])
