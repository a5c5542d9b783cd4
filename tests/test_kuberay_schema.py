"""The RayClusters the builders produce, held against the real KubeRay RayCluster CRD (v1.7,
`../shared/kuberay/`) on a real apiserver, and every pod template in them created as a Pod by the
real apiserver's Pod validation (server-side dry runs), for every shipped example and node pool.

The test apiserver is 1.20: it cannot load three things of the v1.7 CRD that change nothing for
these checks — CEL rules (`x-kubernetes-validations`, newer than 1.20), empty-string defaults and
the list-map merge keys of a few reference lists — so they are taken out before installing it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from forgeline_operator.api import parse_job
from forgeline_operator.controller import builders
from forgeline_operator.controller.settings import NodePool
from forgeline_operator.dev.cluster import ControlPlane, find_binary

from .conftest import CHART, EXAMPLES, REPO, load_yaml_documents

pytestmark = pytest.mark.cluster

KUBERAY_CRD = Path(
    os.environ.get("FORGELINE_KUBERAY_CRD")  # a checkout that is not beside the workplace's shared/
    or REPO.parent / "shared" / "kuberay" / "ray.io_rayclusters.yaml"
)


def _loadable_on_1_20(node: Any) -> Any:
    if isinstance(node, dict):
        node.pop("x-kubernetes-validations", None)
        if node.get("default", 0) in (None, ""):
            node.pop("default")
        if node.get("x-kubernetes-list-type") == "map":
            node.pop("x-kubernetes-list-type")
            node.pop("x-kubernetes-list-map-keys", None)
        for value in node.values():
            _loadable_on_1_20(value)
    elif isinstance(node, list):
        for value in node:
            _loadable_on_1_20(value)
    return node


class _Server:
    def __init__(self, kubeconfig: Path) -> None:
        self.base = [find_binary("kubectl"), "--kubeconfig", str(kubeconfig)]

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.base + list(args), input=stdin, capture_output=True, text=True, timeout=120
        )

    def dry_run(self, obj: dict[str, Any]) -> dict[str, Any]:
        proc = self.run("create", "--dry-run=server", "-o", "json", "-f", "-", stdin=json.dumps(obj))
        assert proc.returncode == 0, f"{obj['kind']} {obj['metadata']['name']} rejected: {proc.stderr}"
        return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Server]:
    """Its own apiserver: the session's one has the stand-in RayCluster CRD the operator tests use."""
    if not KUBERAY_CRD.exists():
        pytest.skip(
            f"KubeRay's CRD is not at {KUBERAY_CRD} (the workplace's shared/ directory; "
            "FORGELINE_KUBERAY_CRD names another path)"
        )
    with ControlPlane(workdir=tmp_path_factory.mktemp("kuberay-cp")) as cp:
        srv = _Server(cp.kubeconfig)
        crd = _loadable_on_1_20(yaml.safe_load(KUBERAY_CRD.read_text()))
        created = srv.run("create", "-f", "-", stdin=json.dumps(crd))
        assert created.returncode == 0, created.stderr
        deadline = time.monotonic() + 60
        while srv.run("get", "rayclusters").returncode != 0:  # established and discovered
            assert time.monotonic() < deadline, "the RayCluster CRD never became served"
            time.sleep(0.5)
        yield srv


def _clusters() -> list[tuple[str, dict[str, Any]]]:
    """(id, RayCluster) for every shipped example, on its node pool from the chart's presets."""
    pools = {
        name: NodePool.model_validate(p)
        for name, p in yaml.safe_load((CHART / "values.yaml").read_text())["nodePools"].items()
    }
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")) + sorted((EXAMPLES / "production").glob("*.yaml")):
        for doc in load_yaml_documents(path):
            if doc.get("kind") not in ("TrainingJob", "FineTuneJob"):
                continue
            doc["metadata"]["uid"] = "0123456789abcdef"
            job = parse_job(doc)
            rc = builders.build_ray_cluster(
                job, "ghcr.io/forgeline/trainer:test", pools.get(job.spec.resources.node_pool or "")
            )
            rc["metadata"]["namespace"] = "default"
            out.append((f"{path.stem}/{job.metadata.name}", rc))
    return out


CLUSTERS = _clusters()


def _lost(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Paths of what we set that the apiserver pruned or changed (fields the schema does not know)."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return [path or "."]
        return [p for k, v in ours.items() for p in _lost(v, theirs.get(k, _MISSING), f"{path}.{k}")]
    if isinstance(ours, list):
        if not isinstance(theirs, list) or len(theirs) != len(ours):
            return [path]
        return [
            p for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) for p in _lost(a, b, f"{path}[{i}]")
        ]
    return [] if ours == theirs or str(ours) == str(theirs) else [path]  # quantities come back as strings


_MISSING = object()


def test_every_example_builds_a_raycluster() -> None:
    assert len(CLUSTERS) >= 10


@pytest.mark.parametrize(("name", "rc"), CLUSTERS, ids=[n for n, _ in CLUSTERS])
def test_kuberay_accepts_the_raycluster_and_knows_every_field(server: _Server, name: str, rc: dict) -> None:
    stored = server.dry_run(rc)
    assert _lost(rc["spec"], stored["spec"]) == [], "fields KubeRay's schema does not know (pruned)"


@pytest.mark.parametrize(("name", "rc"), CLUSTERS, ids=[n for n, _ in CLUSTERS])
def test_every_pod_template_is_a_valid_pod(server: _Server, name: str, rc: dict) -> None:
    spec = rc["spec"]
    templates = [("head", spec["headGroupSpec"]["template"])]
    templates += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    for group, template in templates:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{rc['metadata']['name']}-{group}",
                "namespace": "default",
                **template["metadata"],
            },
            "spec": template["spec"],
        }
        stored = server.dry_run(pod)
        assert _lost(template["spec"]["containers"], stored["spec"]["containers"]) == []


def test_a_kueue_raycluster_stays_suspended(server: _Server) -> None:
    """Also with credentials by Secret reference and a ServiceAccount for workload identity."""
    doc = load_yaml_documents(EXAMPLES / "pretrain-tiny-llama.yaml")[0]
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a"}
    doc["spec"]["credentials"] = [{"secretName": "s3"}, {"secretName": "hf", "keys": ["HF_TOKEN"]}]
    doc["spec"]["resources"]["serviceAccountName"] = "trainer"
    rc = builders.build_ray_cluster(parse_job(doc), "img")
    rc["metadata"]["namespace"] = "default"
    stored = server.dry_run(rc)
    assert stored["spec"]["suspend"] is True and _lost(rc["spec"], stored["spec"]) == []


def test_a_field_kuberay_does_not_know_is_caught(server: _Server) -> None:
    """The checks above can fail: an unknown field is refused by kubectl (KubeRay's published
    schema) and pruned by the apiserver; a wrong type is rejected."""
    rc = json.loads(json.dumps(CLUSTERS[0][1]))
    rc["spec"]["workerGroupSpecs"][0]["replica"] = 2
    refused = server.run("create", "--dry-run=server", "-f", "-", stdin=json.dumps(rc))
    # kubectl names the field alone; the 1.34 apiserver's strict decoding names its path
    assert refused.returncode != 0 and re.search(r'unknown field "[^"]*\breplica"', refused.stderr)
    pruned = server.run(
        "create", "--dry-run=server", "--validate=false", "-o", "json", "-f", "-", stdin=json.dumps(rc)
    )
    assert _lost(rc["spec"], json.loads(pruned.stdout)["spec"]) == [".workerGroupSpecs[0].replica"]
    rc["spec"]["workerGroupSpecs"][0].pop("replica")
    rc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    proc = server.run("create", "--dry-run=server", "--validate=false", "-f", "-", stdin=json.dumps(rc))
    assert proc.returncode != 0 and "replicas" in proc.stderr
